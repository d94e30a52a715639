"""The one error type a user can cause, and how entry scripts turn it into exit status 2."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """Bad config or bad input. The message is one line that names the flag, file, line or
    sample at fault and says how to fix it; entry scripts print it and exit with status 2."""


def exit_on_usage_error(main):
    """Decorate an entry point: a UsageError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USAGE_EXIT_CODE)

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
