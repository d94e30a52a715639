"""Pretraining from scratch (--model_preset) and continued pretraining (--model_name_or_path) on packed blocks.

Sections, in the order every trainer follows:
config -> runtime -> data -> model -> optimizer -> resume -> loop -> save -> eval.

The loss of an optimizer step is the mean over every trained token of the whole global batch
(all micro batches, all ranks): each micro batch's summed loss is divided by the global token
count, which is known before the first backward because the window's batches are fetched first.
So accumulation and world size change nothing but the speed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from trainers import checkpoint as ckpt
from trainers.config import PretrainConfig, save_resolved_config
from trainers.data.collate import ResumableSampler, collate_blocks, trained_tokens
from trainers.data.packing import prepare_blocks
from trainers.errors import UsageError, check_output_dir
from trainers.models import build_model, count_parameters, load_tokenizer, resolve_attn_implementation, resolve_model_config
from trainers.optim import build_optimizer, set_learning_rate
from trainers.runtime import Runtime, launcher_world
from trainers.tracking import METRICS_FILE, Throughput, Tracker, plot_loss

log = logging.getLogger("trainrig.pretrain")


def resolve_accumulation(batch_cfg, world_size: int) -> int:
    """--global_batch_size, when given, fixes the accumulation: global = micro x accumulation x world."""
    if batch_cfg.global_batch_size <= 0:
        return batch_cfg.gradient_accumulation_steps
    per_step = batch_cfg.per_device_train_batch_size * world_size
    if batch_cfg.global_batch_size % per_step:
        raise UsageError(f"--global_batch_size {batch_cfg.global_batch_size} is not a multiple of micro batch "
                         f"{batch_cfg.per_device_train_batch_size} x world {world_size} = {per_step}; pick a multiple of {per_step}")
    return batch_cfg.global_batch_size // per_step


def setup_logging(is_main: bool) -> None:
    """trainrig's messages on stdout; other ranks only warn (one log a user can follow)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("trainrig").setLevel(logging.INFO if is_main else logging.WARNING)


@torch.no_grad()
def evaluate(runtime, model, blocks, batch_size: int) -> dict:
    """Mean loss per token and perplexity over `blocks`, split across ranks. Every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters collectively in each)."""
    model.eval()
    parts = np.array_split(np.arange(len(blocks)), runtime.world_size)
    mine = parts[runtime.rank]
    n_batches = math.ceil(max(len(p) for p in parts) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0 if len(idx) else 0.0  # an idle rank still joins the collective forward
        batch = collate_blocks([blocks[int(i)] for i in (idx if len(idx) else [0])])
        out = model(input_ids=batch["input_ids"].to(runtime.device), labels=batch["labels"].to(runtime.device),
                    num_items_in_batch=1)  # reduction "sum" over the batch's tokens
        loss_sum += weight * out.loss.double().cpu()
        tokens += trained_tokens(batch["labels"]) if weight else 0
    model.train()
    total_loss, total_tokens = runtime.all_reduce_sum([loss_sum.item(), tokens])
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(total_tokens)}


def train(cfg: PretrainConfig) -> dict:
    # ------------------------------------------------------------------------ config
    out = Path(cfg.run.output_dir)
    world_size, _, _ = launcher_world()
    cfg.batch.gradient_accumulation_steps = resolve_accumulation(cfg.batch, world_size)
    m, d = cfg.model, cfg.data
    if bool(m.model_preset) == bool(m.model_name_or_path):
        raise UsageError("pass exactly one of --model_preset (from scratch) or --model_name_or_path (continued pretraining)")
    model_config = resolve_model_config(m, d.block_size)  # before any data work: bad paths and sizes fail fast
    if cfg.run.save_best and (cfg.run.eval_steps == 0 or cfg.run.save_steps % cfg.run.eval_steps):
        raise UsageError(f"--save_best needs --eval_steps dividing --save_steps (got {cfg.run.eval_steps} and {cfg.run.save_steps}), "
                         f"so every checkpoint has an eval loss")
    if cfg.run.resume == "never" and ckpt.complete_checkpoints(out):
        raise UsageError(f"--resume never, but {out} holds checkpoints of an earlier run that --save_total_limit would mix "
                         f"with this one; use --resume auto to continue it, or a new --output_dir")
    check_output_dir(out)  # every rank: on several nodes each must be able to write its shards
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    # ----------------------------------------------------------------------- runtime
    runtime = Runtime(cfg.dist, cfg.batch, cfg.optim, getattr(cfg, "_sources", {}),
                      uses_muon=cfg.optim.optimizer == "muon")
    setup_logging(runtime.is_main)
    if runtime.is_main:
        save_resolved_config(cfg, out / "resolved_config.yaml")

    # -------------------------------------------------------------------------- data
    tokenizer_flag = "--model_name_or_path" if m.model_name_or_path and not m.tokenizer_name_or_path else "--tokenizer_name_or_path"
    tokenizer = load_tokenizer(m.tokenizer_name_or_path or m.model_name_or_path, m.trust_remote_code, tokenizer_flag)

    def blocks_for(patterns, flag):
        return runtime.main_first(lambda: prepare_blocks(patterns, flag, tokenizer, d.block_size, d.text_field,
                                                         d.data_cache_dir, d.tokenize_batch_size, build=runtime.is_main))

    train_blocks = blocks_for(d.train_files, "--train_files")
    if d.validation_files:
        eval_blocks = blocks_for(d.validation_files, "--validation_files")
    elif d.validation_split_ratio > 0 and len(train_blocks) >= 2:
        split = len(train_blocks) - max(1, int(len(train_blocks) * d.validation_split_ratio))
        train_blocks, eval_blocks = Subset(train_blocks, range(split)), Subset(train_blocks, range(split, len(train_blocks)))
    else:
        eval_blocks = None
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    sampler = ResumableSampler(train_blocks, runtime.world_size, runtime.rank, seed=cfg.run.seed)
    loader = DataLoader(train_blocks, batch_size=micro, sampler=sampler, collate_fn=collate_blocks, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda")
    steps_per_epoch = sampler.num_samples // (micro * accumulation)
    if steps_per_epoch == 0:
        global_batch = micro * accumulation * runtime.world_size
        raise UsageError(f"--train_files: {len(train_blocks)} training blocks make less than one global batch of {global_batch} "
                         f"(micro {micro} x accumulation {accumulation} x world {runtime.world_size}); add data or lower "
                         f"--per_device_train_batch_size/--gradient_accumulation_steps/--block_size")
    total_steps = cfg.run.max_steps if cfg.run.max_steps > 0 else math.ceil(cfg.run.num_train_epochs * steps_per_epoch)

    # ------------------------------------------------------------------------- model
    attn, why = resolve_attn_implementation(m.attn_implementation, runtime.device, runtime.precision)
    log.info("attention: %s (%s)", attn, why)
    with runtime.model_init_context(sharded=bool(m.model_name_or_path)):
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed)
    n_params = count_parameters(model)

    # --------------------------------------------------------------------- optimizer
    optimizer = build_optimizer(model, cfg.optim, runtime.device)
    raw_optimizer = optimizer  # its param_groups carry the lr the schedule sets, whatever wraps it
    model, optimizer = runtime.prepare(model, optimizer)
    global_batch = micro * accumulation * runtime.world_size
    tokens_per_step = global_batch * d.block_size
    log.info("model: %s, %.2fM parameters; strategy %s, precision %s, device %s",
             m.model_preset or m.model_name_or_path, n_params / 1e6, runtime.strategy, runtime.precision, runtime.device)
    log.info("batch: micro %d x accumulation %d x world %d = global %d sequences = %s tokens per step; %d steps (%d per epoch over %d blocks)",
             micro, accumulation, runtime.world_size, global_batch, f"{tokens_per_step:,}", total_steps, steps_per_epoch, len(train_blocks))
    if runtime.is_main:
        write_plan(out, runtime, cfg, attn, why, global_batch)

    # ------------------------------------------------------------------------ resume
    state = {"step": 0, "micro_step": 0, "epoch": 0, "samples_in_epoch": 0, "tokens_seen": 0,
             "world_size": runtime.world_size, "best_eval_loss": None, "best_checkpoint": None}
    resume_from = ckpt.resolve_resume(cfg.run.resume, out)
    if resume_from is not None:
        state = ckpt.load_checkpoint(runtime, model, optimizer, resume_from,
                                     expect={"micro_batch": micro, "accumulation": accumulation})
        log.info("resumed from %s at step %d (epoch %d, %d samples into it per rank)",
                 resume_from, state["step"], state["epoch"], state["samples_in_epoch"])
    state.update(micro_batch=micro, accumulation=accumulation)
    tracker = Tracker(out, cfg.run.report_to, cfg.run.run_name, cfg, runtime.is_main, state["step"])

    def stream():
        """Micro batches forever, epoch after epoch, from the saved position. The position
        counts batches handed out, so a window that crosses an epoch is recorded exactly."""
        while True:
            sampler.set_position(state["epoch"], state["samples_in_epoch"])
            for batch in loader:
                state["samples_in_epoch"] += micro
                yield batch
            state["epoch"] += 1
            state["samples_in_epoch"] = 0

    batches = stream()

    # -------------------------------------------------------------------------- loop
    from tqdm.auto import tqdm

    model.train()
    # the bar only on a terminal; batch logs (sbatch, CI) get the per-logging-step lines with ETA
    progress = tqdm(total=total_steps, initial=state["step"], desc="pretrain", dynamic_ncols=True, mininterval=1.0,
                    disable=not (runtime.is_main and sys.stdout.isatty()), file=sys.stdout)
    speed = Throughput()
    window_losses: list[float] = []
    tokens_at_start, start_step = state["tokens_seen"], state["step"]
    last_record: dict = {}
    while state["step"] < total_steps:
        step = state["step"]
        speed.resume()
        lr = set_learning_rate(raw_optimizer, step, total_steps, cfg.optim) * cfg.optim.learning_rate
        window = [next(batches) for _ in range(accumulation)]
        (global_tokens,) = runtime.all_reduce_sum([sum(trained_tokens(b["labels"]) for b in window)])
        scale = accumulation * runtime.world_size  # undo the engines' mean over micro steps and ranks
        loss_denominator = torch.tensor(global_tokens, device=runtime.device)
        step_loss = torch.zeros((), device=runtime.device)
        grad_norm = None
        for batch in window:
            with runtime.accumulate(model):
                outputs = model(input_ids=batch["input_ids"].to(runtime.device), labels=batch["labels"].to(runtime.device),
                             num_items_in_batch=loss_denominator)
                runtime.backward(outputs.loss * scale)  # outputs.loss = this micro batch's token-loss sum / global tokens
                step_loss += outputs.loss.detach().float()
                if runtime.sync_gradients:
                    grad_norm = runtime.clip_grad_norm(model, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["micro_step"] += 1
        if grad_norm is None:
            grad_norm = runtime.grad_norm_after_step()
        (loss,) = runtime.all_reduce_sum([step_loss.item()])  # global mean over every trained token
        state["step"] += 1
        state["tokens_seen"] += int(global_tokens)
        window_losses.append(loss)
        speed.pause()
        progress.update(1)
        step = state["step"]

        if step % cfg.run.logging_steps == 0 or step == total_steps:
            rate = speed.tick(state["tokens_seen"] - tokens_at_start)
            last_record = {"step": step, "loss": sum(window_losses) / len(window_losses), "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_sec": round(rate, 1),
                           "elapsed_s": round(speed.elapsed(), 2), "tokens": state["tokens_seen"],
                           "epoch": round(state["epoch"] + state["samples_in_epoch"] / sampler.num_samples, 4),
                           "peak_memory_gb": round(runtime.peak_memory_gb(), 3)}
            window_losses = []
            tracker.log(last_record)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            if runtime.is_main:
                eta = (total_steps - step) * speed.train_seconds / max(step - start_step, 1)
                norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
                progress.write(f"step {step}/{total_steps} loss {last_record['loss']:.4f} lr {lr:.3e} grad_norm {norm} "
                               f"tok/s {rate:,.0f} mem {last_record['peak_memory_gb']:.2f} GB eta {eta / 60:.1f} min")

        evaluated = None
        if eval_blocks is not None and cfg.run.eval_steps > 0 and step % cfg.run.eval_steps == 0 and step < total_steps:
            evaluated = evaluate(runtime, model, eval_blocks, cfg.batch.per_device_eval_batch_size or micro)
            tracker.log({"step": step, **evaluated})
            log.info("step %d eval_loss %.4f eval_ppl %.2f", step, evaluated["eval_loss"], evaluated["eval_ppl"])

        if cfg.run.save_steps > 0 and step % cfg.run.save_steps == 0:
            is_best = evaluated is not None and (state["best_eval_loss"] is None or evaluated["eval_loss"] < state["best_eval_loss"])
            if is_best:
                state.update(best_eval_loss=evaluated["eval_loss"], best_checkpoint=f"checkpoint-{step}")
            path = ckpt.save_checkpoint(runtime, model, optimizer, dict(state), out, step)
            log.info("saved %s", path)
            if runtime.is_main:
                best = out / state["best_checkpoint"] if cfg.run.save_best and state["best_checkpoint"] else None
                ckpt.prune_checkpoints(out, cfg.run.save_total_limit, best)
    progress.close()

    # -------------------------------------------------------------------------- save
    save_final(runtime, model, tokenizer, out)

    # -------------------------------------------------------------------------- eval
    summary = {"step": state["step"], "loss": last_record.get("loss"), "tokens_seen": state["tokens_seen"],
               "parameters": n_params, "strategy": runtime.strategy, "world_size": runtime.world_size}
    if eval_blocks is not None:
        final_eval = evaluate(runtime, model, eval_blocks, cfg.batch.per_device_eval_batch_size or micro)
        tracker.log({"step": state["step"], **final_eval})
        log.info("final eval_loss %.4f eval_ppl %.2f over %d tokens", final_eval["eval_loss"], final_eval["eval_ppl"], final_eval["eval_tokens"])
        summary.update(final_eval)
    tracker.close()
    if runtime.is_main:
        plot_loss(out / METRICS_FILE, out / "loss.png", title=f"pretrain {m.model_preset or m.model_name_or_path}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    runtime.end()
    return summary


def write_plan(out: Path, runtime, cfg, attn: str, why: str, global_batch: int) -> None:
    """plan.json: what this run decided (strategy, batch arithmetic, precision, attention)."""
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
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    if runtime.ds_config is not None:
        (out / "ds_config.json").write_text(json.dumps(runtime.ds_config, indent=2))


def save_final(runtime, model, tokenizer, out: Path) -> None:
    """final/: save_pretrained (safetensors) + tokenizer, written under a temporary name and
    renamed when complete; gathered from all ranks under ZeRO-3."""
    state_dict = runtime.full_state_dict(model)
    if runtime.is_main:
        final, partial = out / "final", out / "final.partial"
        shutil.rmtree(partial, ignore_errors=True)
        unwrapped = runtime.unwrap(model)
        unwrapped.config.use_cache = True  # for generation after training
        unwrapped.save_pretrained(str(partial), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(partial))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        log.info("saved %s", final)
    runtime.barrier()
