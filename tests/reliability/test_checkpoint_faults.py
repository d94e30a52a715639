"""Checkpoints under faults: a rank killed while a checkpoint is being written, a write that fails
part-way (a full disk), and a checkpoint damaged on disk afterwards (a flipped byte, a truncated or
missing file). In every case the next start resumes from the newest checkpoint that is still
whole, and says which one it skipped and why; nothing partial is ever taken for complete, and a run
never silently starts over from fresh state.

Faults are injected by tests/reliability/faults.py (two gloo pretraining ranks under torchrun) or
by editing the files (one process, every training stage: conftest.TRAINING_STAGES). Loss tolerance
1e-6 against an uninterrupted run, as in test_resume.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, TRAINING_STAGES, VENV_BIN, free_port, pretrain_args, read_losses, run_launcher

from launch.pretrain import main as pretrain_main
from trainers.checkpoint import MANIFEST, complete_checkpoints

pytestmark = [pytest.mark.reliability]
FAULTS = str(REPO / "tests" / "reliability" / "faults.py")
TWO_RANKS = dict(block_size=64, per_device_train_batch_size=4, max_steps=12, save_steps=4, logging_steps=1, resume="auto")


def torchrun(corpus, tokenizer_dir, out, fault: dict | None = None, **extra) -> list[str]:
    entry = [FAULTS, "launch/pretrain.py"] if fault else ["launch/pretrain.py"]
    return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *entry,
            *pretrain_args(corpus, tokenizer_dir, out, **TWO_RANKS, **extra)]


def run_with_fault(argv: list[str], fault: dict):
    import os
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINRIG_FAULT": json.dumps(fault), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_rank_reference(corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_launcher(torchrun(corpus, tokenizer_dir, out))
    return read_losses(out)


def assert_resumes_from(out, step: int, expected: dict, output: str, tolerance: float = 1e-6) -> None:
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in output, output[-3000:]
    got = read_losses(out)
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= tolerance, f"max |loss difference| {worst:.2e}"


@pytest.mark.slow
def test_rank_killed_while_writing_a_checkpoint(two_rank_reference, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "killed_in_save"
    fault = {"kind": "kill_in_save", "rank": 1, "step": 8}
    proc = run_with_fault(torchrun(corpus, tokenizer_dir, out, fault=fault), fault)
    assert proc.returncode != 0
    assert (out / "checkpoint-8.partial").is_dir() and not (out / "checkpoint-8.partial" / MANIFEST).exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]

    resumed = run_launcher(torchrun(corpus, tokenizer_dir, out))
    assert f"ignoring {out / 'checkpoint-8.partial'}: a save that did not finish" in resumed.stdout
    assert_resumes_from(out, 4, two_rank_reference, resumed.stdout)
    assert not (out / "checkpoint-8.partial").exists()  # the resumed run wrote checkpoint-8 over it


@pytest.mark.slow
@pytest.mark.parametrize("engine,rank,file", [("ddp", 0, "optimizer.pt"), ("zero2", 1, "optim_states.pt")])
def test_checkpoint_write_fails_part_way(two_rank_reference, corpus, tokenizer_dir, tmp_path, engine, rank, file):
    """DDP: rank 0 writes the model and optimizer. ZeRO-2: each rank writes its optimizer shard;
    rank 1's fails while rank 0 waits in DeepSpeed's own barrier, which must not hang."""
    out = tmp_path / "disk_full"
    extra = {"deepspeed": "ds_configs/zero2.json"} if engine == "zero2" else {}
    fault = {"kind": "fail_write", "rank": rank, "step": 8, "file": file}
    proc = run_with_fault(torchrun(corpus, tokenizer_dir, out, fault=fault, **extra), fault)
    assert proc.returncode != 0
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert f"error: rank {rank}: writing {out / 'checkpoint-8.partial'} failed (OSError: [Errno 28] No space left on device" in error
    assert f"{out / 'checkpoint-4'} is intact" in error and "--resume auto" in error
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]
    assert not (out / "checkpoint-8").exists() and not (out / "final").exists()

    resumed = run_launcher(torchrun(corpus, tokenizer_dir, out, **extra))
    # ZeRO-2 reduces flattened buckets, DDP per-parameter buckets: sums in another order (see test_distributed.py)
    assert_resumes_from(out, 4, two_rank_reference, resumed.stdout, tolerance=1e-6 if engine == "ddp" else 1e-5)


def test_write_failure_in_a_single_process_exits_1(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    import errno

    import torch

    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4.partial" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(pretrain_args(corpus, tokenizer_dir, out, max_steps=6, save_steps=2))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: rank 0: writing") and "No space left on device" in error and "checkpoint-2 is intact" in error
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]


# ----------------------------------------------------------------- damaged after writing


@pytest.fixture(scope="module")
def saved_run(stage_run, tmp_path_factory):
    """saved_run(stage): an 8-step one-process run of the stage with checkpoint-2, -4, -6 and -8
    (built once per stage in this module)."""
    cache = {}

    def get(stage: str):
        if stage not in cache:
            run, out = stage_run(stage), tmp_path_factory.mktemp(f"saved_{stage}") / "run"
            run.main(run.args(out, max_steps=8, save_steps=2))
            cache[stage] = out
        return cache[stage]

    return get


def damage(path, how: str) -> None:
    if how == "flip":  # same size: only the hash can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.unlink()


def interrupted_copy(saved, out):
    """The saved run as if it had stopped after checkpoint-6: no checkpoint-8, no final/."""
    shutil.copytree(saved, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-8")
    return out


@pytest.mark.parametrize("stage", TRAINING_STAGES)
@pytest.mark.parametrize("name,how,problem", [
    ("model.safetensors", "flip", "does not match its sha256"),
    ("optimizer.pt", "truncate", "bytes, the manifest says"),
    ("rng_state_0.pt", "delete", "is missing"),
    ("trainer_state.json", "flip", "does not match its sha256"),
])
def test_damaged_newest_checkpoint_falls_back_and_says_so(stage, stage_run, saved_run, tmp_path, caplog, capsys, name, how, problem):
    run, saved = stage_run(stage), saved_run(stage)
    out = interrupted_copy(saved, tmp_path / "run")
    damage(out / "checkpoint-6" / name, how)

    # an explicit path to it: refused, naming the file
    with pytest.raises(SystemExit) as exit_info:
        run.main(run.args(out, max_steps=8, save_steps=2, resume=str(out / "checkpoint-6")))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out / 'checkpoint-6' / name}" in error and problem in error, error

    # --resume auto: the previous complete checkpoint, with a warning naming the file
    caplog.set_level("INFO")
    summary = run.main(run.args(out, max_steps=8, save_steps=2, resume="auto"))
    assert f"skipping damaged checkpoint checkpoint-6: {out / 'checkpoint-6' / name}" in caplog.text and problem in caplog.text
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in caplog.text
    assert summary["step"] == 8
    # from checkpoint-4's state, steps 5-8 are the saved run's own (a fresh start or a wrong state would differ)
    got, expected = read_losses(out), read_losses(saved)
    assert sorted(got) == list(range(1, 9))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= 1e-6, f"max |loss difference| {worst:.2e}"


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(stage, stage_run, saved_run, tmp_path, capsys):
    run = stage_run(stage)
    out = interrupted_copy(saved_run(stage), tmp_path / "run")
    for step in (2, 4, 6):
        damage(out / f"checkpoint-{step}" / "model.safetensors", "flip")
    with pytest.raises(SystemExit) as exit_info:
        run.main(run.args(out, max_steps=8, save_steps=2, resume="auto"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--resume auto: no checkpoint in {out} verifies (checkpoint-6:" in error and "checkpoint-2:" in error
    assert "--resume never" in error
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6  # nothing was overwritten
    assert not (out / "final").exists()
