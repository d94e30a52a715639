"""A plan -> the files and the command that run it: ds_config.json (DeepSpeed), accelerate.yaml,
the NCCL environment, and the launcher command line.

The DS JSON is trainers/ds_config.py's, the same the run builds in-process for the same flags, with
concrete values equal to the flags the command passes, so the run's own check (fill_ds_config: a
value contradicting the run config is an error) passes, and a user who edits one without the
other is told.
"""

from __future__ import annotations

import shlex
import sys
import zlib
from pathlib import Path

import yaml

from launch.planner.search import Plan
from trainers.ds_config import DeepSpeedSettings, build
from trainers.stages import REPO, plan_names


def deepspeed_config(plan: Plan, max_grad_norm: float) -> dict | None:
    """The DS JSON for the plan (trainers/ds_config.py's build, the one the runtime makes for the
    same flags), or None when the plan runs DDP / one process."""
    s = plan.setup
    if not s.deepspeed:
        return None
    settings = DeepSpeedSettings(micro_batch=s.micro_batch, accumulation=plan.chosen.accumulation, world_size=s.world,
                                 max_grad_norm=max_grad_norm, precision=s.precision, zero_stage=str(s.zero_stage),
                                 offload=s.offload, sources={}, hidden_size=plan.request.shape.hidden)
    return build(s.zero_stage, s.offload, settings)


def rendezvous_port(seed: str) -> int:
    """A port in 20000-29999 derived from `seed` (a Slurm job id, an output dir), so two jobs on
    one head node do not collide and every node computes the same one."""
    return 20000 + zlib.crc32(seed.encode()) % 10000


def accelerate_config(plan: Plan, ds_config_path: Path | None, main_process_ip: str = "127.0.0.1",
                      main_process_port: int = 29500, machine_rank: int = 0) -> dict:
    """accelerate.yaml: topology only (hyperparameters live in the run config)."""
    s, hw = plan.setup, plan.request.hardware
    if s.deepspeed:
        kind = "DEEPSPEED"
    elif hw.gpu is None:
        kind = "MULTI_CPU" if s.world > 1 else "NO"
    else:
        kind = "MULTI_GPU" if s.world > 1 else "NO"
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": kind,
        "num_machines": hw.nodes,
        "num_processes": s.world,
        "machine_rank": machine_rank,
        "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
        "rdzv_backend": "c10d" if hw.nodes > 1 else "static",
        "same_network": True,
        "use_cpu": hw.gpu is None,
        "gpu_ids": "all",
        "main_training_function": "main",
        "downcast_bf16": "no",
    }
    if s.deepspeed:
        # precision comes from the DS JSON; zero.Init stays off so a from-scratch init is the same on every rank count
        config["deepspeed_config"] = {"deepspeed_config_file": str(ds_config_path), "zero3_init_flag": False,
                                      "deepspeed_multinode_launcher": "standard"}
    else:
        config["mixed_precision"] = {"bf16": "bf16", "fp16": "fp16"}.get(s.precision, "no")
    return config


def run_arguments(plan: Plan, ds_config_path: Path | None) -> list[str]:
    """The flags that pin the run to the plan (appended after the user's, so they win)."""
    s = plan.setup
    pinned = ["--per_device_train_batch_size", str(s.micro_batch),
              "--gradient_accumulation_steps", str(plan.chosen.accumulation),
              "--global_batch_size", str(plan.global_batch),
              "--gradient_checkpointing" if s.gradient_checkpointing else "--no-gradient_checkpointing",
              "--deepspeed", str(ds_config_path) if ds_config_path else "none",
              "--precision", s.precision]
    if plan.request.quantization_auto:  # the base the plan chose, decided: the run does not choose again
        pinned += ["--quantization", "none", "--load_in_4bit" if s.base_bits == 4 else "--no-load_in_4bit"]
    return pinned


def without_flags(argv: list[str], flags: set[str]) -> list[str]:
    """`argv` less the given flags and their values (--x v, --x=v, --no-x, and the --bf16-style
    aliases of --precision), so the command states each pinned flag once."""
    names = {f.removeprefix("--").removeprefix("no-") for f in flags}
    if "precision" in names:
        names |= {"bf16", "fp16", "fp32"}
    out, skip_value = [], False
    for arg in argv:
        if skip_value and not arg.startswith("--"):
            skip_value = False
            continue
        skip_value = False
        name = arg.removeprefix("--").split("=", 1)[0].removeprefix("no-") if arg.startswith("--") else None
        if name in names:
            skip_value = "=" not in arg
            continue
        out.append(arg)
    return out


def launch_command(plan: Plan, stage: str, user_args: list[str], ds_config_path: Path | None, rdzv_seed: str) -> list[str]:
    """The command for one node: python (one rank), torchrun (several ranks on this node), or,
    for several nodes, the torchrun line every node runs with its own $NODE_RANK and the head
    node's address in $MASTER_ADDR (slurm/*.sbatch fill both from the allocation)."""
    script = str(REPO / plan_names()[stage].entry_script)
    pinned = run_arguments(plan, ds_config_path)
    args = [*without_flags(user_args, {a for a in pinned if a.startswith("--")}), *pinned]
    hw = plan.request.hardware
    if hw.world_size == 1:
        return [sys.executable, script, *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if hw.nodes == 1:
        return [*torchrun, "--standalone", "--nproc_per_node", str(hw.devices_per_node), script, *args]
    return [*torchrun, "--nnodes", str(hw.nodes), "--node_rank", "$NODE_RANK", "--nproc_per_node", str(hw.devices_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"$MASTER_ADDR:{rendezvous_port(rdzv_seed)}", script, *args]


def shell_line(env: dict, command: list[str]) -> str:
    """The command as a user would type it (placeholders like $NODE_RANK left unquoted)."""
    words = [w if w.startswith("$") or "$MASTER_ADDR:" in w else shlex.quote(w) for w in command]
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *words])


def write_files(plan: Plan, out: Path, max_grad_norm: float) -> tuple[Path | None, Path]:
    """ds_config.json (DeepSpeed plans) and accelerate.yaml into `out`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    ds = deepspeed_config(plan, max_grad_norm)
    ds_path = None
    if ds is not None:
        ds_path = out / "ds_config.json"
        ds_path.write_text(json.dumps(ds, indent=2) + "\n")
    acc_path = out / "accelerate.yaml"
    acc = accelerate_config(plan, ds_path.resolve() if ds_path else None, main_process_port=rendezvous_port(str(out.resolve())))
    acc_path.write_text("# written by trainrig plan: topology only; the run config holds the hyperparameters\n"
                        + yaml.safe_dump(acc, sort_keys=False))
    return ds_path, acc_path
