"""torch's JIT extension builds, and the lock a killed one leaves behind.

Each process that loads a JIT-built op (DeepSpeed's CPU comm op on every CPU run, its CPU Adam for
offload) takes `<build dir>/<op>/lock` while ninja checks or builds the op, built before or not,
and deletes it when done; a process killed meanwhile leaves it, and every later load waits on it
forever, silently. Torch-free at import: `trainrig doctor` calls this where torch may not import.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from trainers.errors import UsageError

# DeepSpeed's builds took 60-110 s on this project's 2-core machine; a lock 15 minutes old belongs
# to no running build.
STALE_BUILD_LOCK_S = 900


def extension_build_dir() -> Path:
    """Where this torch builds its JIT extensions: $TORCH_EXTENSIONS_DIR, else torch's default
    root plus its python/accelerator folder (as torch.utils.cpp_extension._get_build_directory)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def put_this_pythons_ninja_first() -> None:
    """Put this interpreter's bin folder first on PATH when it holds ninja (DeepSpeed's dependency).

    torch runs `ninja` by name from PATH. A venv that is not activated (`.venv/bin/python
    launch/...`, the Slurm scripts' TRAINRIG_PYTHON) leaves its own ninja off PATH, so torch builds
    with the system's ninja, or fails with "Ninja is required" where there is none. And ninja 1.11
    and 1.13 hash the build commands differently: each switch between the two rebuilt DeepSpeed's
    CPU comm op (45 s on 2 cores), twice in one test-suite run before this, besides the first build.
    """
    bin_dir = Path(sys.executable).parent
    ninja = bin_dir / "ninja"
    if ninja.is_file() and shutil.which("ninja") != str(ninja):
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])


def stale_build_locks(build_dir: Path, now: float, min_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """The op locks in build_dir at least min_age_s old."""
    stale = []
    for lock in sorted(build_dir.glob("*/lock")):
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # its build just finished and removed it
            continue
        if age >= min_age_s:
            stale.append(lock)
    return stale


def refuse_stale_build_locks() -> None:
    """Exit 2 naming the lock, rather than let DeepSpeed wait on it forever."""
    now = time.time()
    stale = stale_build_locks(extension_build_dir(), now)
    if stale:
        minutes = (now - stale[0].stat().st_mtime) / 60
        raise UsageError(f"{stale[0]}: left {minutes:.0f} min ago by an interrupted load or build of the {stale[0].parent.name} "
                         f"extension, and DeepSpeed would wait on it forever; delete it (rm {stale[0]}) and run again")
