"""The distributed runtime: the ONLY module that imports accelerate, deepspeed or torch.distributed.

One engine, Accelerate. DeepSpeed ZeRO comes in through Accelerate's DeepSpeed plugin from a DS
JSON built and filled by trainers/ds_config.py from the run config; DDP otherwise. The loops call
`runtime.backward`, `runtime.clip_grad_norm`, `runtime.all_reduce_sum`, ... and never see which
engine runs underneath.

Works the same under `python`, `torchrun`, `accelerate launch [--use_deepspeed]` and `deepspeed`:
all of them export WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. On CPU the process group is gloo, created before the Accelerator, because
accelerate 1.15 + deepspeed 0.19 otherwise give every rank a world of 1 (accelerate picks no CPU
backend for DeepSpeed, and DeepSpeed then initialises its own one-rank group). A world
that does not match WORLD_SIZE stops the run: N silent one-rank runs are the worst failure.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch

from trainers.checkpoint import load_model_state, load_plain, save_model_state
from trainers.devices import enable_tf32, require_torch_sees_gpus, resolve_precision
from trainers.ds_config import DeepSpeedSettings, deepspeed_json, ds_offload, fill_ds_config, load_ds_json
from trainers.errors import UsageError
from trainers.extensions import put_this_pythons_ninja_first, refuse_stale_build_locks
from trainers.optim import EIGHT_BIT_OPTIMIZERS

log = logging.getLogger("trainrig.runtime")

# DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor on every ZeRO-3 gather; torch 2.13
# warns each time from a wrapper, which floods the log of every rank with the same two lines.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

class WorldSizeMismatch(RuntimeError):
    """The launcher promised WORLD_SIZE ranks but the process group has another size."""


# ------------------------------------------------------------------------------- runtime


def launcher_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) the launcher promised."""
    srun_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if srun_tasks > 1 and "WORLD_SIZE" not in os.environ:
        # `srun -n N python launch/pretrain.py` would start N runs that each think they are alone
        raise UsageError(f"started by srun as {srun_tasks} tasks without WORLD_SIZE/RANK; run one task per node that "
                         f"starts torchrun (srun --ntasks-per-node 1 torchrun --nproc_per_node ... launch/pretrain.py)")
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def torch_precision(requested: str) -> str:
    """resolve_precision for the device torch sees here."""
    gpu = torch.cuda.is_available()
    return resolve_precision(requested, gpu, gpu and torch.cuda.is_bf16_supported())


class Collectives:
    """What the ranks do together. A subclass provides device, world_size, is_main and barrier()."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over all ranks (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn):
        """Run `fn` on rank 0, then on the others (which reuse what rank 0 wrote, e.g. the data
        cache). A UsageError on rank 0 reaches every rank, so none waits forever at a barrier."""
        error = None
        if self.is_main:
            try:
                result = fn()
            except UsageError as err:
                error = str(err)
        self.barrier()
        error = self.broadcast_object(error)
        if error is not None:
            raise UsageError(error)
        if not self.is_main:
            result = fn()
        return result

    def gather_objects(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return list(items)
        import torch.distributed as dist

        boxes = [None] * self.world_size
        dist.all_gather_object(boxes, list(items))
        return [item for box in boxes for item in box]


class Runtime(Collectives):
    """What the loops need from the distributed engine."""

    def __init__(self, dist_cfg, batch_cfg, optim_cfg, sources: dict, hidden_size: int):
        """hidden_size: the model's, which sizes DeepSpeed's communication buckets (trainers/ds_config.py)."""
        import accelerate
        from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

        require_torch_sees_gpus()  # never train on the CPU of a GPU machine because of the torch wheel
        expected_world, rank, _ = launcher_world()
        self.precision = torch_precision(dist_cfg.precision)
        if torch.cuda.is_available():
            enable_tf32()  # Ampere+: TF32 for fp32 matmuls (master-weight math)
        timeout = timedelta(seconds=dist_cfg.ddp_timeout)
        self.ds_config = self._deepspeed_config(dist_cfg, batch_cfg, optim_cfg, sources, expected_world, hidden_size)
        if self.ds_config is not None:
            refuse_stale_build_locks()
            put_this_pythons_ninja_first()
        if self.ds_config is not None and "LOCAL_RANK" not in os.environ:
            # `python launch/pretrain.py --zero_stage 2`: DeepSpeed wants a one-rank process group,
            # else it falls back to MPI discovery (ModuleNotFoundError: mpi4py)
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        if not torch.cuda.is_available() and (expected_world > 1 or self.ds_config is not None):
            # gloo first, or accelerate+deepspeed on CPU build one-rank worlds (accelerate 1.15 picks no backend for CPU DeepSpeed);
            # cpu=True too, else accelerate 1.15 joins the group but never wraps the model in DDP
            accelerate.PartialState(cpu=True, backend="gloo", timeout=timeout)
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves it unset: 2 ranks x all cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        if self.ds_config is not None and optim_cfg.optimizer == "muon":
            raise UsageError("--optimizer muon runs without DeepSpeed (--deepspeed none): ZeRO hands the optimizer flattened "
                             "partitions, and torch.optim.Muon must see whole 2-D matrices")
        if self.ds_config is not None and optim_cfg.optimizer in EIGHT_BIT_OPTIMIZERS:
            raise UsageError(f"--optimizer {optim_cfg.optimizer} runs without DeepSpeed (--deepspeed none): ZeRO steps its own "
                             f"fp32 partitions; for less optimizer memory under ZeRO use --offload optimizer")
        plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config) if self.ds_config is not None else None
        self.accelerator = accelerate.Accelerator(
            mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision],
            gradient_accumulation_steps=batch_cfg.gradient_accumulation_steps,
            deepspeed_plugin=plugin,
            # DDP's gradients as views into its all-reduce buckets: no second full copy (4 B/param)
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout), DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        )
        from accelerate.utils import DistributedType

        unwrapped = expected_world > 1 and self.accelerator.distributed_type == DistributedType.NO
        if self.accelerator.num_processes != expected_world or unwrapped:
            raise WorldSizeMismatch(
                f"the launcher set WORLD_SIZE={expected_world} but rank {rank} sees {self.accelerator.num_processes} "
                f"process(es) with distributed type {self.accelerator.distributed_type.value}; each rank would train "
                f"alone. Check MASTER_ADDR/MASTER_PORT and that every rank uses the same launcher")
        self.uses_deepspeed = self.ds_config is not None
        if self.uses_deepspeed:
            # ZeRO-3 builds the model under deepspeed.zero.Init, which reads the world from
            # deepspeed.comm; attach it to the process group accelerate made (else it sees 1 rank)
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.zero_stage = self.ds_config["zero_optimization"]["stage"] if self.uses_deepspeed else None
        self.offload = ds_offload(self.ds_config) if self.uses_deepspeed else "none"
        self.watchdog = None  # several ranks: a stuck one makes the others stop the run (trainers/watchdog.py)
        if expected_world > 1 and getattr(dist_cfg, "hang_timeout", 0) > 0:
            self.watchdog = _start_hang_watchdog(dist_cfg.hang_timeout, self.rank, self.world_size)

    @staticmethod
    def _deepspeed_config(dist_cfg, batch_cfg, optim_cfg, sources, world, hidden_size) -> dict | None:
        """The filled DS config, or None for DDP/single."""
        path, zero_stage, offload = deepspeed_json(dist_cfg)
        if path is None:
            return None
        settings = DeepSpeedSettings(
            micro_batch=batch_cfg.per_device_train_batch_size, accumulation=batch_cfg.gradient_accumulation_steps,
            world_size=world, max_grad_norm=optim_cfg.max_grad_norm, precision=torch_precision(dist_cfg.precision),
            zero_stage=zero_stage, offload=offload, sources=sources, hidden_size=hidden_size)
        return fill_ds_config(load_ds_json(path), settings, str(path))

    # ---------------------------------------------------------------------------- facts

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def strategy(self) -> str:
        if self.uses_deepspeed:
            return f"deepspeed-zero{self.zero_stage}" + ("" if self.offload == "none" else f"+offload-{self.offload}")
        return "ddp" if self.world_size > 1 else "single"

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def note_step(self) -> None:
        """This rank finished an optimizer step (its heartbeat carries the count, for the message
        that names a stuck rank)."""
        if self.watchdog is not None:
            self.watchdog.note_step()

    # -------------------------------------------------------------------------- training

    def model_init_context(self, sharded: bool):
        """Where to build the model. sharded=True keeps ZeRO-3's deepspeed.zero.Init (each rank
        materialises only its shard: the way to load a checkpoint too big for one rank);
        sharded=False builds it whole, so a from-scratch init is bit-identical under every
        strategy and world size."""
        if not self.uses_deepspeed or self.zero_stage != 3 or sharded:
            return contextlib.nullcontext()
        return _without_zero_init(self.accelerator.state.deepspeed_plugin)

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def accumulate(self, model):
        """Context for one micro step; gradients sync (and the optimizer steps) on the last of
        each `gradient_accumulation_steps` window."""
        return self.accelerator.accumulate(model)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` must already be this rank's share of the window's global mean (see the loop);
        both engines divide by the accumulation steps, which the caller pre-multiplies."""
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> float | None:
        """Clip (when max_norm > 0) and return the pre-clip global norm. Under DeepSpeed the
        engine clips inside its step; read the norm with `grad_norm_after_step`."""
        if self.uses_deepspeed:
            return None
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def optimizer_step(self, optimizer, grad_norm: float | None) -> bool:
        """Apply the update of a finished accumulation window, unless its gradients are not finite;
        True if applied. Every rank decides alike: the norm is global (DDP all-reduced the
        gradients; DeepSpeed reduces the norm), and the loop poisons the gradients of a rank whose
        loss is not finite, so that rank's NaN reaches every rank's norm."""
        if self.uses_deepspeed:
            # the engine stepped inside backward(); ZeRO 1-3 skip a step whose global norm is NaN/Inf
            return bool(self.accelerator.deepspeed_engine_wrapped.engine.was_step_applied())
        if self.precision == "fp16":  # the GradScaler skips (and lowers its scale) on inf/NaN itself
            optimizer.step()
            return not optimizer.step_was_skipped
        if grad_norm is not None and not math.isfinite(grad_norm):
            return False
        optimizer.step()
        return True

    def grad_norm_after_step(self) -> float | None:
        if not self.uses_deepspeed:
            return None
        norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        return None if norm is None else float(norm)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def peak_memory_gb(self) -> float:
        """Peak GPU memory allocated by this rank, or the process's peak RSS on CPU: VmHWM, the
        address space's own high-water mark (ru_maxrss carries a parent's larger peak across exec,
        so a run started by a big process would report the parent's)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20  # KiB
        except (OSError, StopIteration):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

    def device_memory_used_gb(self) -> float | None:
        """Memory in use on this rank's GPU as the driver counts it (total less free: the CUDA
        context, library workspaces, everything the caching allocator reserved, and any other
        process's), None on CPU. Beside peak_memory_gb, it measures what the memory model's
        overhead term only assumes."""
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**30

    # ----------------------------------------------------------------------- checkpoints

    def save_training_state(self, model, optimizer, directory: Path) -> None:
        """Model and optimizer state into `directory` (every rank calls this). Only trainable
        weights are saved (a LoRA checkpoint holds the adapter; the frozen base is reloaded from
        --model_name_or_path). DeepSpeed: its own sharded files; else rank 0 writes
        model.safetensors + optimizer.pt (trainers/checkpoint.py)."""
        frozen = _has_frozen_parameters(self.unwrap(model))
        if self.uses_deepspeed:
            model.save_checkpoint(str(directory), tag="deepspeed", client_state={}, save_latest=False,
                                  exclude_frozen_parameters=frozen)
            return
        if self.is_main:
            save_model_state(self.unwrap(model), optimizer, directory, trainable_only=frozen)

    def load_training_state(self, model, optimizer, directory: Path, saved_world: int, work_dir: Path) -> None:
        """save_training_state's files back, from a checkpoint saved by `saved_world` ranks. DDP's
        (and one process's) files hold whole tensors and load on any world size. ZeRO's are the
        saving ranks' partitions: on another world size they are first converted to DeepSpeed's
        universal checkpoint (one file per parameter and optimizer state, whole) in `work_dir`
        (this run's output directory, which every rank sees), and each rank slices it for the new
        partitioning."""
        frozen = _has_frozen_parameters(self.unwrap(model))
        if not self.uses_deepspeed:
            load_model_state(self.unwrap(model), optimizer, directory, trainable_only=frozen)
            return
        check_deepspeed_files_safe(directory / "deepspeed")  # before DeepSpeed (or its converter) unpickles them
        if saved_world == self.world_size:
            _load_deepspeed(model, directory, frozen)
            if self.is_main:
                remove_conversions(work_dir)  # one an earlier attempt left when it failed mid-load
            return
        universal = self._universal_checkpoint(directory, saved_world, work_dir)
        # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group group 0's hyperparameters
        # (weight decay 0.1 onto the norms and biases: losses off by 5e-5 two steps later) and one
        # shared step tensor, which AdamW then advances once per group and step (the second group's
        # bias correction runs ahead: off by 3e-3). The hyperparameters are this run's config either
        # way; the step is copied per state.
        groups = model.optimizer.param_groups
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        # DeepSpeed reads "checkpoint": {"load_universal": ...} only inside load_checkpoint (0.19:
        # engine.load_universal_checkpoint()), so it is set for this one load rather than in the DS
        # JSON: the world size the checkpoint was saved with is known only once the resume is chosen
        model._config.load_universal_checkpoint = True
        try:
            _load_deepspeed(model, universal, frozen)
        finally:
            model._config.load_universal_checkpoint = False
        for group, kept in zip(groups, hyperparameters):
            group.update(kept)
        for state in model.optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        self.barrier()  # every rank has read its slices
        if self.is_main:
            remove_conversions(work_dir)

    def _universal_checkpoint(self, directory: Path, saved_world: int, work_dir: Path) -> Path:
        """to_universal on rank 0 while the others wait (the time counts against --ddp_timeout)."""
        target = work_dir / f"{directory.name}.universal"
        self.main_first(lambda: to_universal(directory, target, saved_world, self.world_size, self.zero_stage) if self.is_main else None)
        return target

    def full_state_dict(self, model, trainable_only: bool = False) -> dict | None:
        """The whole model's state dict on rank 0 (gathered under ZeRO-3), None elsewhere; with
        trainable_only, just the trainable parameters (a LoRA adapter), gathering only those."""
        if not trainable_only:
            state = self.accelerator.get_state_dict(model)
            return state if self.is_main else None
        named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
        gather = contextlib.nullcontext()
        if self.uses_deepspeed and self.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with gather:
            return {n: p.detach().cpu().clone() for n, p in named} if self.is_main else None

    def end(self) -> None:
        """Forget accelerate's process-wide state, so a second run in the same
        process (the demo: pretrain, then SFT) starts clean. A multi-rank run instead keeps its
        process group and model alive and its entry script leaves through `exit_process`: tearing
        a gloo group down from Python can deadlock (torch joins the group's worker threads while
        holding the GIL that a worker needs to release its last tensors; seen at the end of a
        2-rank CPU run, the rank hung in ~ProcessGroupGloo)."""
        from accelerate.state import AcceleratorState, GradientState

        if self.world_size > 1:  # (accelerate's end_training would destroy the group: the teardown to avoid)
            self.barrier()  # every rank is done with every collective
            if self.watchdog is not None:  # after the barrier: a rank hung before it is still caught
                self.watchdog.finish()
            _FINISHED_RUNS.append(self.accelerator)  # holds the wrapped model, its reducer and the group
            return
        self.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class InferenceRuntime(Collectives):
    """For evaluation and generation: one device per rank and the collectives, no optimizer and
    no engine. Under a launcher (WORLD_SIZE > 1) the ranks join one process group (gloo on CPU)
    and split the work."""

    def __init__(self, precision: str, timeout_s: int = 1800):
        import accelerate

        require_torch_sees_gpus()
        expected_world, rank, _ = launcher_world()
        self.precision = torch_precision(precision)
        cpu_group = {"cpu": True, "backend": "gloo"} if not torch.cuda.is_available() and expected_world > 1 else {}
        self.state = accelerate.PartialState(timeout=timedelta(seconds=timeout_s), **cpu_group)
        if self.state.num_processes != expected_world:
            raise WorldSizeMismatch(f"the launcher set WORLD_SIZE={expected_world} but rank {rank} sees "
                                    f"{self.state.num_processes} process(es); check MASTER_ADDR/MASTER_PORT")

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def world_size(self) -> int:
        return self.state.num_processes

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def end(self) -> None:
        """As Runtime.end: a multi-rank group stays alive until exit_process; one process resets."""
        from accelerate.state import PartialState

        if self.world_size > 1:
            self.barrier()
            _FINISHED_RUNS.append(self.state)
            return
        PartialState._reset_state()


_FINISHED_RUNS: list = []  # accelerators/states of finished multi-rank runs, alive until exit_process()


def exit_process(status: int = 0) -> None:
    """Leave the process without running destructors once a multi-rank run has finished in it
    (see Runtime.end); a no-op otherwise, so in-process callers (tests, the demo) carry on."""
    if not _FINISHED_RUNS:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


@contextlib.contextmanager
def _without_zero_init(plugin):
    """transformers builds under zero.Init whenever a ZeRO-3 HfDeepSpeedConfig is registered
    (accelerate registers one even with zero3_init_flag off); unregister it for the build."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _start_hang_watchdog(timeout_s: int, rank: int, world_size: int):
    """The heartbeat watchdog on a store client of its own (its own connection, so its reads never
    queue behind the process group's). The store is where MASTER_ADDR:MASTER_PORT point: the
    torchrun agent's (TORCHELASTIC_USE_AGENT_STORE=True: torchrun, accelerate launch), else the one
    rank 0 serves from inside its process (the deepspeed launcher, plain env://)."""
    import torch.distributed as dist

    from trainers.watchdog import Watchdog

    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        store = dist.TCPStore(host_name=host, port=int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
    except (ValueError, RuntimeError) as err:  # DistError is a RuntimeError
        log.warning("--hang_timeout: no store client at MASTER_ADDR=%r MASTER_PORT=%r (%s); running without the hang "
                    "watchdog (a stuck rank stops the run only at --ddp_timeout)", host, port, str(err).splitlines()[0])
        return None
    owner = "the torchrun agent on the first node" if agent else "rank 0"
    return Watchdog(store, rank, world_size, timeout_s, store_address=f"{host}:{port}", store_owner=owner).start()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_deepspeed(engine, directory: Path, frozen: bool) -> None:
    path, _ = engine.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=not frozen)
    if path is None:
        raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint under tag 'deepspeed'")


def _has_frozen_parameters(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def check_deepspeed_files_safe(directory: Path) -> None:
    """DeepSpeed unpickles its checkpoint files without restriction (arbitrary code on load).
    Open each with the restricted unpickler first, allowing only the plain types DeepSpeed
    writes, so a file with a pickle payload is refused before any of its code runs."""
    files = sorted(directory.glob("*.pt"))
    if not files:
        raise UsageError(f"{directory}: no DeepSpeed state files; delete this checkpoint and resume from an earlier one")
    for path in files:
        load_plain(path, mmap=True, allowed=_deepspeed_safe_globals())


def _deepspeed_safe_globals() -> list:
    """Plain-data classes DeepSpeed's own checkpoint files reference."""
    import argparse
    from collections import OrderedDict

    allowed: list = [OrderedDict, argparse.Namespace, set, frozenset]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    return allowed


def to_universal(directory: Path, target: Path, saved_world: int, world: int, zero_stage: int) -> None:
    """A ZeRO checkpoint's shards of `saved_world` ranks -> `target`/deepspeed/, DeepSpeed's universal
    checkpoint, by its own converter (ds_to_universal, in a child process: it forks workers). It
    writes every partition's fragments, then merges them per parameter, so it needs about twice the
    optimizer state on disk at its peak (24 B per trained parameter) and the state once when done;
    the caller deletes it once loaded. A conversion that cannot be done is a UsageError (every rank
    gets it) naming the way that still works."""
    remove_conversions(target.parent)  # what an earlier attempt did not finish or delete
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(directory / "deepspeed"),
               "--output_folder", str(target / "deepspeed"), "--inject_missing_state"]
    started = time.monotonic()
    # file work on the CPU: kept off the GPUs the ranks hold (no CUDA context, no DeepSpeed GPU accelerator)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"CUDA_VISIBLE_DEVICES": ""}
    refusal = (f"{directory} was saved by {saved_world} ranks under ZeRO-{zero_stage}, this run has {world}, and converting "
               f"it to another partitioning (DeepSpeed's ds_to_universal, into {target}) failed")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if proc.returncode == 0 else 0
    except OSError as err:
        remove_conversions(target.parent)
        raise UsageError(f"{refusal} ({err}); free space there, or resume it with {saved_world} ranks in all (nodes x GPUs per node)") from None
    if proc.returncode != 0:
        remove_conversions(target.parent)
        last = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-2:]
        raise UsageError(f"{refusal} ({' | '.join(last)[-400:]}); resume it with {saved_world} ranks in all (nodes x GPUs per node)")
    log.info("%s was saved by %d ranks under ZeRO-%d, this run has %d: converted to DeepSpeed's universal checkpoint %s in "
             "%.1f s (%.2f GB; deleted once loaded)", directory, saved_world, zero_stage, world, target,
             time.monotonic() - started, size / 1e9)


def remove_conversions(work_dir: Path) -> None:
    """Delete the universal-checkpoint conversions in `work_dir` (`checkpoint-<step>.universal/`)."""
    for conversion in work_dir.glob("checkpoint-*.universal"):
        shutil.rmtree(conversion, ignore_errors=True)
