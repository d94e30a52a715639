"""Stopping on a signal outside Slurm: SIGTERM to a plain `python launch/<stage>.py` of every
training stage (conftest.TRAINING_STAGES), SIGUSR2 to one pretraining torchrun rank only (with a
second signal to the other rank while the stop checkpoint is being written), and SIGTERM to
torchrun itself (what a scheduler does). Each run stops at a step boundary
with one complete checkpoint and exit status 75, and `--resume auto` continues to the losses of an
uninterrupted run.

Loss tolerance 1e-6, as in test_resume.py: the same fp32 CPU computation on the same samples in
the same order, with two gloo ranks reducing in a fixed order; a lost batch or optimizer state
moves the losses by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TRAINING_STAGES, VENV_BIN, free_port, pretrain_args, read_losses, run_launcher
from faults import start_with_fault, wait_for_marker

from trainers import stopping
from trainers.checkpoint import complete_checkpoints, step_of

pytestmark = [pytest.mark.reliability]
TOLERANCE = 1e-6
# the torchrun case: block 128 x micro 8 makes a step ~50 ms here (~0.3 s with two ranks), slow enough to signal mid-run
COMMON = dict(block_size=128, per_device_train_batch_size=8, max_steps=40, logging_steps=1, save_steps=0)


class FakeRuntime:
    world_size = 1

    def all_reduce_sum(self, values):
        return values


def test_the_handler_only_records_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    runtime = FakeRuntime()
    with stopping.stop_on_signals():
        assert stopping.agreed_stop(runtime) is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while "saving": recorded, nothing else
        assert stopping.agreed_stop(runtime) == "a stop signal reached 1 of 1 rank(s) (SIGUSR2 here)"
    assert signal.getsignal(signal.SIGTERM) is before
    assert stopping.agreed_stop(runtime) is None  # nothing carried over to the next run in this process


def test_status_file_is_replaced_whole(tmp_path):
    target = tmp_path / "logs" / "job.status.json"
    stopping.write_status(str(target), {"status": "stopped", "step": 3})
    stopping.write_status(str(target), {"status": "completed", "step": 9})
    assert json.loads(target.read_text()) == {"status": "completed", "step": 9}
    assert [p.name for p in target.parent.iterdir()] == ["job.status.json"]
    stopping.write_status(None, {"status": "completed"})  # unset: nothing written, no error


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out, proc: subprocess.Popen, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(read_losses(out)) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {steps}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no step {steps} after {timeout} s")


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    output, _ = proc.communicate(timeout=timeout)
    return output


def assert_same_losses(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= TOLERANCE, f"max |loss difference| {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_sigterm_to_a_single_process_saves_exits_75_and_resumes(stage, stage_run, reference_losses, tmp_path):
    """SIGTERM from outside while the process is in step 4's forward pass (held there by faults.py
    until the signal is sent, so no timing decides the step): it finishes step 4, writes
    checkpoint-4 (no --save_steps: the only checkpoint), exits 75; the same command resumes to the
    uninterrupted run's losses."""
    run = stage_run(stage)
    expected = reference_losses(stage, max_steps=8)

    out, status, marker, log = tmp_path / "stopped", tmp_path / "status.json", tmp_path / "paused", tmp_path / "stopped.log"
    args = run.args(out, max_steps=8, save_steps=0, resume="auto")
    env = {stopping.STATUS_FILE_ENV: str(status)}
    proc = start_with_fault([run.script, *args], {"kind": "pause_in_forward", "call": 4, "marker": str(marker)}, log, env=env)
    try:
        wait_for_marker(proc, marker, log)
        proc.send_signal(signal.SIGTERM)
        Path(f"{marker}.go").touch()
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == stopping.STOPPED_EXIT_STATUS, output[-4000:]
    (checkpoint,) = complete_checkpoints(out)
    outcome = json.loads(status.read_text())
    assert outcome["status"] == "stopped" and outcome["step"] == step_of(checkpoint) == 4, (outcome, checkpoint)
    assert "SIGTERM here" in outcome["reason"] and not (out / "final").exists()
    assert sorted(read_losses(out)) == [1, 2, 3, 4]

    run_launcher([sys.executable, run.script, *args], env=env)  # the same command again
    outcome = json.loads(status.read_text())
    assert outcome["status"] == "completed" and outcome["resumed_from_step"] == 4, outcome
    assert_same_losses(expected, read_losses(out))
    assert (out / "final" / "config.json").is_file()


@pytest.mark.slow
def test_torchrun_one_rank_signalled_then_torchrun_terminated_then_resumed(corpus, tokenizer_dir, tmp_path):
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"]
    common = dict(COMMON, per_device_train_batch_size=4)

    def command(out, port, entry=("launch/pretrain.py",)):
        return [*torchrun, "--master_port", str(port), *entry,
                *pretrain_args(corpus, tokenizer_dir, out, **common, resume="auto")]

    reference = tmp_path / "uninterrupted"
    run_launcher(command(reference, free_port()))
    out, status = tmp_path / "stopped", tmp_path / "status.json"
    env = {stopping.STATUS_FILE_ENV: str(status), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    # 1) SIGUSR2 to rank 1 alone: rank 0 never saw it, yet both stop after the same step; and rank 0
    #    gets a second signal (SIGTERM) as it starts writing that stop checkpoint (tests/reliability/faults.py)
    second_signal = {"kind": "signal_in_save", "rank": 0, "signal": "SIGTERM"}
    proc = start(command(out, free_port(), entry=(str(REPO / "tests" / "reliability" / "faults.py"), "launch/pretrain.py")),
                 env={**env, "TRAINRIG_FAULT": json.dumps(second_signal)})
    wait_for_steps(out, proc, 5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(sorted(workers, key=int)[1]), signal.SIGUSR2)
    output = finish(proc)
    assert proc.returncode != 0, output[-4000:]  # torchrun reports its workers' 75 as a failure
    assert "exitcode  : 75" in output and "exitcode  : 1" not in output, output[-4000:]  # both ranks: 75
    first = json.loads(status.read_text())
    assert first["status"] == "stopped" and "reached 1 of 2 rank(s)" in first["reason"], first
    (checkpoint,) = complete_checkpoints(out)
    assert step_of(checkpoint) == first["step"]
    assert {p.name for p in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}

    # 2) SIGTERM to torchrun, as a scheduler stops a job: it forwards SIGTERM to both ranks
    proc = start(command(out, free_port()), env=env)
    wait_for_steps(out, proc, first["step"] + 5)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc)
    second = json.loads(status.read_text())
    assert second["status"] == "stopped" and second["resumed_from_step"] == first["step"] < second["step"], (second, output[-4000:])
    assert step_of(complete_checkpoints(out)[-1]) == second["step"]

    # 3) the same command once more runs to the end, with the uninterrupted run's losses
    run_launcher(command(out, free_port()), env=env)
    assert json.loads(status.read_text())["status"] == "completed"
    assert_same_losses(read_losses(reference), read_losses(out))
