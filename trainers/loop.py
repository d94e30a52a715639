"""What every training loop shares: batch arithmetic, the optimizer step over a window of micro
batches, logging, evaluation, checkpoints and the final save. Each trainer (pretrain.py, sft.py)
keeps its own loop, top to bottom, and calls these.

The loss of an optimizer step is the mean over every trained token of the whole global batch
(all micro batches, all ranks): each micro batch's summed loss is divided by the global token
count, which is known before the first backward because the window's batches are fetched first.
So accumulation, world size and packing change nothing but the speed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers import checkpoint as ckpt
from trainers import stopping
from trainers.data.collate import model_inputs, num_tokens, trained_tokens
from trainers.errors import RunFailed, UsageError

log = logging.getLogger("trainrig.loop")


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


def batch_stream(loader, sampler, state: dict, micro: int):
    """Micro batches forever, epoch after epoch, from the saved position. The position counts
    batches handed out, so a window that crosses an epoch is recorded exactly."""
    while True:
        sampler.set_position(state["epoch"], state["samples_in_epoch"])
        for batch in loader:
            state["samples_in_epoch"] += micro
            yield batch
        state["epoch"] += 1
        state["samples_in_epoch"] = 0


def lm_loss(model, batch: dict, device, denominator: torch.Tensor, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal LM: this micro batch's summed token loss over the global trained-token count.
    mask_dtype: the shared attention mask's (trainers/attention.py mask_dtype), None under FlashAttention."""
    return model(**model_inputs(batch, device, mask_dtype), num_items_in_batch=denominator).loss


def lm_counts(batch: dict) -> tuple[int, int]:
    """(trained tokens, input tokens, padding excluded) of a micro batch."""
    return trained_tokens(batch["labels"]), num_tokens(batch)


@dataclass
class StepResult:
    """What one optimizer step did, the same on every rank except `finite_here`."""

    loss: float  # global mean per trained unit (NaN/Inf when some rank's was)
    grad_norm: float | None  # pre-clip global norm; None where the engine keeps it
    units: int  # trained units of the global batch (tokens, or pairs for the reward model)
    input_tokens: int  # input tokens of the global batch, padding excluded
    applied: bool  # False: every rank skipped this update (non-finite loss or gradients)
    finite_here: bool  # this rank's micro losses were all finite


def train_step(runtime, model, optimizer, window: list[dict], max_grad_norm: float,
               loss_sum=lm_loss, counts=lm_counts) -> StepResult:
    """One optimizer step over `window` (this rank's micro batches). A unit is a trained token for
    the language model (lm_loss); the reward model passes its pairwise loss and counts pairs.

    A micro loss that is NaN/Inf is backpropagated multiplied by NaN (by 1.0 otherwise, which
    changes no bit), so its gradients are NaN whatever produced it; the gradient reduction carries
    that NaN into every rank's global norm, and every rank skips the same update
    (runtime.optimizer_step) without an extra collective."""
    per_batch = [counts(b) for b in window]
    global_units, input_tokens = runtime.all_reduce_sum([sum(c[0] for c in per_batch), sum(c[1] for c in per_batch)])
    if global_units == 0:  # the data preparation drops every sample without a trained token
        raise RuntimeError("a global batch without a single trained token reached the loss")
    scale = len(window) * runtime.world_size  # undo the engines' mean over micro steps and ranks
    loss_denominator = torch.tensor(global_units, device=runtime.device)
    step_loss = torch.zeros((), device=runtime.device)
    grad_norm, applied = None, True
    for batch in window:
        with runtime.accumulate(model):
            # only the loss is kept: holding the 16-bit logits through the backward costs 2 x vocab bytes per token
            loss = loss_sum(model, batch, runtime.device, loss_denominator)
            poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))  # no host sync
            runtime.backward(loss * scale * poison)  # loss = this micro batch's summed loss / global units
            step_loss += loss.detach().float()
            if runtime.sync_gradients:
                grad_norm = runtime.clip_grad_norm(model, max_grad_norm)
                applied = runtime.optimizer_step(optimizer, grad_norm)
            optimizer.zero_grad(set_to_none=True)
    if grad_norm is None:
        grad_norm = runtime.grad_norm_after_step()
    finite_here = math.isfinite(step_loss.item())
    (loss,) = runtime.all_reduce_sum([step_loss.item()])
    return StepResult(loss, grad_norm, int(global_units), int(input_tokens), applied, finite_here)


def account_step(runtime, state: dict, result: StepResult, window: list[dict], tracker, max_bad_steps: int, out: Path) -> None:
    """After state["step"] advanced: a skipped update is logged with the ranks whose loss was not
    finite and the ids of their samples, counted in state (saved with checkpoints) and written to
    metrics.jsonl; more than `max_bad_steps` bad steps in a row stop the run on every rank. A
    skipped step still consumes its batches and its place in the learning-rate schedule; the
    weights and optimizer state stay as they were. fp16's loss-scale skips (finite loss) are
    counted but are not bad: the scaler lowers its scale and goes on."""
    state.setdefault("skipped_steps", 0)
    state.setdefault("bad_steps_in_a_row", 0)
    if result.applied:
        state["bad_steps_in_a_row"] = 0
        return
    step = state["step"]
    state["skipped_steps"] += 1
    bad = not math.isfinite(result.loss) or runtime.precision != "fp16"
    here = [] if result.finite_here else [(runtime.rank, [int(i) for b in window for i in b.get("sample_ids", [])][:32])]
    culprits = runtime.gather_objects(here)  # every rank agrees the step was skipped, so every rank joins
    where = "; ".join(f"rank {r} (sample ids {ids})" for r, ids in culprits) or "gradients only (every loss finite)"
    tracker.log({"step": step, "skipped_update": True, "bad": bad, "nonfinite_loss_ranks": [r for r, _ in culprits],
                 "skipped_steps": state["skipped_steps"]})
    if not bad:
        log.info("step %d: fp16 loss scale overflow, update skipped (the scaler lowers its scale)", step)
        return
    state["bad_steps_in_a_row"] += 1
    in_a_row = state["bad_steps_in_a_row"]
    if runtime.is_main:
        log.warning("step %d: non-finite loss or gradient norm (loss %s, grad_norm %s) from %s: update skipped on every rank "
                    "(%d in a row, --max_bad_steps %d)", step, result.loss, result.grad_norm, where, in_a_row, max_bad_steps)
    if in_a_row > max_bad_steps:
        newest = ckpt.complete_checkpoints(out)
        raise RunFailed(f"steps {step - in_a_row + 1}-{step}: {in_a_row} updates in a row skipped for a non-finite loss or gradient "
                        f"norm (more than --max_bad_steps {max_bad_steps}; last from {where}); the weights are those of step "
                        f"{step - in_a_row}, the newest checkpoint is {newest[-1] if newest else 'none'}. Lower --learning_rate or "
                        f"raise the warmup, check those samples, or use --precision bf16/fp32 instead of fp16")


class SampleLog:
    """--record_sample_ids: every rank appends `{"step", "epoch", "ids"}` per optimizer step to
    sample_ids.rank<N>.jsonl, the samples of its micro batches in order. A resumed run first drops
    the lines past its checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, rank: int, enabled: bool, resumed_step: int):
        self.path = out / f"sample_ids.rank{rank}.jsonl" if enabled else None
        if self.path is None:
            return
        kept = []
        if resumed_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # torn by a kill mid-write
                    continue
                if record["step"] <= resumed_step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))

    def write(self, step: int, epoch: int, window: list[dict]) -> None:
        if self.path is not None:
            ids = [int(i) for b in window for i in b["sample_ids"]]
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")


@torch.no_grad()
def evaluate(runtime, model, dataset, batch_size: int, collate, mask_dtype: torch.dtype | None = None) -> dict:
    """Mean loss per trained token and perplexity over `dataset`, split across ranks. Every rank
    runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each)."""
    model.eval()
    parts = np.array_split(np.arange(len(dataset)), runtime.world_size)
    mine = parts[runtime.rank]
    n_batches = math.ceil(max(len(p) for p in parts) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0 if len(idx) else 0.0  # an idle rank still joins the collective forward
        batch = collate([dataset[int(i)] for i in (idx if len(idx) else [0])])
        out = model(**model_inputs(batch, runtime.device, mask_dtype), num_items_in_batch=1)  # reduction "sum" over the batch's tokens
        loss_sum += weight * out.loss.double().cpu()
        tokens += trained_tokens(batch["labels"]) if weight else 0
    model.train()
    total_loss, total_tokens = runtime.all_reduce_sum([loss_sum.item(), tokens])
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(total_tokens)}


def save_and_prune(runtime, model, optimizer, state: dict, out: Path, run_cfg, evaluated: dict | None) -> None:
    """checkpoint-<step>/ (all ranks), then rank 0 applies --save_total_limit (keeping the best)."""
    step = state["step"]
    is_best = evaluated is not None and (state["best_eval_loss"] is None or evaluated["eval_loss"] < state["best_eval_loss"])
    if is_best:
        state.update(best_eval_loss=evaluated["eval_loss"], best_checkpoint=f"checkpoint-{step}")
    path = ckpt.save_checkpoint(runtime, model, optimizer, dict(state), out, step)
    log.info("saved %s", path)
    if runtime.is_main:
        best = out / state["best_checkpoint"] if run_cfg.save_best and state["best_checkpoint"] else None
        ckpt.prune_checkpoints(out, run_cfg.save_total_limit, best)


def save_on_stop(runtime, model, optimizer, state: dict, out: Path, run_cfg, reason: str, saved: bool) -> None:
    """All ranks agreed to stop (trainers/stopping.py): one complete checkpoint of this step,
    unless --save_steps has just written it."""
    if runtime.is_main:
        log.warning("%s: saving checkpoint-%d, then exiting with status %d; the same command (--resume auto) continues from it",
                    reason, state["step"], stopping.STOPPED_EXIT_STATUS)
    if not saved:
        save_and_prune(runtime, model, optimizer, state, out, run_cfg, None)


def report_outcome(runtime, out: Path, state: dict, resumed_step: int, stopped: str | None) -> None:
    """How the run ended, for whoever launched it ($TRAINRIG_STATUS_FILE; slurm/common.sh requeues
    a stopped run that made progress)."""
    if runtime.is_main:
        stopping.write_status(os.environ.get(stopping.STATUS_FILE_ENV), {
            "status": "stopped" if stopped else "completed", "reason": stopped, "step": state["step"],
            "resumed_from_step": resumed_step, "output_dir": str(out),
            "checkpoint": str(out / f"checkpoint-{state['step']}") if stopped else None})


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


def write_plan(out: Path, runtime, cfg, attn: str, why: str, global_batch: int, extra: dict | None = None) -> None:
    """plan.json: what this run decided (strategy, batch arithmetic, precision, attention) and the
    memory model's estimate for it (launch/plan.py)."""
    device = runtime.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    plan = {
        "hardware": {"device": hardware, "world_size": runtime.world_size},
        "strategy": {"name": runtime.strategy, "zero_stage": runtime.zero_stage or 0, "offload": runtime.offload},
        "env": {k: os.environ[k] for k in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE") if k in os.environ},
        "micro_batch_size": cfg.batch.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.batch.gradient_accumulation_steps,
        "global_batch_size": global_batch, "world_size": runtime.world_size,
        "precision": runtime.precision, "attn_implementation": attn, "attn_reason": why, **(extra or {}),
    }
    planned = getattr(cfg, "_plan", None)
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


def save_final(runtime, model, tokenizer, out: Path, adapter_only: bool = False) -> Path:
    """final/: save_pretrained (safetensors) + tokenizer -- the whole model, or with LoRA only the
    adapter -- written under a temporary name and renamed when complete; gathered from all ranks
    under ZeRO-3."""
    state_dict = runtime.full_state_dict(model, trainable_only=adapter_only)
    final, partial = out / "final", out / "final.partial"
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        unwrapped = runtime.unwrap(model)
        if not adapter_only:
            unwrapped.config.use_cache = True  # for generation after training
        unwrapped.save_pretrained(str(partial), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(partial))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        log.info("saved %s", final)
    runtime.barrier()
    return final
