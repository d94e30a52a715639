"""Reward model: a scalar head on a causal LM, trained on preference pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected); validation reports pair accuracy (the share of pairs whose
chosen answer scores higher). Full or LoRA, on the same runtime, checkpoints and launchers as SFT.

Sections, in the order every stage follows: config -> runtime -> data -> model -> optimizer ->
training, the last being trainers/fit.py's run loop. The step is trainers/step.py's with the
pairwise loss, normalised by the global number of pairs, so accumulation and world size change
nothing but the speed.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainers import setup
from trainers.attention import mask_dtype
from trainers.config import Run
from trainers.data.chat import ensure_chat_template
from trainers.data.collate import ResumableSampler, model_inputs
from trainers.data.pairs import PairDataset, collate_pairs, encode_pairs
from trainers.errors import UsageError
from trainers.fit import Training, fit, save_final
from trainers.lora import apply_lora, lora_description, settle_lora_flags
from trainers.models import base_loading, count_parameters, enable_checkpointing, load_pretrained, resolve_model_config, tokenizer_for
from trainers.step import pair_counts

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


def train(run: Run) -> dict:
    # ------------------------------------------------------------------------ config
    cfg = run.cfg
    setup.resolve_batch(run)
    m, d, lora = cfg.model, cfg.data, cfg.lora
    if not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: the causal LM to put a reward head on (e.g. an SFT run's final/ or final/merged)")
    if lora.merge_lora:
        raise UsageError("--merge_lora is not available for the reward model; its final/ holds the adapter and the score head "
                         "(PeftModel.from_pretrained on AutoModelForSequenceClassification loads it)")
    settle_lora_flags(run, LORA_LEARNING_RATE)
    model_config = resolve_model_config(m, d.max_seq_length, "--max_seq_length")  # bad paths and sizes fail before data work

    # ----------------------------------------------------------------------- runtime
    runtime = setup.start(run, model_config)
    attn, why = setup.attention(runtime, m)
    masks = mask_dtype(attn, runtime.precision)

    # -------------------------------------------------------------------------- data
    tokenizer, _ = tokenizer_for(m)
    ensure_chat_template(tokenizer)
    pairs, stats = runtime.main_first(lambda: encode_pairs(d.train_files, "--train_files", tokenizer, d.max_seq_length))
    train_idx, eval_idx = setup.validation_split(len(pairs), 0 if d.validation_files else d.validation_split_ratio, cfg.run.seed)
    eval_pairs = pairs
    if d.validation_files:
        eval_pairs, _ = encode_pairs(d.validation_files, "--validation_files", tokenizer, d.max_seq_length)
        eval_idx = np.arange(len(eval_pairs))
    train_set = PairDataset(pairs, train_idx)
    eval_set = PairDataset(eval_pairs, eval_idx) if eval_idx is not None else None
    log.info("pairs: %d read, %d kept, %d too long for --max_seq_length %d, %d with identical answers; %d training, %s validation",
             stats.read, stats.kept, stats.too_long, d.max_seq_length, stats.identical, len(train_set),
             len(eval_set) if eval_set is not None else "no")
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    collate = partial(collate_pairs, pad_id=pad_id)
    global_batch = micro * accumulation * runtime.world_size
    sampler = ResumableSampler(train_set, runtime.world_size, runtime.rank, seed=cfg.run.seed, global_batch=global_batch)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, generator=setup.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = setup.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_set)} training pairs",
                                                    "--per_device_train_batch_size/--gradient_accumulation_steps")

    # ------------------------------------------------------------------------- model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(cfg.run.seed)  # the new score head's init: the same on every rank and rerun
    with runtime.model_init_context(sharded=True):
        model = load_pretrained(AutoModelForSequenceClassification, m.model_name_or_path, attn_implementation=attn,
                                trust_remote_code=m.trust_remote_code, num_labels=1, **base_loading(lora, runtime.precision, runtime.device))
    model.config.pad_token_id = pad_id  # where each row's last real token is
    enable_checkpointing(model, m.gradient_checkpointing)
    if lora.lora_r > 0:
        model = apply_lora(model, lora, cfg.run.seed, task_type="SEQ_CLS")
    facts = setup.finish_model(model, m, vocab_head=False)
    n_params, n_trainable = count_parameters(model), setup.trainable_parameters(model)

    # --------------------------------------------------------------------- optimizer
    model, optimizer, raw_optimizer = setup.prepare(runtime, model, cfg.optim)
    log.info("model: %s + score head, %.2fM parameters, %.2fM trained (%s); strategy %s, precision %s, lr %.1e",
             m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, lora_description(lora),
             runtime.strategy, runtime.precision, cfg.optim.learning_rate)
    log.info("batch: micro %d x accumulation %d x world %d = global %d pairs per step; %d steps (%d per epoch over %d pairs)",
             micro, accumulation, runtime.world_size, global_batch, total_steps, steps_per_epoch, len(train_set))
    if runtime.is_main:
        setup.write_plan(run, runtime, attn, why,
                         extra={"max_seq_length": d.max_seq_length, "trainable_parameters": n_trainable, **facts})

    # ---------------------------------------------------------------------- training
    out = Path(cfg.run.output_dir)
    evaluate = partial(evaluate_pairs, runtime, model, eval_set, cfg.batch.per_device_eval_batch_size or micro, collate, mask_dtype=masks)
    return fit(run, runtime, Training(
        name="reward", model=model, optimizer=optimizer, raw_optimizer=raw_optimizer, loader=loader, sampler=sampler,
        total_steps=total_steps, samples="pairs", loss_sum=partial(pairwise_loss, mask_dtype=masks), counts=pair_counts,
        unit="trained_pairs", layout={"global_batch": global_batch, "pairs": len(train_set)},
        save_final=lambda: save_final(runtime, model, tokenizer, out, adapter_only=lora.lora_r > 0),
        summary=lambda state: {"pairs_seen": state.trained_pairs, "parameters": n_params, "trainable_parameters": n_trainable,
                               "data": {"read": stats.read, "kept": stats.kept, "too_long": stats.too_long, "identical": stats.identical}},
        log_counts=lambda state: {"tokens": state.input_tokens, "pairs": state.trained_pairs},
        evaluate=evaluate if eval_set is not None else None, describe_eval=describe_pair_eval))


def describe_pair_eval(figures: dict) -> str:
    return f"eval_loss {figures['eval_loss']:.4f} pair accuracy {figures['eval_accuracy']:.3f} over {figures['eval_pairs']} pairs"
