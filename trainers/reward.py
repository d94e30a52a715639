"""Reward model: a scalar head on a causal LM, trained on preference pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected); validation reports pair accuracy (the share of pairs whose
chosen answer scores higher). Full or LoRA, on the same runtime, checkpoints and launchers as SFT.

Sections, in the order every trainer follows:
config -> runtime -> data -> model -> optimizer -> resume -> loop -> save -> eval.
The step is trainers/loop.py's with the pairwise loss; the loss is normalised by the global
number of pairs, so accumulation and world size change nothing but the speed.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainers import checkpoint as ckpt
from trainers import loop, stopping
from trainers.config import RewardConfig, save_resolved_config
from trainers.data.chat import ensure_chat_template
from trainers.attention import mask_dtype, resolve_attn_implementation
from trainers.data.collate import ResumableSampler, model_inputs
from trainers.data.pairs import PairDataset, collate_pairs, encode_pairs
from trainers.errors import UsageError, check_output_dir
from trainers.lora import apply_lora
from trainers.models import TORCH_DTYPES, check_torch_compile, compile_decoder_layers, count_parameters, resolve_model_config, tokenizer_for
from trainers.optim import build_optimizer, set_learning_rate
from trainers.runtime import Runtime, launcher_world
from trainers.tracking import METRICS_FILE, StepLog, Tracker, plot_loss

log = logging.getLogger("trainrig.reward")

LORA_LEARNING_RATE = 1e-4  # with LoRA unless --learning_rate is given (the score head starts from random)


def rewards(model, batch: dict, device, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One scalar per row: the score head at each row's last non-pad token (config.pad_token_id).
    The rows are padded: FlashAttention unpads them by their 2-D mask (varlen kernel); SDPA and
    eager get one shared (B, 1, L, L) mask in `mask_dtype` (trainers/attention.py)."""
    inputs = model_inputs({k: batch[k] for k in ("input_ids", "attention_mask")}, device, mask_dtype)
    return model(**inputs).logits.squeeze(-1).float()


def pairwise_loss(model, batch: dict, device, denominator: torch.Tensor, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """This micro batch's summed -log sigmoid(r_chosen - r_rejected) over the global pair count."""
    r = rewards(model, batch, device, mask_dtype)
    n = batch["pairs"]
    return -F.logsigmoid(r[:n] - r[n:]).sum() / denominator


def pair_counts(batch: dict) -> tuple[int, int]:
    return batch["pairs"], batch["num_tokens"]


@torch.no_grad()
def evaluate_pairs(runtime, model, dataset, batch_size: int, collate, mask_dtype: torch.dtype | None = None) -> dict:
    """Mean pairwise loss and pair accuracy over `dataset`, split across ranks; every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters collectively in each)."""
    model.eval()
    parts = np.array_split(np.arange(len(dataset)), runtime.world_size)
    mine = parts[runtime.rank]
    loss_sum, correct, count = 0.0, 0.0, 0
    for b in range(math.ceil(max(len(p) for p in parts) / batch_size)):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        batch = collate([dataset[int(i)] for i in (idx if len(idx) else [0])])
        r = rewards(model, batch, runtime.device, mask_dtype)
        margin = r[:batch["pairs"]] - r[batch["pairs"]:]
        if len(idx):  # an idle rank still joins the collective forward
            loss_sum += float(-F.logsigmoid(margin).sum())
            correct += float((margin > 0).sum())
            count += len(idx)
    model.train()
    loss_sum, correct, count = runtime.all_reduce_sum([loss_sum, correct, count])
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_pairs": int(count)}


def train(cfg: RewardConfig) -> dict:
    # ------------------------------------------------------------------------ config
    out = Path(cfg.run.output_dir)
    world_size, _, _ = launcher_world()
    cfg.batch.gradient_accumulation_steps = loop.resolve_accumulation(cfg.batch, world_size)
    m, d, lora = cfg.model, cfg.data, cfg.lora
    if not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: the causal LM to put a reward head on (e.g. an SFT run's final/ or final/merged)")
    if lora.merge_lora:
        raise UsageError("--merge_lora is not available for the reward model; its final/ holds the adapter and the score head "
                         "(PeftModel.from_pretrained on AutoModelForSequenceClassification loads it)")
    if lora.lora_r > 0 and "learning_rate" not in getattr(cfg, "_sources", {}):
        cfg.optim.learning_rate = LORA_LEARNING_RATE
    model_config = resolve_model_config(m, d.max_seq_length, "--max_seq_length")  # bad paths and sizes fail before data work
    loop.check_run_settings(cfg, out)
    check_output_dir(out)
    loop.seed_everything(cfg.run.seed)

    # ----------------------------------------------------------------------- runtime
    runtime = Runtime(cfg.dist, cfg.batch, cfg.optim, getattr(cfg, "_sources", {}), uses_muon=cfg.optim.optimizer == "muon",
                      hidden_size=model_config.hidden_size)
    loop.setup_logging(runtime.is_main)
    loop.check_plan_agrees(runtime, cfg)
    check_torch_compile(m.torch_compile, runtime.device, runtime.zero_stage)
    if runtime.is_main:
        save_resolved_config(cfg, out / "resolved_config.yaml")
    attn, why = resolve_attn_implementation(m.attn_implementation, runtime.device, runtime.precision)
    log.info("attention: %s (%s)", attn, why)
    masks = mask_dtype(attn, runtime.precision)

    # -------------------------------------------------------------------------- data
    tokenizer, _ = tokenizer_for(m)
    ensure_chat_template(tokenizer)
    pairs, stats = runtime.main_first(lambda: encode_pairs(d.train_files, "--train_files", tokenizer, d.max_seq_length))
    train_idx, eval_pairs, eval_idx = np.arange(len(pairs)), pairs, None
    if d.validation_files:
        eval_pairs, _ = encode_pairs(d.validation_files, "--validation_files", tokenizer, d.max_seq_length)
        eval_idx = np.arange(len(eval_pairs))
    elif d.validation_split_ratio > 0 and len(pairs) >= 2:
        split = len(pairs) - max(1, int(len(pairs) * d.validation_split_ratio))
        order = np.random.default_rng(cfg.run.seed).permutation(len(pairs))
        train_idx, eval_idx = np.sort(order[:split]), np.sort(order[split:])
    train_set = PairDataset(pairs, train_idx)
    eval_set = PairDataset(eval_pairs, eval_idx) if eval_idx is not None else None
    log.info("pairs: %d read, %d kept, %d too long for --max_seq_length %d, %d with identical answers; %d training, %s validation",
             stats.read, stats.kept, stats.too_long, d.max_seq_length, stats.identical, len(train_set),
             len(eval_set) if eval_set is not None else "no")
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    collate = partial(collate_pairs, pad_id=pad_id)
    sampler = ResumableSampler(train_set, runtime.world_size, runtime.rank, seed=cfg.run.seed)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, generator=loop.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = loop.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_set)} training pairs",
                                                   "--per_device_train_batch_size/--gradient_accumulation_steps")
    evaluate = partial(evaluate_pairs, batch_size=cfg.batch.per_device_eval_batch_size or micro, collate=collate, mask_dtype=masks)

    # ------------------------------------------------------------------------- model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(cfg.run.seed)  # the new score head's init: the same on every rank and rerun
    with runtime.model_init_context(sharded=True):
        model = AutoModelForSequenceClassification.from_pretrained(
            m.model_name_or_path, num_labels=1, dtype=TORCH_DTYPES[runtime.precision if lora.lora_r > 0 else "fp32"],
            attn_implementation=attn, trust_remote_code=m.trust_remote_code)
    model.config.pad_token_id = pad_id  # where each row's last real token is
    model.config.use_cache = False
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.lora_r > 0:
        model = apply_lora(model, lora, cfg.run.seed, task_type="SEQ_CLS")
    compiled, compile_why = compile_decoder_layers(model, m.torch_compile)
    log.info("compile: %s", compile_why)
    n_params = count_parameters(model)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    # --------------------------------------------------------------------- optimizer
    optimizer = build_optimizer(model, cfg.optim, runtime.device)
    raw_optimizer = optimizer
    model, optimizer = runtime.prepare(model, optimizer)
    global_batch = micro * accumulation * runtime.world_size
    log.info("model: %s + score head, %.2fM parameters, %.2fM trained (%s); strategy %s, precision %s, lr %.1e",
             m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, f"LoRA r={lora.lora_r}" if lora.lora_r else "full",
             runtime.strategy, runtime.precision, cfg.optim.learning_rate)
    log.info("batch: micro %d x accumulation %d x world %d = global %d pairs per step; %d steps (%d per epoch over %d pairs)",
             micro, accumulation, runtime.world_size, global_batch, total_steps, steps_per_epoch, len(train_set))
    if runtime.is_main:
        loop.write_plan(out, runtime, cfg, attn, why, global_batch,
                        extra={"max_seq_length": d.max_seq_length, "lora_r": lora.lora_r, "trainable_parameters": n_trainable,
                               "compiled_layers": compiled})

    # ------------------------------------------------------------------------ resume
    state = {"step": 0, "micro_step": 0, "epoch": 0, "samples_in_epoch": 0, "tokens_seen": 0, "pairs_seen": 0,
             "world_size": runtime.world_size, "best_eval_loss": None, "best_checkpoint": None,
             "skipped_steps": 0, "bad_steps_in_a_row": 0}
    layout = {"micro_batch": micro, "accumulation": accumulation, "pairs": len(train_set)}
    resume_from = ckpt.resolve_resume(cfg.run.resume, out, runtime)
    if resume_from is not None:
        state = ckpt.load_checkpoint(runtime, model, optimizer, resume_from, expect=layout)
        log.info("resumed from %s at step %d (epoch %d, %d pairs into it per rank)",
                 resume_from, state["step"], state["epoch"], state["samples_in_epoch"])
    state.update(layout)
    tracker = Tracker(out, cfg.run.report_to, cfg.run.run_name, cfg, runtime.is_main, state["step"])
    batches = loop.batch_stream(loader, sampler, state, micro)
    resumed_step = state["step"]
    sample_log = loop.SampleLog(out, runtime.rank, cfg.run.record_sample_ids, resumed_step)

    # -------------------------------------------------------------------------- loop
    model.train()
    report = StepLog(runtime, tracker, total_steps, state["step"], cfg.run.logging_steps, "reward",
                     {"tokens": state["tokens_seen"], "pairs": state["pairs_seen"]})
    stopped = None  # why all ranks stopped early (a signal), else None
    while state["step"] < total_steps:
        report.step_started()
        lr = set_learning_rate(raw_optimizer, state["step"], total_steps, cfg.optim) * cfg.optim.learning_rate
        window = [next(batches) for _ in range(accumulation)]
        result = loop.train_step(runtime, model, optimizer, window, cfg.optim.max_grad_norm,
                                 loss_sum=partial(pairwise_loss, mask_dtype=masks), counts=pair_counts)
        state["micro_step"] += accumulation
        state["step"] += 1
        state["pairs_seen"] += result.units
        state["tokens_seen"] += result.input_tokens
        report.step_finished(result.loss, result.applied)
        step = state["step"]
        sample_log.write(step, state["epoch"], window)
        loop.account_step(runtime, state, result, window, tracker, cfg.run.max_bad_steps, out)
        if report.due(step):
            report.log(step, lr, result.grad_norm, {"tokens": state["tokens_seen"], "pairs": state["pairs_seen"]},
                       epoch=state["epoch"] + state["samples_in_epoch"] / sampler.num_samples, skipped_steps=state["skipped_steps"])

        evaluated = None
        if eval_set is not None and cfg.run.eval_steps > 0 and step % cfg.run.eval_steps == 0 and step < total_steps:
            evaluated = evaluate(runtime, model, eval_set)
            tracker.log({"step": step, **evaluated})
            log.info("step %d eval_loss %.4f eval_accuracy %.3f", step, evaluated["eval_loss"], evaluated["eval_accuracy"])

        saved = cfg.run.save_steps > 0 and step % cfg.run.save_steps == 0
        if saved:
            loop.save_and_prune(runtime, model, optimizer, state, out, cfg.run, evaluated)
        stopped = stopping.agreed_stop(runtime) if step < total_steps else None  # the last step ends the run anyway
        if stopped:
            loop.save_on_stop(runtime, model, optimizer, state, out, cfg.run, stopped, saved)
            break
    report.close()

    # -------------------------------------------------------------------------- save
    if cfg.run.save_final and not stopped:
        loop.save_final(runtime, model, tokenizer, out, adapter_only=lora.lora_r > 0)

    # -------------------------------------------------------------------------- eval
    summary = {"step": state["step"], "loss": report.last.get("loss"), "pairs_seen": state["pairs_seen"],
               "parameters": n_params, "trainable_parameters": n_trainable, "strategy": runtime.strategy,
               "world_size": runtime.world_size, "stopped": stopped,
               "data": {"read": stats.read, "kept": stats.kept, "too_long": stats.too_long, "identical": stats.identical}}
    if eval_set is not None and not stopped:
        final_eval = evaluate(runtime, model, eval_set)
        tracker.log({"step": state["step"], **final_eval})
        log.info("final eval_loss %.4f pair accuracy %.3f over %d pairs", final_eval["eval_loss"], final_eval["eval_accuracy"],
                 final_eval["eval_pairs"])
        summary.update(final_eval)
    tracker.close()
    if runtime.is_main:
        plot_loss(out / METRICS_FILE, out / "loss.png", title=f"reward {m.model_name_or_path}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    loop.report_outcome(runtime, out, state, resumed_step, stopped)
    runtime.end()
    return summary
