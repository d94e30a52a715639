"""The DeepSpeed JSON, built in one place for every path: `trainrig plan/launch` (launch/planner/files.py
writes it), an entry script with `--deepspeed auto` or `--zero_stage N` (the runtime fills the same
template in-process), and a user's own file (its "auto" fields filled by the same rule). Pure:
no deepspeed import, so the planner and the tests use it anywhere.

- `template(stage, offload)` is trainrig's ZeRO section with "auto" where the run decides; the
  shipped ds_configs/*.json are exactly these templates (a test keeps them so).
- `fill_ds_config` fills every "auto" from the run config and the model's hidden size h, and
  refuses a concrete value that contradicts a flag. Bucket sizes follow h as the HF/DeepSpeed
  integration does: reduce buckets h^2 elements, ZeRO-3 prefetch 0.9 h^2, parameters under 10 h
  elements kept whole on every rank.
- Gradient accumulation in fp32 for bf16 under ZeRO-1/2/3 (`data_types.grad_accum_dtype`), as DDP's
  autocast accumulates: summing 8 micro batches' bf16 gradients keeps 8 bits of mantissa. DeepSpeed
  0.19 implements it for ZeRO-1 with its BF16 optimizer (a full fp32 gradient copy per rank), for
  ZeRO-2/3 in the fp32 gradient partition it has anyway; stage 0 (no ZeRO) has no fp32
  accumulation (NotImplementedError), so it stays in bf16 there -- use DDP (--deepspeed none).
- `buffer_bytes` is what a ZeRO section costs on the GPU beyond the model states, which
  launch/planner/memory.py adds to the plan: the gradient reduction buckets, and under ZeRO-3 the gathered
  parameters kept for reuse (up to stage3_max_reuse_distance elements: 2 GB in bf16 at the 1e9
  trainrig writes, the HF/DeepSpeed default).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from trainers.errors import UsageError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
# ZeRO-3's gathered-parameter limits: DeepSpeed's and the HF integration's defaults, which trade
# memory (counted in buffer_bytes) for fewer re-gathers; trainrig has no GPU measurement to pick others by
STAGE3_MAX_LIVE_PARAMETERS = 10**9
STAGE3_MAX_REUSE_DISTANCE = 10**9
DEEPSPEED_DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's own, where a user's JSON names none
DEEPSPEED_DEFAULT_PREFETCH_BUCKET = 50_000_000
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
H_SIZED = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


@dataclass
class DeepSpeedSettings:
    """The run-config values a DS JSON must agree with (or get for its "auto" fields)."""

    micro_batch: int
    accumulation: int
    world_size: int
    max_grad_norm: float
    precision: str  # bf16 | fp16 | fp32
    zero_stage: str  # auto | 0..3 (auto: keep the JSON's)
    offload: str  # auto | none | optimizer | all
    sources: dict  # flag -> where it was set, for messages
    hidden_size: int  # the model's: sizes the communication buckets


def template(stage: int, offload: str) -> dict:
    """trainrig's DS JSON for a ZeRO stage and offload, "auto" where the run config decides."""
    if offload == "all" and stage != 3:
        raise UsageError(f"--offload all (parameters too) needs --zero_stage 3, got {stage}")
    if offload == "optimizer" and stage < 2:
        raise UsageError(f"--offload optimizer needs --zero_stage 2 or 3, got {stage}")
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size="auto")
    if stage in (1, 2):
        zero["reduce_scatter"] = True
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=STAGE3_MAX_LIVE_PARAMETERS, stage3_max_reuse_distance=STAGE3_MAX_REUSE_DISTANCE,
                    stage3_gather_16bit_weights_on_model_save=True)  # final/ is gathered from the shards
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", **FP16_LOSS_SCALING},
        "data_types": {"grad_accum_dtype": "auto"},
        "zero_optimization": zero,
    }


TEMPLATES = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"), (3, "all")]


def template_name(stage: int, offload: str) -> str:
    """The shipped ds_configs/ file of a template: zero2_offload.json offloads the optimizer,
    zero3_offload.json the optimizer and the parameters."""
    suffix = {"none": "", "all": "_offload", "optimizer": "_offload" if stage == 2 else "_offload_optimizer"}[offload]
    return f"zero{stage}{suffix}.json"


def template_for(zero_stage: str, offload: str) -> Path:
    """The shipped ds_configs/ file for a stage/offload choice (`--deepspeed auto`)."""
    stage = 2 if zero_stage == "auto" else int(zero_stage)
    offload = "none" if offload == "auto" else offload
    template(stage, offload)  # refuses the combinations that do not exist
    return DS_CONFIG_DIR / template_name(stage, offload)


def build(stage: int, offload: str, settings: DeepSpeedSettings) -> dict:
    """The complete DS JSON trainrig runs for a stage and offload."""
    return fill_ds_config(template(stage, offload), settings, template_name(stage, offload))


def deepspeed_json(dist_cfg) -> tuple[Path | None, str, str]:
    """(the DS JSON this run uses, or None for DDP / one process; --zero_stage; --offload), the
    flags completed from `accelerate launch --use_deepspeed [--zero_stage N | --deepspeed_config_file
    F]`, which counts as asking for DeepSpeed. The planner (launch/plan.py) reads the same answer."""
    by_launcher = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    zero_stage, offload = dist_cfg.zero_stage, dist_cfg.offload
    if dist_cfg.deepspeed == "none":
        if by_launcher:
            raise UsageError("`accelerate launch --use_deepspeed` contradicts --deepspeed none; drop one of them")
        if zero_stage not in ("auto", "0") or offload not in ("auto", "none"):
            raise UsageError("--deepspeed none contradicts --zero_stage/--offload; drop one of them")
        return None, zero_stage, offload
    if dist_cfg.deepspeed != "auto":
        return Path(dist_cfg.deepspeed), zero_stage, offload
    if by_launcher and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]), zero_stage, offload
    if by_launcher:
        if zero_stage == "auto":
            zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "auto")
        if offload == "auto":
            on_cpu = ("cpu", "nvme")
            offload = ("all" if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") in on_cpu else
                       "optimizer" if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") in on_cpu else "none")
    elif zero_stage == "auto" and offload in ("auto", "none"):
        return None, zero_stage, offload  # nothing asks for ZeRO: DDP
    return template_for(zero_stage, offload), zero_stage, offload


def zero_setup(dist_cfg) -> tuple[int | None, str, str]:
    """(ZeRO stage, offload, the user's DS JSON) this run will use -- (None, "none", "") for DDP / one
    process -- known before the engine starts: a DS JSON's own stage (its "auto" is --zero_stage, 2
    when that is auto too) and offload, else the flags. The JSON is "" when trainrig picks its own
    template from the flags (an error then names the flag, not the file)."""
    path, zero_stage, offload = deepspeed_json(dist_cfg)
    if path is None:
        return None, "none", ""
    ds = load_ds_json(path)
    stage = ds.get("zero_optimization", {}).get("stage", 2)
    stage = int(zero_stage) if stage == "auto" and zero_stage != "auto" else 2 if stage == "auto" else int(stage)
    chosen_by_user = dist_cfg.deepspeed not in ("auto", "none") or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return stage, ds_offload(ds), str(path) if chosen_by_user else ""


def load_ds_json(path: Path, flag: str = "--deepspeed") -> dict:
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; pass a DeepSpeed JSON (see ds_configs/) or --deepspeed auto|none")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the DeepSpeed config") from None


def h_sized(key: str, hidden: int) -> int:
    """A bucket size that follows the hidden size h (the HF integration's rule for its "auto")."""
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}[key]


def fill_ds_config(ds: dict, s: DeepSpeedSettings, name: str) -> dict:
    """Copy of `ds` with every "auto" filled from the run config and the model's hidden size. A
    concrete value that contradicts the run config is an error naming both (no hyperparameters
    live in infra files)."""
    ds = copy.deepcopy(ds)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UsageError(f"{name}: remove the \"{section}\" section; trainrig builds the {section} from "
                             f"--optimizer/--learning_rate/--lr_scheduler_type so one config drives every engine")

    def settle(container: dict, key: str, value, flag: str, label: str):
        current = container.get(key, "auto")
        if current == "auto":
            container[key] = value
        elif current != value:
            raise UsageError(f"{name}: {label}={current!r} contradicts {flag}={value!r} (from {s.sources.get(flag.lstrip('-'), 'default')}); "
                             f"set it to \"auto\" in the JSON or change the flag")

    settle(ds, "train_micro_batch_size_per_gpu", s.micro_batch, "--per_device_train_batch_size", "train_micro_batch_size_per_gpu")
    settle(ds, "gradient_accumulation_steps", s.accumulation, "--gradient_accumulation_steps", "gradient_accumulation_steps")
    settle(ds, "train_batch_size", s.micro_batch * s.accumulation * s.world_size, "--global_batch_size",
           "train_batch_size (= micro batch x accumulation x world)")
    settle(ds, "gradient_clipping", float(s.max_grad_norm), "--max_grad_norm", "gradient_clipping")
    for kind in ("bf16", "fp16"):
        section = ds.setdefault(kind, {})
        settle(section, "enabled", s.precision == kind, "--precision", f"{kind}.enabled")

    zero = ds.setdefault("zero_optimization", {})
    if s.zero_stage != "auto":
        settle(zero, "stage", int(s.zero_stage), "--zero_stage", "zero_optimization.stage")
    stage = zero.get("stage", 0)
    if stage == "auto":
        zero["stage"] = stage = 2
    json_offload = ds_offload(ds)
    if s.offload not in ("auto", json_offload):
        raise UsageError(f"{name}: offloads {json_offload} but --offload is {s.offload}; pick the matching ds_configs/ file or drop the flag")
    for key in [k for k, v in zero.items() if v == "auto"]:
        if key not in H_SIZED:
            raise UsageError(f"{name}: zero_optimization.{key} is \"auto\", which trainrig does not size; give a number "
                             f"(see ds_configs/zero3.json)")
        zero[key] = h_sized(key, s.hidden_size)
    types = ds.get("data_types", {})
    if types.get("grad_accum_dtype") == "auto":
        if s.precision == "bf16" and stage >= 1:
            types["grad_accum_dtype"] = "fp32"
        else:  # fp32 runs accumulate in fp32 anyway; fp16 keeps DeepSpeed's loss-scaled fp16; stage 0 has no fp32 path
            del types["grad_accum_dtype"]
        if not types:
            del ds["data_types"]
    if stage == 3:  # final/ is gathered from the shards; DeepSpeed refuses unless this is on
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # trainrig logs; keep DeepSpeed's step lines out of the way
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def ds_offload(ds: dict) -> str:
    """all, optimizer or none, as DeepSpeed reads the JSON: an offload section whose device is "none",
    or gives none (DeepSpeed's default), offloads nothing -- HF-style JSONs often carry one."""
    zero = ds.get("zero_optimization", {})

    def offloads(key: str) -> bool:
        section = zero.get(key)
        return isinstance(section, dict) and str(section.get("device", "none")).lower() != "none"

    return "all" if offloads("offload_param") else "optimizer" if offloads("offload_optimizer") else "none"


# ------------------------------------------------------------------------- what it costs


def buffer_keys(zero: dict, hidden: int) -> tuple:
    """The ZeRO settings buffer_bytes reads, "auto" sized from `hidden`, as a hashable tuple (for
    launch/planner/memory.py's Setup)."""
    keys = ("stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_max_reuse_distance")
    return tuple((k, h_sized(k, hidden) if zero[k] == "auto" and k in H_SIZED else zero[k]) for k in keys if k in zero)


def trainrig_buffer_keys(stage: int, offload: str, hidden: int) -> tuple:
    """buffer_keys of the DS JSON trainrig builds for a stage and offload."""
    return buffer_keys(template(stage, offload)["zero_optimization"], hidden)


def buffer_bytes(zero: dict, weight_bytes: int, parameters: int) -> int:
    """GPU bytes a filled zero_optimization section costs beyond the model states (DeepSpeed 0.19.8):
    - ZeRO-1/2 (stage_1_and_2.py setup_buckets): with contiguous_gradients one reduction bucket of
      reduce_bucket_size elements in the 16-bit gradient dtype, a second with overlap_comm;
    - ZeRO-3 (stage3.py): one such bucket, and the gathered 16-bit parameters a rank keeps because
      they are used again within stage3_max_reuse_distance elements (partitioned_param_coordinator
      releases only those that are not), plus the prefetch in flight; bounded by the model itself.
    weight_bytes: 2 for 16-bit engines, 4 for fp32."""
    stage = zero.get("stage", 0)
    if stage == 0:
        return 0
    bucket = int(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULT_REDUCE_BUCKET))
    if stage in (1, 2):
        buckets = (2 if zero.get("overlap_comm", False) else 1) if zero.get("contiguous_gradients", True) else 0
        return buckets * bucket * weight_bytes
    kept = int(zero.get("stage3_max_reuse_distance", STAGE3_MAX_REUSE_DISTANCE)) + int(
        zero.get("stage3_prefetch_bucket_size", DEEPSPEED_DEFAULT_PREFETCH_BUCKET))
    return (bucket if zero.get("contiguous_gradients", True) else 0) * weight_bytes + min(kept, parameters) * weight_bytes
