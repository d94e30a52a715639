"""The training stages the fault suite covers: every core case of tests/reliability/ (SIGKILL and
resume, SIGTERM and resume, a damaged checkpoint, a NaN step, bad training files) is parametrised
over TRAINING_STAGES.

A new stage is covered by adding its name here and its tiny command line to _STAGE_SPECS in
tests/conftest.py (the `stage_run` fixture refuses a stage without one). tests/test_stages.py checks
that this list is the trainers' stage registry.

Nothing heavy is imported here: tests/conftest.py and the test modules import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo")


class StageRun(NamedTuple):
    """How a test runs one stage (conftest's `stage_run(stage)`): `script`, the entry script
    relative to the repository root; `args(output_dir, **overrides)`, a tiny, fast command line
    (overrides are flag=value, None drops the flag, as in conftest.pretrain_args); `main`, the
    entry script's main(argv), in-process; `train_file`, the training data `args` uses, for tests
    that derive a broken copy; `fail_fast`, the flags under which a malformed training record stops
    the run with exit 2 (SFT skips and counts bad samples by default)."""

    script: str
    args: Callable[..., list[str]]
    main: Callable[[list[str]], dict]
    train_file: Path
    fail_fast: dict
