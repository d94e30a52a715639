"""A checkpoint resumed on another number of ranks (a Slurm requeue onto other nodes, another GPU
count) with the same global batch continues as an uninterrupted run on the new number would.

The pure parts first: the sample order is a function of the global batch, never of the world
size or micro batch (ResumableSampler), and a saved position splits anew over the new ranks
(position_on_world). Then the runs: DDP checkpoints of 2 ranks resumed on 1 and of 1 resumed on 2,
inside an epoch past the first, by the saving run's own command (the accumulation recomputed from
the checkpoint's global batch): every step's samples over all ranks equal the uninterrupted run's
on the new world size, and its losses within 1e-5. Not bit for bit: 2 ranks average two halves'
gradients through an all-reduce where 1 rank sums its micro batches, so fp32 rounds differently
(~1e-7 relative per step); a sample repeated, skipped or a batch shifted moves a loss by 1e-3 or
more. ZeRO checkpoints the same way through DeepSpeed's universal checkpoint, for each stage: the
losses within 1e-5 of the uninterrupted run on the new world size, for the same reason."""

import json
import shutil

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import VENV_BIN, free_port, pretrain_args, read_losses, run_launcher
from launch.pretrain import main as pretrain_main
from trainers.data.collate import ResumableSampler
from trainers.errors import UsageError
from trainers.fit import SampleLog, TrainState, batch_stream, position_on_world

pytestmark = pytest.mark.reliability

N_SAMPLES, GLOBAL = 103, 12
# (world, micro, accumulation), each micro x accumulation x world = 12
SHAPES = [(1, 12, 1), (1, 4, 3), (2, 2, 3), (3, 4, 1), (4, 3, 1), (6, 1, 2)]


def global_batches(world: int, micro: int, accumulation: int, steps: int, lengths=None, start: TrainState | None = None,
                   saved_world: int | None = None) -> list[list[int]]:
    """Each step's samples over all ranks, sorted, as fit's batch_stream hands them out on each
    rank -- from the start, or from `start` (a state saved on `saved_world` ranks)."""
    per_rank = []
    for rank in range(world):
        sampler = ResumableSampler(list(range(N_SAMPLES)), world, rank, seed=5, global_batch=GLOBAL, lengths=lengths,
                                   group_size=2 * GLOBAL)
        loader = DataLoader(list(range(N_SAMPLES)), batch_size=micro, sampler=sampler, drop_last=True, collate_fn=list)
        state = TrainState()
        if start is not None:
            state = TrainState(epoch=start.epoch, samples_in_epoch=position_on_world(start.samples_in_epoch, saved_world, world, "ckpt"))
        stream = batch_stream(loader, sampler, state, micro)
        per_rank.append([[i for _ in range(accumulation) for i in next(stream)] for _ in range(steps)])
    return [sorted(i for rank in per_rank for i in rank[step]) for step in range(steps)]


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
def test_every_step_trains_the_same_samples_on_any_world_size(grouped):
    lengths = np.random.default_rng(0).integers(5, 500, N_SAMPLES) if grouped else None
    steps_per_epoch = N_SAMPLES // GLOBAL  # 8: the epoch ends at a whole global batch (7 samples sit out)
    reference = global_batches(*SHAPES[0], steps=3 * steps_per_epoch, lengths=lengths)
    for epoch in range(3):
        seen = [i for b in reference[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch] for i in b]
        assert len(seen) == len(set(seen)) == steps_per_epoch * GLOBAL  # no sample twice in an epoch
    assert reference[:steps_per_epoch] != reference[steps_per_epoch:2 * steps_per_epoch]  # reshuffled each epoch
    for shape in SHAPES[1:]:
        assert global_batches(*shape, steps=3 * steps_per_epoch, lengths=lengths) == reference, shape


@pytest.mark.parametrize("saved,resumed", [((4, 3, 1), (1, 4, 3)), ((1, 12, 1), (6, 1, 2)), ((2, 2, 3), (3, 4, 1))])
def test_a_saved_position_continues_on_another_world_size(saved, resumed):
    steps_per_epoch, done = N_SAMPLES // GLOBAL, 11  # 3 steps into the second epoch
    world, micro, _ = saved
    checkpoint = TrainState(epoch=1, samples_in_epoch=(done - steps_per_epoch) * GLOBAL // world)
    continued = global_batches(*resumed, steps=6, start=checkpoint, saved_world=world)
    assert continued == global_batches(*SHAPES[0], steps=done + 6)[done:]


def test_a_position_the_new_ranks_cannot_split_is_refused():
    assert position_on_world(6, 2, 3, "c") == 4
    with pytest.raises(UsageError, match=r"checkpoint-7 is 10 samples into its epoch, which 4 ranks cannot split evenly"):
        position_on_world(5, 2, 4, "checkpoint-7")


def test_sample_records_of_ranks_gone_after_a_resume_end_at_its_checkpoint(tmp_path):
    for rank in range(3):
        (tmp_path / f"sample_ids.rank{rank}.jsonl").write_text(
            "".join(json.dumps({"step": s, "epoch": 0, "ids": [s * 10 + rank]}) + "\n" for s in (1, 2, 3)))
    for rank in range(2):  # resumed from checkpoint-2 on 2 ranks
        SampleLog(tmp_path, rank, 2, enabled=True, resumed_step=2)
    for rank in range(3):
        steps = [json.loads(line)["step"] for line in (tmp_path / f"sample_ids.rank{rank}.jsonl").read_text().splitlines()]
        assert steps == [1, 2], (rank, steps)


# ----------------------------------------------------------------------------------- runs


def launch(world: int, argv: list[str]) -> str:
    """launch/pretrain.py on `world` ranks (one: plain python); its output."""
    if world == 1:
        return run_launcher([str(VENV_BIN / "python"), "launch/pretrain.py", *argv]).stdout
    return run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()),
                         "launch/pretrain.py", *argv]).stdout


def step_samples(out, world: int) -> dict[int, list[int]]:
    """Every step's sample ids over the ranks that trained it, sorted."""
    steps: dict[int, list[int]] = {}
    for rank in range(world):
        path = out / f"sample_ids.rank{rank}.jsonl"
        for record in map(json.loads, path.read_text().splitlines() if path.is_file() else []):
            steps.setdefault(record["step"], []).extend(record["ids"])
    return {s: sorted(ids) for s, ids in sorted(steps.items())}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """~60 blocks of 32 tokens: 7 global batches of 8 an epoch, so a checkpoint falls in the second."""
    from trainers.data.synthetic import make_corpus

    path = tmp_path_factory.mktemp("worlds") / "small.jsonl"
    make_corpus(path, seed=5, n_docs=140)
    return path


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_fewer_and_on_more_ranks(small_corpus, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from trainers.data.packing import prepare_blocks

    blocks = prepare_blocks([str(small_corpus)], "--train_files", AutoTokenizer.from_pretrained(tokenizer_dir), 32, "text", "", 1000,
                            build=True)
    steps_per_epoch = len(blocks) // 8
    save_at = steps_per_epoch + 2  # two global batches into the second epoch
    common = dict(per_device_train_batch_size=4, max_steps=save_at + 4, save_steps=save_at, validation_split_ratio=0,
                  record_sample_ids=True, resume="auto")
    one_rank = dict(common, gradient_accumulation_steps=2)  # 4 x 2 x 1 = 8
    two_ranks = dict(common, gradient_accumulation_steps=1)  # 4 x 1 x 2 = 8
    ref1, ref2 = tmp_path / "one", tmp_path / "two"
    pretrain_main(pretrain_args(small_corpus, tokenizer_dir, ref1, **one_rank))
    launch(2, pretrain_args(small_corpus, tokenizer_dir, ref2, **two_ranks))
    assert step_samples(ref1, 1) == step_samples(ref2, 2)  # the same global batches, epoch after epoch
    saved = json.loads((ref2 / f"checkpoint-{save_at}" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["samples_in_epoch"], saved["global_batch"]) == (1, 8, 8), saved

    def resumed_from(reference, world, name):
        out = tmp_path / name
        out.mkdir()
        shutil.copytree(reference / f"checkpoint-{save_at}", out / f"checkpoint-{save_at}")
        for records in reference.glob("sample_ids.rank*.jsonl"):  # the saving run's records, past the checkpoint too
            shutil.copy(records, out / records.name)
        return out

    # 2 ranks -> 1, by the 2-rank command (accumulation 1): the accumulation becomes 2 from the global batch
    fewer = resumed_from(ref2, 2, "fewer")
    pretrain_main(pretrain_args(small_corpus, tokenizer_dir, fewer, **two_ranks))
    # 1 rank -> 2, by the 1-rank command (accumulation 2): it becomes 1
    more = resumed_from(ref1, 1, "more")
    launch(2, pretrain_args(small_corpus, tokenizer_dir, more, **one_rank))

    for out, reference, world in ((fewer, ref1, 2), (more, ref2, 2)):
        assert step_samples(out, world) == step_samples(reference, 2), out.name  # no sample repeated or skipped
        got, expected = read_losses(out), read_losses(reference)
        assert sorted(got) == list(range(save_at + 1, save_at + 5)), got
        worst = max(abs(got[s] - expected[s]) for s in got)
        assert worst < 1e-5, f"{out.name}: max |loss difference| {worst:.2e}"
    summary = json.loads((fewer / "summary.json").read_text())
    assert summary["world_size"] == 1
    resolved = (fewer / "resolved_config.yaml").read_text()
    assert "global_batch_size: 8" in resolved and "gradient_accumulation_steps: 2" in resolved, resolved


@pytest.mark.slow
@pytest.mark.parametrize("stage,saved_world,world", [(1, 2, 1), (3, 1, 2)], ids=["zero1-2to1", "zero3-1to2"])
def test_zero_checkpoint_resumes_on_another_world_size(stage, saved_world, world, corpus, tokenizer_dir, tmp_path):
    """Converted to DeepSpeed's universal checkpoint on the way (logged, then deleted), the same
    global batch of 8 (micro 4 x accumulation x world), every later step's samples those of the
    uninterrupted run on the new world size and its losses within 1e-5. ZeRO-2 (DeepSpeed's and
    trainrig's code path of ZeRO-1) runs 4 ranks on 2 nodes -> 2 on 1 in tests/slurm/test_sbatch.py."""
    flags = dict(max_steps=6, save_steps=3, zero_stage=stage, validation_split_ratio=0, record_sample_ids=True, resume="auto")
    saving, uninterrupted, resumed = tmp_path / "saving", tmp_path / "uninterrupted", tmp_path / "resumed"
    launch(saved_world, pretrain_args(corpus, tokenizer_dir, saving, gradient_accumulation_steps=2 // saved_world, **flags))
    launch(world, pretrain_args(corpus, tokenizer_dir, uninterrupted, gradient_accumulation_steps=2 // world, **flags))
    resumed.mkdir()
    shutil.copytree(saving / "checkpoint-3", resumed / "checkpoint-3")
    # the saving run's own command: its accumulation is recomputed from the checkpoint's global batch
    log = launch(world, pretrain_args(corpus, tokenizer_dir, resumed, gradient_accumulation_steps=2 // saved_world, **flags))
    assert (f"checkpoint-3 was saved by {saved_world} ranks under ZeRO-{stage}, this run has {world}: converted to "
            f"DeepSpeed's universal checkpoint") in log, log[-3000:]
    assert not (resumed / "checkpoint-3.universal").exists()  # deleted once loaded
    assert step_samples(resumed, world) == {s: ids for s, ids in step_samples(uninterrupted, world).items() if s > 3}
    got, expected = read_losses(resumed), read_losses(uninterrupted)
    assert sorted(got) == [4, 5, 6], got
    worst = max(abs(got[s] - expected[s]) for s in got)
    assert worst < 1e-5, f"max |loss difference| {worst:.2e}"


def test_a_zero_checkpoint_deepspeed_cannot_convert_is_refused_with_the_way_that_works(tmp_path):
    """ds_to_universal failing (here: a checkpoint without its optimizer shards) stops the resume
    with the sizes and the fix, and leaves no half-written conversion behind."""
    from trainers.runtime import to_universal

    (tmp_path / "checkpoint-4" / "deepspeed").mkdir(parents=True)
    target = tmp_path / "checkpoint-4.universal"
    with pytest.raises(UsageError) as refused:
        to_universal(tmp_path / "checkpoint-4", target, saved_world=4, world=2, zero_stage=2)
    message = str(refused.value)
    assert "checkpoint-4 was saved by 4 ranks under ZeRO-2, this run has 2, and converting it" in message, message
    assert "(DeepSpeed's ds_to_universal, into" in message and "resume it with 4 ranks in all" in message, message
    assert not target.exists()


def test_a_checkpoint_of_0_14_keeps_its_global_batch_and_length_grouping(tmp_path):
    """trainrig <= 0.14 saved the batch's factors and grouped lengths by 64 micro batches of every
    rank: a resume derives the global batch and keeps that grouping, so its epoch order goes on."""
    from trainers.checkpoint import STATE_FILE, saved_state
    from trainers.fit import keep_saved_grouping

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 5, "world_size": 2, "micro_batch": 4, "accumulation": 3}))
    record = saved_state(tmp_path)
    assert record["global_batch"] == 24
    grouped = ResumableSampler(list(range(100)), 1, 0, seed=0, global_batch=24, lengths=np.arange(100), group_size=16 * 24)
    keep_saved_grouping(grouped, record)
    assert grouped.group_size == 64 * 4 * 2
    keep_saved_grouping(grouped, {**record, "length_group": 48})
    assert grouped.group_size == 48
