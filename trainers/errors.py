"""The one error type a user can cause, and how entry scripts turn it into exit status 2."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

USAGE_EXIT_CODE = 2
RUN_FAILED_EXIT_CODE = 1


class UsageError(Exception):
    """Bad config or bad input. The message is one line that names the flag, file, line or
    sample at fault and says how to fix it; entry scripts print it and exit with status 2."""


class RunFailed(Exception):
    """The run cannot go on for a reason outside the config (a checkpoint write failed, the loss
    stayed NaN): one line saying what happened, what on disk is still good and what to run next.
    Entry scripts print it without a traceback and exit with status 1."""


def exit_on_usage_error(main):
    """Decorate an entry point: a UsageError becomes `error: <message>` on stderr and exit 2, a
    RunFailed the same with exit 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USAGE_EXIT_CODE)
        except RunFailed as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(RUN_FAILED_EXIT_CODE)

    return wrapper


def check_output_dir(path: Path) -> None:
    """Create --output_dir and prove it writable, before any long work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--output_dir {path}: not writable ({err.strerror}); choose a directory you can write to") from None
