"""Save at step k, SIGKILL the process mid-run, `--resume auto` to step n: the losses of steps
k+1..n equal the uninterrupted run's to 1e-6 (CPU, fp32, same samples in the same order)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, pretrain_args, read_losses, run_launcher
from launch.pretrain import main as pretrain_main
from trainers.checkpoint import MANIFEST, complete_checkpoints

pytestmark = pytest.mark.slow


def test_sigkill_then_resume_equals_uninterrupted(corpus, tokenizer_dir, tmp_path):
    # block 128 x micro 8 makes a step ~50 ms here: slow enough to kill between checkpoints
    common = dict(block_size=128, per_device_train_batch_size=8, max_steps=60, save_steps=8, logging_steps=1)
    reference = tmp_path / "uninterrupted"
    pretrain_main(pretrain_args(corpus, tokenizer_dir, reference, **common))
    expected = read_losses(reference)

    out = tmp_path / "killed"
    argv = [sys.executable, "launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, **common, resume="auto")]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-16" / MANIFEST).is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "final").exists(), "killed too late: the run had finished"
    killed_at = max(read_losses(out))
    assert killed_at < 60

    run_launcher(argv)  # resume auto
    newest_complete = 16
    resumed = read_losses(out)
    assert sorted(resumed) == list(range(1, 61))   # metrics past the checkpoint were rewritten, not duplicated
    for step in range(newest_complete + 1, 61):
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])
    assert [p.name for p in complete_checkpoints(out)][-1] == "checkpoint-56"


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
    """An accumulation window that spans two epochs, then a save: a resume from it must continue
    with exactly the samples the uninterrupted run used."""
    import shutil

    from transformers import AutoTokenizer

    from launch.demo import make_corpus
    from trainers.data.packing import prepare_blocks

    corpus = tmp_path / "small.jsonl"
    make_corpus(corpus, seed=5, n_docs=100)
    blocks = prepare_blocks([str(corpus)], "--train_files", AutoTokenizer.from_pretrained(tokenizer_dir), 32, "text", "", 1000, build=True)
    batches_per_epoch = len(blocks) // 4
    accumulation = next(a for a in (3, 4, 5, 7) if batches_per_epoch % a)   # so a window straddles the boundary
    save_at = batches_per_epoch // accumulation + 1                         # the first step past it
    common = dict(block_size=32, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                  max_steps=save_at + 4, save_steps=save_at, validation_split_ratio=0)
    full = tmp_path / "full"
    pretrain_main(pretrain_args(corpus, tokenizer_dir, full, **common))
    state = json.loads((full / f"checkpoint-{save_at}" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["samples_in_epoch"] < 4 * accumulation, state
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{save_at}", resumed / f"checkpoint-{save_at}")
    pretrain_main(pretrain_args(corpus, tokenizer_dir, resumed, **common, resume="auto"))
    expected, got = read_losses(full), read_losses(resumed)
    assert sorted(got) == list(range(save_at + 1, save_at + 5))
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)
