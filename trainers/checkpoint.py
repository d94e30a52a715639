"""Checkpoint directories: atomic writes, completeness checks, retention, picking one to resume.

A checkpoint is written by every rank into `checkpoint-<step>.partial/`; after a barrier rank 0
writes `trainrig_complete.json` (the manifest: every file and its size) and renames the
directory to `checkpoint-<step>/`. A directory counts as complete only if it has that name, the
manifest, and every listed file at its listed size, so a run killed mid-save (or a torn copy)
is never resumed from. Old checkpoints are deleted only after the new one is complete.

What is in one: model and optimizer state (runtime.save_training_state: DeepSpeed's shards, or
model.safetensors + optimizer.pt), `trainer_state.json` (step counters, data position, batch
shape, best eval loss; the learning rate is a function of the step, so no scheduler state) and `rng_state_<rank>.pt` for every rank. Every file loads with
`torch.load(weights_only=True)` or is JSON/safetensors: nothing in it can run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainers.errors import UsageError

log = logging.getLogger("trainrig.checkpoint")

MANIFEST = "trainrig_complete.json"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def manifest_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return f"{manifest} is unreadable"
    for rel, size in files.items():
        member = path / rel
        if not member.is_file():
            return f"{member} is missing"
        if member.stat().st_size != size:
            return f"{member} has {member.stat().st_size} bytes, the manifest says {size}"
    return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted((p for p in found if manifest_problem(p) is None), key=step_of)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """--resume auto|never|PATH -> the checkpoint to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        complete = complete_checkpoints(output_dir)
        torn = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p not in complete]
        for p in torn:
            log.warning("ignoring incomplete checkpoint %s: %s", p, manifest_problem(p) or "partial write")
        return complete[-1] if complete else None
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint directory; use --resume auto or a checkpoint-<step>/ path")
    problem = manifest_problem(path)
    if problem:
        raise UsageError(f"--resume {resume}: not a complete checkpoint ({problem}); use --resume auto to take the newest complete one")
    return path


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This rank's RNG streams, as tensors and plain lists (weights_only-loadable)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save/load


def save_checkpoint(runtime, model, optimizer, trainer_state: dict, output_dir: Path, step: int) -> Path:
    """Write checkpoint-<step>/ atomically (all ranks call this)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    runtime.barrier()
    runtime.save_training_state(model, optimizer, partial)
    torch.save(rng_state(), partial / f"rng_state_{runtime.rank}.pt")
    if runtime.is_main:
        (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    runtime.barrier()  # every rank's files are on disk before the manifest vouches for them
    if runtime.is_main:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        _write_durably(partial / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # a stale one from an earlier run of the same output_dir
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
    runtime.barrier()
    return final


def load_checkpoint(runtime, model, optimizer, path: Path, expect: dict) -> dict:
    """Restore model, optimizer and this rank's RNG; return trainer_state. `expect`: settings the
    checkpoint must have been saved with (batch shape), checked before anything is loaded."""
    problem = manifest_problem(path)
    if problem:
        raise RuntimeError(f"cannot resume from {path}: {problem}")
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != runtime.world_size:
        raise UsageError(f"{path} was saved by {state['world_size']} ranks, this run has {runtime.world_size}; "
                         f"resume with the same number of ranks (data order and optimizer shards depend on it)")
    for key, now in expect.items():
        if state.get(key) != now:
            raise UsageError(f"{path} was saved with {key} {state.get(key)}, this run uses {now}; "
                             f"resume with the same batch settings or start a new --output_dir")
    runtime.load_training_state(model, optimizer, path)
    rng_file = path / f"rng_state_{runtime.rank}.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def prune_checkpoints(output_dir: Path, keep: int, best: Path | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (and the best one). Rank 0 only."""
    if keep <= 0:
        return
    complete = complete_checkpoints(output_dir)
    for path in complete[:-keep]:
        if best is not None and path.resolve() == best.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("deleted %s (--save_total_limit %d)", path, keep)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
