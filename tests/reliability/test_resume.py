"""Save at step k, SIGKILL the run mid-step, `--resume auto` to step n: the losses of steps
k+1..n equal the uninterrupted run's to 1e-6 (CPU, fp32, same samples in the same order), for one
process in every training stage (conftest.TRAINING_STAGES), SFT and continued pretraining with a
4-bit base (QLoRA), and for two pretraining ranks under DDP
and DeepSpeed ZeRO-2; the sample ids every rank trained on,
step by step, equal the uninterrupted run's (no sample repeated or skipped). Resuming on another
number of ranks: test_resume_world_size.py.

Loss tolerance 1e-6: the resumed run replays the same fp32 CPU computation on the same samples in
the same order (data position and RNG streams come from the checkpoint, two gloo ranks reduce in a
fixed order), so it is expected to match bit for bit; a batch shifted by one or a lost optimizer
state moves the losses by 1e-3 or more."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, TRAINING_STAGES, VENV_BIN, free_port, pretrain_args, read_losses, run_launcher
from faults import start_with_fault, wait_for_marker
from launch.pretrain import main as pretrain_main
from trainers.checkpoint import MANIFEST, complete_checkpoints, step_of
from trainers.tracking import read_metrics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


KILL_RUN = dict(max_steps=8, save_steps=2)
# QLoRA (a 4-bit base under LoRA) as SFT and as continued pretraining: the base is quantized again
# from the same checkpoint on resume, deterministically, so the same tolerance holds
QLORA = dict(lora_r=8, load_in_4bit=True)
KILL_CASES = [(stage, "") for stage in TRAINING_STAGES] + [("sft", "qlora"), ("pretrain", "cpt-qlora")]


def case_flags(variant: str, request) -> dict:
    if variant == "qlora":
        return dict(QLORA)
    if variant == "cpt-qlora":  # pretraining's entry script from the tiny base model
        return dict(QLORA, model_preset=None, model_name_or_path=str(request.getfixturevalue("sft_model_dir")))
    return {}


@pytest.mark.parametrize("stage,variant", KILL_CASES, ids=[f"{s}-{v}" if v else s for s, v in KILL_CASES])
def test_sigkill_mid_step_then_resume_equals_uninterrupted(stage, variant, stage_run, reference_losses, request, tmp_path, caplog):
    """One process, SIGKILLed in the middle of step 6 (paused in its forward pass by faults.py,
    so the kill lands there however slow the machine is): checkpoint-4 is the newest complete
    one, step 5 was already logged; `--resume auto` continues from checkpoint-4 to the uninterrupted
    run's losses, and metrics.jsonl holds every step once."""
    run = stage_run(stage)
    flags = case_flags(variant, request)
    expected = reference_losses(stage, max_steps=8, **flags)
    assert sorted(expected) == list(range(1, 9))

    out, marker, log = tmp_path / "killed", tmp_path / "paused", tmp_path / "killed.log"
    args = run.args(out, **KILL_RUN, **flags, resume="auto")
    proc = start_with_fault([run.script, *args], {"kind": "pause_in_forward", "call": 6, "marker": str(marker)}, log)
    try:
        wait_for_marker(proc, marker, log)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "final").exists()
    assert [step_of(p) for p in complete_checkpoints(out)] == [2, 4]  # saves are synchronous: 4 was whole before step 5
    assert sorted(read_losses(out)) == list(range(1, 6)), log.read_text()[-3000:]  # step 5, past the checkpoint, was logged

    caplog.set_level("INFO")
    summary = run.main(args)  # the same command line: --resume auto
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in caplog.text
    assert summary["step"] == 8
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9)), steps  # the lines past the checkpoint were rewritten, not duplicated
    resumed = read_losses(out)
    worst = max(abs(resumed[s] - expected[s]) for s in range(1, 9))
    assert worst <= 1e-6, f"max |loss difference| {worst:.2e}: {resumed} vs {expected}"
    assert [step_of(p) for p in complete_checkpoints(out)] == [2, 4, 6, 8] and (out / "final").is_dir()


def test_resume_auto_ignores_torn_checkpoint(corpus, tokenizer_dir, tmp_path, caplog):
    """A checkpoint whose manifest is missing or whose files disagree with it is never resumed from."""
    out = tmp_path / "run"
    pretrain_main(pretrain_args(corpus, tokenizer_dir, out, max_steps=4, save_steps=2))
    torn = out / "checkpoint-4"
    (torn / "optimizer.pt").write_bytes(b"truncated")          # size no longer matches the manifest
    (out / "checkpoint-6.partial").mkdir()                      # a save that never finished
    caplog.set_level("WARNING")
    pretrain_main(pretrain_args(corpus, tokenizer_dir, out, max_steps=5, save_steps=2, resume="auto"))
    assert "skipping damaged checkpoint checkpoint-4" in caplog.text and "a save that did not finish" in caplog.text
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert sorted(read_losses(out)) == [1, 2, 3, 4, 5]


def test_resume_exact_across_an_epoch_boundary(tokenizer_dir, tmp_path):
    """Micro batches per epoch that accumulation does not divide: the epoch still ends at a whole
    global batch (no window spans two epochs), and a resume just past the boundary continues with
    exactly the samples the uninterrupted run used."""
    import shutil

    from transformers import AutoTokenizer

    from trainers.data.synthetic import make_corpus
    from trainers.data.packing import prepare_blocks

    corpus = tmp_path / "small.jsonl"
    make_corpus(corpus, seed=5, n_docs=100)
    blocks = prepare_blocks([str(corpus)], "--train_files", AutoTokenizer.from_pretrained(tokenizer_dir), 32, "text", "", 1000, build=True)
    batches_per_epoch = len(blocks) // 4
    accumulation = next(a for a in (3, 4, 5, 7) if batches_per_epoch % a)   # a window would straddle the boundary
    save_at = batches_per_epoch // accumulation + 1                         # the first step past it
    common = dict(block_size=32, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                  max_steps=save_at + 4, save_steps=save_at, validation_split_ratio=0)
    full = tmp_path / "full"
    pretrain_main(pretrain_args(corpus, tokenizer_dir, full, **common))
    state = json.loads((full / f"checkpoint-{save_at}" / "trainer_state.json").read_text())
    assert (state["epoch"], state["samples_in_epoch"]) == (1, 4 * accumulation), state  # one whole step into epoch 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{save_at}", resumed / f"checkpoint-{save_at}")
    pretrain_main(pretrain_args(corpus, tokenizer_dir, resumed, **common, resume="auto"))
    expected, got = read_losses(full), read_losses(resumed)
    assert sorted(got) == list(range(save_at + 1, save_at + 5))
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)


# block 128 x micro 4 makes a 2-rank step ~0.3 s here: time to kill between two checkpoints
TWO_RANKS = dict(block_size=128, per_device_train_batch_size=4, max_steps=30, save_steps=6, logging_steps=1,
                 record_sample_ids=True, resume="auto")


def two_rank_command(corpus, tokenizer_dir, out, engine: str) -> list[str]:
    extra = {"deepspeed": "ds_configs/zero2.json"} if engine == "zero2" else {}
    return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/pretrain.py",
            *pretrain_args(corpus, tokenizer_dir, out, **TWO_RANKS, **extra)]


def sample_records(out) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / f"sample_ids.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_sigkill_two_ranks_mid_step_then_resume_equals_uninterrupted(engine, corpus, tokenizer_dir, tmp_path):
    reference = tmp_path / "uninterrupted"
    run_launcher(two_rank_command(corpus, tokenizer_dir, reference, engine))
    expected = read_losses(reference)
    expected_ids = sample_records(reference)
    assert [r["step"] for r in expected_ids[0]] == list(range(1, 31))
    first_epoch = [i for records in expected_ids for r in records if r["epoch"] == 0 for i in r["ids"]]
    assert len(first_epoch) == len(set(first_epoch)) == 30 * 2 * 4  # the ranks share out distinct samples

    out = tmp_path / "killed"
    proc = subprocess.Popen(two_rank_command(corpus, tokenizer_dir, out, engine), cwd=REPO,
                            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((out / "checkpoint-12" / MANIFEST).is_file() and (out / "metrics.jsonl").is_file()
                   and max(read_losses(out), default=0) >= 14):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        # everything at once, as a lost node: the ranks and torchrun, no handler runs
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [*map(int, workers), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(workers) == 2, workers
    killed_at = max(read_losses(out))
    assert 14 <= killed_at < 30 and not (out / "final").exists()

    run_launcher(two_rank_command(corpus, tokenizer_dir, out, engine))  # the same command: --resume auto
    resumed = read_losses(out)
    newest_before_kill = max(s for s in (12, 18, 24) if s <= killed_at)
    assert sorted(resumed) == list(range(1, 31))
    worst = max(abs(resumed[s] - expected[s]) for s in range(newest_before_kill + 1, 31))
    assert worst <= 1e-6, f"max |loss difference| {worst:.2e}"
    assert sample_records(out) == expected_ids  # every step's samples, on every rank, in order: none repeated or skipped
