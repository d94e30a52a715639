"""Checkpoint directories: atomic writes, completeness checks, retention, picking one to resume.

A checkpoint is written by every rank into `checkpoint-<step>.partial/`; after a barrier the
ranks hash its files (each rank a share, sha256), rank 0 writes `trainrig_complete.json` (the
manifest: every file, its size and its hash) and renames the directory to `checkpoint-<step>/`.
A directory counts as complete only if it has that name, the manifest, and every listed file at
its listed size; before a resume the hashes are checked too. So a run killed mid-save, a torn copy
or a flipped byte is never resumed from: `--resume auto` falls back to the newest checkpoint that
verifies and says which one it skipped and why. Old checkpoints are deleted only after the new one
is complete.

What is in one: model and optimizer state (runtime.save_training_state: DeepSpeed's shards, or
model.safetensors + optimizer.pt), `trainer_state.json` (step counters, data position, batch
shape, best eval loss; the learning rate is a function of the step, so no scheduler state) and `rng_state_<rank>.pt` for every rank. Every file loads with
`torch.load(weights_only=True)` or is JSON/safetensors: nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainers.errors import RunFailed, UsageError

log = logging.getLogger("trainrig.checkpoint")

MANIFEST = "trainrig_complete.json"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def manifest_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is: the manifest and every file it
    lists at its listed size (cheap; `verify` also checks the hashes)."""
    files = _manifest_files(path)
    if isinstance(files, str):
        return files
    for rel, entry in files.items():
        member = path / rel
        size = entry["bytes"] if isinstance(entry, dict) else entry  # 0.5.0 manifests: sizes only
        if not member.is_file():
            return f"{member} is missing"
        if member.stat().st_size != size:
            return f"{member} has {member.stat().st_size} bytes, the manifest says {size}"
    return None


def verify(path: Path, runtime=None) -> str | None:
    """manifest_problem, then every file's sha256 against the manifest; with a runtime the ranks
    hash a share each (all ranks must call). Why the checkpoint cannot be trusted, or None."""
    problem = manifest_problem(path)
    if problem is None:
        files = sorted(_manifest_files(path).items())
        rank, world = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
        mismatched = [f"{path / rel} does not match its sha256 in {MANIFEST} (the file changed after it was written)"
                      for rel, entry in files[rank::world]
                      if isinstance(entry, dict) and file_sha256(path / rel) != entry["sha256"]]
        problem = (runtime.gather_objects(mismatched) if runtime is not None else mismatched) or [None]
        problem = problem[0]
    elif runtime is not None:
        runtime.gather_objects([])  # the other ranks hash and gather; join them
    return problem


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # ~1.5 GB/s with SHA-NI


def _manifest_files(path: Path) -> dict | str:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        return json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return f"{manifest} is unreadable"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in checkpoint_dirs(output_dir) if manifest_problem(p) is None]


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>/` (renamed from .partial, so complete when written), oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def resolve_resume(resume: str, output_dir: Path, runtime=None, hashes: bool = True) -> Path | None:
    """--resume auto|never|PATH -> the checkpoint to load, or None to start fresh. All ranks call
    this (they share the hashing). auto takes the newest checkpoint that verifies; one that does
    not is skipped with a warning naming the file, and if checkpoints exist but none verifies the
    run stops rather than start over from scratch. hashes=False checks sizes only (a preview,
    e.g. the Slurm job header, before the ranks start)."""
    if resume == "never":
        return None
    check = verify if hashes else (lambda path, _: manifest_problem(path))
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"--resume {resume}: no such checkpoint directory; use --resume auto or a checkpoint-<step>/ path")
        problem = check(path, runtime)
        if problem:
            raise UsageError(f"--resume {resume}: not a complete checkpoint ({problem}); use --resume auto to take the newest complete one")
        return path
    for unfinished in sorted(output_dir.glob("checkpoint-*.partial")):
        log.warning("ignoring %s: a save that did not finish (the run stopped while writing it)", unfinished)
    damaged = []
    for path in reversed(checkpoint_dirs(output_dir)):
        problem = check(path, runtime)
        if problem is None:
            if damaged:
                log.warning("resuming from %s, the newest checkpoint that verifies", path)
            return path
        log.warning("skipping damaged checkpoint %s: %s", path.name, problem)
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise UsageError(f"--resume auto: no checkpoint in {output_dir} verifies ({'; '.join(damaged)}); restore them from a copy, "
                         f"or start over with --resume never and a new --output_dir")
    return None


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
    """Write checkpoint-<step>/ atomically (all ranks call this). A write that fails (a full disk)
    stops the run with RunFailed; the .partial directory is never renamed, so the previous
    checkpoint stays the newest complete one."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    runtime.barrier()
    try:
        runtime.save_training_state(model, optimizer, partial)
        torch.save(rng_state(), partial / f"rng_state_{runtime.rank}.pt")
        if runtime.is_main:
            (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    except Exception as err:  # OSError (ENOSPC, EDQUOT, EIO) or whatever the engine's writer raised
        # this rank leaves without another collective: the others may be inside DeepSpeed's own
        # barrier, so the launcher stops them when this process exits
        previous = complete_checkpoints(output_dir)
        keep = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise RunFailed(f"rank {runtime.rank}: writing {partial} failed ({type(err).__name__}: {err}); {keep}. Free space "
                        f"(or fix the cause) and run the same command again: --resume auto continues from the newest complete checkpoint") from err
    runtime.barrier()  # every rank's files are on disk before the manifest vouches for them
    _seal(runtime, partial, step)
    if runtime.is_main:
        if final.exists():  # a stale one from an earlier run of the same output_dir
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
    runtime.barrier()
    return final


def _seal(runtime, partial: Path, step: int) -> None:
    """The manifest: every file's size and sha256, hashed a share per rank, written by rank 0."""
    files = runtime.broadcast_object(sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
                                     if runtime.is_main else None)
    mine = [(rel, {"bytes": (partial / rel).stat().st_size, "sha256": file_sha256(partial / rel)})
            for rel in files[runtime.rank::runtime.world_size]]
    entries = dict(sorted(runtime.gather_objects(mine)))
    if runtime.is_main:
        _write_durably(partial / MANIFEST, json.dumps({"step": step, "files": entries}, indent=1))


def resume_candidate(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint `--resume` will load, judged by sizes alone and without a message (resolve_resume
    hashes and warns once the ranks run): for what must be settled before they start."""
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume) if Path(resume).is_dir() and manifest_problem(Path(resume)) is None else None
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def saved_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, with its global batch (trainrig <= 0.14 kept only the
    factors: micro_batch x accumulation x world_size)."""
    state = json.loads((path / STATE_FILE).read_text())
    state.setdefault("global_batch", state["micro_batch"] * state["accumulation"] * state["world_size"])
    return state


def load_checkpoint(runtime, model, optimizer, path: Path, expect: dict, work_dir: Path) -> dict:
    """Restore model, optimizer and this rank's RNG; return trainer_state. `expect`: settings the
    checkpoint must have been saved with (the global batch, the data's shape), checked before
    anything is loaded. `path` comes from resolve_resume, which verified it. `work_dir`: this run's
    output directory, where a ZeRO checkpoint is converted for another world size.

    Another world size is fine: the data order depends on the global batch only (ResumableSampler),
    the caller maps the data position, and the runtime loads whole tensors (DDP) or converts ZeRO's
    partitions (DeepSpeed's universal checkpoint). A rank the saving run did not have keeps its own
    seeded RNG streams."""
    state = saved_state(path)
    for key, now in expect.items():
        if state.get(key) != now:
            if key == "global_batch":
                raise UsageError(f"{path} was saved with a global batch of {state[key]} samples per step, this run's is {now}: "
                                 f"resume with --global_batch_size {state[key]} (the accumulation follows from it and the world size), "
                                 f"or start a new --output_dir")
            raise UsageError(f"{path} was saved with {key} {state.get(key)}, this run uses {now}; "
                             f"resume with the same batch settings or start a new --output_dir")
    saved_world = state["world_size"]
    runtime.load_training_state(model, optimizer, path, saved_world, work_dir)
    if runtime.rank < saved_world:
        set_rng_state(load_plain(path / f"rng_state_{runtime.rank}.pt"))
    return state


def save_model_state(model, optimizer, directory: Path, trainable_only: bool) -> None:
    """model.safetensors (every weight, or with frozen ones only the trainable: a LoRA adapter) and
    optimizer.pt, for a run without DeepSpeed (rank 0 only: DDP's replicas are identical)."""
    from safetensors.torch import save_file

    keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if keep is None or k in keep}
    save_file(_untie(state), str(directory / "model.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def load_model_state(model, optimizer, directory: Path, trainable_only: bool) -> None:
    """save_model_state's files back into the model and optimizer; a file that does not match the
    model (another model, a missing weight) is refused with what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(directory / "model.safetensors"))  # safetensors: data only, nothing to execute
    except SafetensorError as err:
        raise UsageError(f"{directory / 'model.safetensors'}: not a readable safetensors file ({err}); delete this checkpoint "
                         f"and resume from an earlier one") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in missing if k not in tied and (not trainable_only or k in trainable)]
    if unexpected or missing:
        raise RuntimeError(f"{directory}/model.safetensors does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer.load_state_dict(load_plain(directory / "optimizer.pt"))


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embedding/head): keep one copy."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = key
        out[key] = tensor
    return out


def load_plain(path: Path, mmap: bool = False, allowed: list | None = None):
    """torch.load of a checkpoint file that may hold only tensors and plain data (weights_only):
    a pickle that would construct anything else (a payload's __reduce__) is refused before any of
    it runs, with a message naming the file."""
    import pickle

    from torch import serialization

    try:
        with serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
        why = next((line for line in lines if "Unsupported global" in line), lines[0])  # e.g. "GLOBAL posix.mkdir"
        raise UsageError(f"{path}: refused to load: it holds objects other than tensors and plain data, or is damaged "
                         f"({why[:200]}); trainrig never writes such files: delete this checkpoint "
                         f"and resume from an earlier one (--resume auto after removing it)") from None


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
