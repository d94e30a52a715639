"""A rank that stops answering (here SIGSTOP, which looks to the others like a rank hung in native
code holding the GIL, or one whose machine disappeared) makes the other rank stop the run within
--hang_timeout plus the launcher's teardown, naming the stuck rank,
instead of everybody waiting in the next collective until --ddp_timeout (30 min) for a gloo/NCCL
timeout that names nobody.

- torchrun, rank 1 stopped: rank 0's watchdog prints `rank 1 (host ..., pid ...) has not been heard
  from for N s ...` and exits with HUNG_EXIT_STATUS; torchrun tears the stopped rank down and exits
  non-zero. The store is torchrun's agent, so it keeps answering.
- the deepspeed launcher, rank 0 stopped: there the store lives inside rank 0's process, so it goes
  silent with it; rank 1 says so (the store at host:port, served by rank 0) and exits the same way.

Time bounds, from the SIGSTOP. The stuck rank's last beat came up to one beat interval before it
(hang_timeout / 4 = 2.5 s here), the survivor sees a beat up to one interval late and judges at its
reads, one interval apart, plus a judge tick of 1 s: the message comes between hang_timeout - 1
interval and hang_timeout + 2 intervals + 1 s (7.5 to 16 s with --hang_timeout 10). Then the
launcher's teardown: it SIGTERMs the stopped rank, which cannot act on it, and SIGKILLs it 30 s
later. Both launchers fix that grace on this path: torchrun 2.13 stops a failed worker group with
`_stop_workers` -> `_shutdown()` at its default 30 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT and
--shutdown_timeout apply only when torchrun itself is signalled; measured: 30.0 s with the variable
at 3), and deepspeed/launcher/launch.py waits psutil.wait_procs(timeout=30). So each case takes
about 10 s to start, 3 steps, ~10 s to detect and 30 s to tear down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, free_port, pretrain_args, read_losses

from trainers.watchdog import HUNG_EXIT_STATUS

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HANG_TIMEOUT = 10
INTERVAL = HANG_TIMEOUT / 4  # trainers.watchdog.default_interval
EARLIEST, DETECTION_BOUND = HANG_TIMEOUT - INTERVAL, HANG_TIMEOUT + 2 * INTERVAL + 1  # see the docstring
LAUNCHER_GRACE = 30  # SIGTERM to SIGKILL, fixed in both launchers on this path (see the docstring)
SLACK = 8  # process exits, the launchers' 0.1 s / 1 s polls, a loaded 2-core machine
# block 128 x micro 4: ~0.3 s a step with two ranks here; 400 steps outlast the test by far
RUN = dict(block_size=128, per_device_train_batch_size=4, max_steps=400, logging_steps=1, save_steps=0,
           save_final=False, hang_timeout=HANG_TIMEOUT)


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full_env["PATH"] = f"{VENV_BIN}:{full_env.get('PATH', '')}"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the run goes on
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the training process of global rank `rank` (one node: RANK == LOCAL_RANK)."""
    for pid in descendants(launcher_pid):
        try:
            env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("LOCAL_RANK") == str(rank) and env.get("RANK") == str(rank):
            return pid
    raise AssertionError(f"no worker with rank {rank} under pid {launcher_pid}")


def wait_for_steps(out: Path, proc: subprocess.Popen, log: Path, steps: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and len(read_losses(out)) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {steps}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {steps} after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_and_time(proc: subprocess.Popen, log: Path, victim: int, needle: str, limit: float) -> tuple[float, float | None, str]:
    """SIGSTOP `victim`; (seconds to the launcher's exit, seconds to the first line containing
    `needle`, the output)."""
    os.kill(victim, signal.SIGSTOP)
    stopped, said = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - stopped < limit:
        if said is None and needle in log.read_text():
            said = time.monotonic() - stopped
        time.sleep(0.1)
    exited = time.monotonic() - stopped
    output = log.read_text()
    if said is None and needle in output:
        said = exited
    return exited, said, output


def clean_up(proc: subprocess.Popen, pids: list[int]) -> None:
    """Whatever is left of the run: continue the stopped rank, kill it and the launcher's group."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def the_watchdog_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "hang watchdog on rank" in line]
    assert lines, output[-6000:]
    return lines[0]


def test_torchrun_a_stopped_rank_is_named_and_the_run_ends(corpus, tokenizer_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/pretrain.py",
           *pretrain_args(corpus, tokenizer_dir, out, **RUN)]
    proc = start(cmd, log, env={})
    victims: list[int] = []
    try:
        wait_for_steps(out, proc, log, 3)
        victims.append(worker_with_rank(proc.pid, 1))
        limit = DETECTION_BOUND + LAUNCHER_GRACE + SLACK
        exited, said, output = stop_and_time(proc, log, victims[0], "has not been heard from", limit + 30)
        print(f"torchrun: SIGSTOP of rank 1 -> rank 0's message after {said} s, torchrun's exit after {exited:.1f} s")
        assert proc.returncode not in (None, 0), output[-6000:]
        line = the_watchdog_line(output)
        assert f"hang watchdog on rank 0: rank 1 (host {os.uname().nodename}, pid {victims[0]}) has not been heard from for" in line, line
        assert "(last at step " in line and f"stopping rank 0 (--hang_timeout {HANG_TIMEOUT})" in line, line
        assert f"exitcode  : {HUNG_EXIT_STATUS}" in output, output[-6000:]  # torchrun's report of rank 0
        assert said is not None and EARLIEST - 0.5 <= said <= DETECTION_BOUND + SLACK / 2, said
        assert exited <= limit, f"torchrun took {exited:.1f} s to exit (bound {limit} s)\n{output[-4000:]}"
    finally:
        clean_up(proc, victims)


def test_deepspeed_launcher_rank_0_stopped_takes_the_store_and_rank_1_says_so(corpus, tokenizer_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "deepspeed.log"
    port = free_port()
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py",
           *pretrain_args(corpus, tokenizer_dir, out, **RUN, deepspeed="none")]
    proc = start(cmd, log, env={})
    victims: list[int] = []
    try:
        wait_for_steps(out, proc, log, 3)
        victims.append(worker_with_rank(proc.pid, 0))
        limit = DETECTION_BOUND + LAUNCHER_GRACE + SLACK
        exited, said, output = stop_and_time(proc, log, victims[0], "has not answered", limit + 30)
        print(f"deepspeed: SIGSTOP of rank 0 -> rank 1's message after {said} s, the launcher's exit after {exited:.1f} s")
        assert proc.returncode == HUNG_EXIT_STATUS, output[-6000:]  # the deepspeed launcher passes the first failure's on
        line = the_watchdog_line(output)
        assert f"hang watchdog on rank 1: the store at 127.0.0.1:{port} (served by rank 0 under this launcher) has not answered for" in line, line
        assert f"rank 0 is stopped, hung, or its machine or the network to it is gone; stopping rank 1 (--hang_timeout {HANG_TIMEOUT})" in line, line
        assert said is not None and EARLIEST - 0.5 <= said <= DETECTION_BOUND + SLACK / 2, said
        assert exited <= limit, f"the deepspeed launcher took {exited:.1f} s to exit (bound {limit} s)\n{output[-4000:]}"
    finally:
        clean_up(proc, victims)
