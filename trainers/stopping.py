"""Stopping early on a signal: at the next step boundary, every rank together, with one complete
checkpoint, and a distinct exit status.

SIGUSR2 is what slurm/*.sbatch deliver ahead of a time limit or a preemption
(`--signal=B:USR2@<seconds>`; USR2 because NCCL may take USR1). SIGTERM is what a scheduler sends
first and what torchrun forwards to its workers when it is terminated itself.

The handler only records the signal. Anything more (logging, raising) could run in the middle of a
checkpoint write, and a second signal during that save must not tear it. The loop asks
`agreed_stop` after each optimizer step; the answer is all-reduced, so a signal that reached one
rank stops every rank after the same step (a rank stopping alone would leave the others blocked in
their next collective).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

# sysexits.h EX_TEMPFAIL, "try again later": stopped on a signal after saving a complete checkpoint;
# running the same command again (--resume auto) continues from it. slurm/common.sh requeues on it.
STOPPED_EXIT_STATUS = 75
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# where rank 0 writes how the run ended, when set (slurm/common.sh sets it to decide on a requeue)
STATUS_FILE_ENV = "TRAINRIG_STATUS_FILE"

_received: list[str] = []  # names of the signals this process received since the handlers went in


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """Record SIGUSR2/SIGTERM instead of dying while a run is inside this block. The entry scripts
    own their process, so they install it; a trainer called in-process (tests, the demo) runs
    without it and is never asked to stop."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()  # a later in-process run must not inherit this one's stop


def agreed_stop(runtime) -> str | None:
    """Called by every rank after every optimizer step: None to go on, else why all ranks stop
    now. One scalar all-reduce (tens of microseconds, against steps of tenths of seconds)."""
    note_step = getattr(runtime, "note_step", None)  # the hang watchdog's step count (a test's fake runtime has none)
    if note_step is not None:
        note_step()
    (ranks,) = runtime.all_reduce_sum([1.0 if _received else 0.0])
    if not ranks:
        return None
    mine = f" ({_received[0]} here)" if _received else ""
    return f"a stop signal reached {int(ranks)} of {runtime.world_size} rank(s){mine}"


def write_status(path: str | None, status: dict) -> None:
    """The run's outcome as JSON at `path` (from $TRAINRIG_STATUS_FILE), written whole or not
    at all: a reader never sees half of it."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(partial, target)


def run_as_process(main, argv: list[str]) -> int:
    """An entry script's whole process: the run with the signal handlers in, then its exit status
    (0, or STOPPED_EXIT_STATUS after a stop), leaving through runtime.exit_process once a
    multi-rank run has finished."""
    from trainers.runtime import exit_process

    with stop_on_signals():  # still in while a multi-rank run leaves: a late signal changes nothing then
        summary = main(argv)
        status = STOPPED_EXIT_STATUS if summary.get("stopped") else 0
        exit_process(status)  # a multi-rank run ends here, past the process group's teardown (Runtime.end)
    return status
