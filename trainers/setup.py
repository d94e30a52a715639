"""The start of every stage's run, before and around its own data and model code: batch
arithmetic, the runtime, logging, the checks all ranks must pass, the model's finishing touches
(chunked loss, compiled layers), the optimizer, and plan.json."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from trainers import checkpoint as ckpt
from trainers.attention import resolve_attn_implementation
from trainers.chunked_loss import use_chunked_loss
from trainers.config import Run, save_resolved_config
from trainers.errors import UsageError, check_output_dir
from trainers.models import check_torch_compile, compile_decoder_layers
from trainers.optim import build_optimizer
from trainers.quantization import base_bits
from trainers.runtime import Runtime, launcher_world

log = logging.getLogger("trainrig.setup")


def resolve_batch(run: Run) -> None:
    """The accumulation for the launcher's world size (--global_batch_size fixes it), before any
    other check, so every message quotes the numbers the run uses."""
    world_size, _, _ = launcher_world()
    keep_resumed_global_batch(run, world_size)
    run.cfg.batch.gradient_accumulation_steps = resolve_accumulation(run.cfg.batch, world_size)


def keep_resumed_global_batch(run: Run, world_size: int) -> None:
    """A resume on another world size (a Slurm requeue onto other nodes, another GPU count)
    keeps the checkpoint's global batch, the accumulation recomputed for this world, unless
    --global_batch_size is given: the same flags then train on as the saving run did. Before the
    planner sizes an `auto` batch, so it plans for that global batch."""
    batch = run.cfg.batch
    if batch.global_batch_size > 0:
        return
    path = ckpt.resume_candidate(run.cfg.run.resume, Path(run.cfg.run.output_dir))
    try:
        state = ckpt.saved_state(path) if path is not None else None
    except (OSError, ValueError, KeyError):  # unreadable: the resume itself says why, once the ranks run
        return
    if state is not None and state["world_size"] != world_size:
        batch.global_batch_size = state["global_batch"]


def start(run: Run, model_config) -> Runtime:
    """After the stage's own config checks: the settings that contradict each other or the output
    directory, the seed, the runtime (launcher, engine, device), logging, the ranks' agreement on
    the plan, and resolved_config.yaml."""
    cfg = run.cfg
    out = Path(cfg.run.output_dir)
    check_run_settings(cfg, out)
    check_output_dir(out)  # every rank: on several nodes each must be able to write its shards
    seed_everything(cfg.run.seed)
    runtime = Runtime(cfg.dist, cfg.batch, cfg.optim, run.sources, hidden_size=model_config.hidden_size)
    setup_logging(runtime.is_main)
    check_shared_filesystem(runtime, shared_places(cfg))
    check_plan_agrees(runtime, cfg)
    check_torch_compile(cfg.model.torch_compile, runtime.device, runtime.zero_stage)
    if runtime.is_main:
        save_resolved_config(cfg, out / "resolved_config.yaml")
    return runtime


def shared_places(cfg) -> dict[str, Path]:
    """The directories every rank must see as rank 0 writes them: the output directory
    (checkpoints: every rank writes its shards and RNG state into one directory, a resume on another
    world size reads the conversion rank 0 wrote) and, for a stage that caches its data, the data
    cache (rank 0 builds it, the others read it)."""
    places = {"--output_dir": Path(cfg.run.output_dir)}
    if not hasattr(cfg.data, "data_cache_dir"):  # the reward model reads its pairs without a cache
        return places
    if cfg.data.data_cache_dir:
        return {**places, "--data_cache_dir": Path(cfg.data.data_cache_dir).expanduser()}
    return {**places, "the data cache ($TRAINRIG_CACHE, --data_cache_dir)": Path(os.environ.get("TRAINRIG_CACHE", "~/.cache/trainrig")).expanduser()}


SHARED_PROBE_WAIT_S = 10  # a network filesystem may show another client's new file a moment late


def check_shared_filesystem(runtime, places: dict[str, Path]) -> None:
    """With several ranks: rank 0 writes a probe file into each place, and every rank must read
    it back. A node with its own disk at that path (a node-local /tmp, /scratch, or a mount
    missing on one node) stops the run here, named, instead of writing its checkpoint shards where
    no resume will find them or building a data cache of its own. All ranks call this."""
    if runtime.world_size == 1:
        return
    token, problem = (uuid.uuid4().hex, None) if runtime.is_main else (None, None)
    probes = {label: path / f".trainrig-shared-{token}" for label, path in places.items()}
    try:
        if runtime.is_main:
            for label, path in places.items():
                try:
                    path.mkdir(parents=True, exist_ok=True)
                    probes[label].write_text(token)
                except OSError as err:
                    problem = f"{label} {path}: not writable ({err.strerror}); choose a directory you can write to"
                    break
        token, problem, writer = runtime.broadcast_object((token, problem, node_name()))
        if problem:
            raise UsageError(problem)
        blind = []
        for label, path in places.items():
            probe, deadline = path / f".trainrig-shared-{token}", time.monotonic() + SHARED_PROBE_WAIT_S
            while not _holds(probe, token) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _holds(probe, token):
                blind.append(label)
        unseen = runtime.gather_objects([(label, runtime.rank, node_name()) for label in blind])
    finally:
        if runtime.is_main:  # after the gather: every rank has looked
            for probe in probes.values():
                with contextlib.suppress(OSError):  # never written (rank 0 could not), or already gone
                    probe.unlink()
    if unseen:
        raise UsageError(unshared_message(places, writer, unseen))


def node_name() -> str:
    """This machine as its scheduler names it (Slurm's node name), else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _holds(probe: Path, token: str) -> bool:
    try:
        return probe.read_text() == token
    except OSError:
        return False


def unshared_message(places: dict[str, Path], writer: str, unseen: list[tuple[str, int, str]]) -> str:
    """The error for the (place, rank, node) triples that could not read rank 0's probe file."""
    label = unseen[0][0]
    nodes: dict[str, list[int]] = {}
    for place, rank, node in unseen:
        if place == label:
            nodes.setdefault(node, []).append(rank)
    where = ", ".join(f"node {node} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" for node, ranks in nodes.items())
    return (f"{label} {places[label]}: rank 0 on node {writer} wrote a file there that {where} cannot see after "
            f"{SHARED_PROBE_WAIT_S} s: this directory must be one filesystem that every node mounts (checkpoints, the data "
            f"cache and a resume on another world size are shared through it), not a node-local disk such as /tmp; put it on "
            f"shared storage (NFS, Lustre, GPFS; $HOME on most clusters) and submit again")


def attention(runtime: Runtime, model_cfg) -> tuple[str, str]:
    """(the attention kernel the model is built with, why), logged (trainers/attention.py)."""
    attn, why = resolve_attn_implementation(model_cfg.attn_implementation, runtime.device, runtime.precision)
    log.info("attention: %s (%s)", attn, why)
    return attn, why


def validation_split(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training indices, validation indices or None) of n samples: a seeded random `ratio` of them
    (at least one) held out, both sorted. Random, because files are often sorted by topic."""
    if ratio <= 0 or n < 2:
        return np.arange(n), None
    split = n - max(1, int(n * ratio))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:split]), np.sort(order[split:])


def finish_model(model, model_cfg, vocab_head: bool = True) -> dict:
    """The chunked loss (a vocabulary head only) and compiled decoder layers, logged; what plan.json records of them."""
    facts = {}
    if vocab_head:
        chunked, loss_why = use_chunked_loss(model, model_cfg.chunked_loss)
        log.info("loss: %s", loss_why)
        facts.update(chunked_loss=chunked, loss_reason=loss_why)
    compiled, compile_why = compile_decoder_layers(model, model_cfg.torch_compile)
    log.info("compile: %s", compile_why)
    facts["compiled_layers"] = compiled
    return facts


def trainable_parameters(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ds_numel: the full size under ZeRO-3


def prepare(runtime: Runtime, model, optim_cfg):
    """(engine-wrapped model, wrapped optimizer, the optimizer itself): the last one's param_groups
    carry the learning rate the schedule sets, whatever wraps it."""
    optimizer = build_optimizer(model, optim_cfg, runtime.device)
    model, wrapped = runtime.prepare(model, optimizer)
    return model, wrapped, optimizer


def resolve_accumulation(batch_cfg, world_size: int) -> int:
    """--global_batch_size, when given, fixes the accumulation: global = micro x accumulation x world."""
    if "auto" in (batch_cfg.per_device_train_batch_size, batch_cfg.gradient_accumulation_steps):
        raise UsageError("--per_device_train_batch_size/--gradient_accumulation_steps auto are sized by the planner: "
                         "run launch/pretrain.py or launch/sft.py (or trainrig launch), or give numbers")
    if batch_cfg.global_batch_size <= 0:
        return batch_cfg.gradient_accumulation_steps
    per_step = batch_cfg.per_device_train_batch_size * world_size
    if batch_cfg.global_batch_size % per_step:
        raise UsageError(f"--global_batch_size {batch_cfg.global_batch_size} is not a multiple of micro batch "
                         f"{batch_cfg.per_device_train_batch_size} x world {world_size} = {per_step}; pick a multiple of {per_step}")
    return batch_cfg.global_batch_size // per_step


def plan_steps(sampler, run_cfg, micro: int, accumulation: int, world_size: int, what: str, lower: str) -> tuple[int, int]:
    """(steps per epoch, total steps) from this rank's share of the data; less than one global
    batch is a usage error naming `what` (e.g. "1,000 training blocks") and the flags to `lower`."""
    steps_per_epoch = sampler.num_samples // (micro * accumulation)
    if steps_per_epoch == 0:
        raise UsageError(f"--train_files: {what} make less than one global batch of {micro * accumulation * world_size} "
                         f"(micro {micro} x accumulation {accumulation} x world {world_size}); add data or lower {lower}")
    total = run_cfg.max_steps if run_cfg.max_steps > 0 else math.ceil(run_cfg.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total


def check_run_settings(cfg, out: Path) -> None:
    """Settings that contradict each other or the output directory, before any work."""
    if cfg.run.save_best and (cfg.run.eval_steps == 0 or cfg.run.save_steps % cfg.run.eval_steps):
        raise UsageError(f"--save_best needs --eval_steps dividing --save_steps (got {cfg.run.eval_steps} and {cfg.run.save_steps}), "
                         f"so every checkpoint has an eval loss")
    if cfg.run.resume == "never" and ckpt.complete_checkpoints(out):
        raise UsageError(f"--resume never, but {out} holds checkpoints of an earlier run that --save_total_limit would mix "
                         f"with this one; use --resume auto to continue it, or a new --output_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(is_main: bool) -> None:
    """trainrig's messages on stdout; other ranks only warn (one log a user can follow)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("trainrig").setLevel(logging.INFO if is_main else logging.WARNING)


def loader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator: each new iterator (every epoch, every resume) draws a
    worker seed from it instead of from the global RNG, which would shift the dropout stream of a
    resumed run by one draw."""
    return torch.Generator().manual_seed(seed)


def check_plan_agrees(runtime, cfg) -> None:
    """Every rank planned for itself (launch/plan.py); a rank whose GPU differs would size its
    batch differently and the first collective would hang or mix shapes. Compare with rank 0's."""
    mine = (cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps,
            cfg.model.gradient_checkpointing, runtime.zero_stage, runtime.offload)
    reference = runtime.broadcast_object(mine)
    (disagreeing,) = runtime.all_reduce_sum([float(mine != reference)])
    if disagreeing:
        raise RuntimeError(f"{int(disagreeing)} rank(s) planned differently from rank 0 (rank {runtime.rank}: micro, accumulation, "
                           f"checkpointing, ZeRO stage, offload = {mine}; rank 0: {reference}); mixed GPUs? pass the batch flags as numbers")


def write_plan(run: Run, runtime, attn: str, why: str, extra: dict | None = None) -> None:
    """plan.json: what this run decided (strategy, batch arithmetic, precision, attention) and the
    memory model's estimate for it (launch/plan.py)."""
    cfg = run.cfg
    out = Path(cfg.run.output_dir)
    global_batch = cfg.batch.per_device_train_batch_size * cfg.batch.gradient_accumulation_steps * runtime.world_size
    device = runtime.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    plan = {
        "hardware": {"device": hardware, "world_size": runtime.world_size},
        "strategy": {"name": runtime.strategy, "zero_stage": runtime.zero_stage or 0, "offload": runtime.offload},
        "env": {k: os.environ[k] for k in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE") if k in os.environ},
        "micro_batch_size": cfg.batch.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.batch.gradient_accumulation_steps,
        "global_batch_size": global_batch, "world_size": runtime.world_size,
        "precision": runtime.precision, "attn_implementation": attn, "attn_reason": why,
        "lora_r": cfg.lora.lora_r, "base_bits": base_bits(cfg.lora), **(extra or {}),
    }
    planned = run.plan
    if planned:
        plan.update(memory_gb=planned["memory_gb"], fits=planned["fits"], safety_margin=planned["safety_margin"],
                    planned_for=planned["hardware"]["description"], plan_notes=planned["notes"])
        memory = planned["memory_gb"]
        log.info("memory model: %.2f GiB per rank of %.2f (%s)%s", memory["total"], memory["available"],
                 "fits" if planned["fits"] else "DOES NOT FIT: expect out-of-memory",
                 "" if planned["fits"] else "; try --per_device_train_batch_size auto")
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    if runtime.ds_config is not None:
        (out / "ds_config.json").write_text(json.dumps(runtime.ds_config, indent=2))
