"""Preference optimisation after SFT: DPO, IPO, hinge, SimPO or ORPO on chosen/rejected pairs,
full or LoRA (QLoRA), on the same runtime, checkpoints and launchers as SFT.

Sections, in the order every stage follows: config -> runtime -> data -> model -> optimizer ->
reference -> training, the last being trainers/fit.py's run loop. The losses and log-probs are
trainers/preference.py's; the step is trainers/step.py's with the per-pair loss summed and divided
by the global number of pairs, so accumulation and world size change nothing but the speed.

Data: each pair is two ChatML rows, context + chosen and context + rejected, scored on the
answer's content and its <|im_end|> (trainers/data/pairs.py encode_preferences); batches are
padded and length-grouped (a micro batch of N pairs runs 2N rows).

The reference (the DPO family): by default its log-probs are computed once, before the first step,
by the model as loaded (adapter switched off with LoRA), the pairs split over the ranks and the
table cached on disk under a key of the pairs, the model's files and how it runs; a resumed or
repeated run reads the cache. So no second model is held, and a step runs the policy alone: one
forward and backward, where a resident reference adds a forward. With LoRA, --reference
adapter_disabled takes the reference from the policy with its adapter off at every step instead
(nothing cached; one more forward per step), for pairs that change between runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainers import setup
from trainers.attention import mask_dtype
from trainers.config import Run
from trainers.data.chat import ensure_chat_template
from trainers.data.collate import ResumableSampler
from trainers.data.packing import cache_root
from trainers.data.pairs import PreferenceDataset, collate_preferences, encode_preferences, pairs_digest, preference_summary
from trainers.data.sources import fingerprint
from trainers.errors import UsageError
from trainers.fit import Training, fit, save_final_model
from trainers.lora import apply_lora, lora_description, settle_lora_flags
from trainers.models import base_loading, build_model, count_parameters, resolve_model_config, tokenizer_for
from trainers.preference import RewardTotals, batch_logps, compute_reference, objective_from, pair_losses, reference_cache_key
from trainers.quantization import base_bits
from trainers.step import pair_counts

log = logging.getLogger("trainrig.dpo")

LORA_LEARNING_RATE = 5e-6  # with LoRA unless --learning_rate is given: 10x full training's 5e-7, as for SFT
LENGTH_GROUP = 16  # sort pair lengths within chunks of 16 global batches, as SFT does without packing


def batch_reference(batch: dict, device, objective, live_reference=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ref chosen, ref rejected) of a batch: precomputed (with the batch), from
    `live_reference(batch)` (adapter disabled), or None where the loss needs none (simpo, orpo)."""
    if not objective.needs_reference:
        return None
    ref = live_reference(batch) if live_reference is not None else batch["reference"].to(device, torch.float32)
    return ref[:batch["pairs"]], ref[batch["pairs"]:]


def preference_loss(model, batch: dict, device, denominator: torch.Tensor, objective, totals: RewardTotals,
                    mask_dtype, chunked: bool, live_reference=None) -> torch.Tensor:
    """This micro batch's summed per-pair loss over the global pair count; the implicit rewards go
    to `totals`."""
    policy = batch_logps(model, batch, device, mask_dtype, chunked)
    losses, chosen, rejected = pair_losses(objective, policy, batch_reference(batch, device, objective, live_reference))
    totals.add(chosen, rejected)
    return losses.sum() / denominator


@torch.no_grad()
def adapter_off_logps(runtime, model, batch: dict, mask_dtype, chunked: bool) -> torch.Tensor:
    """(2B,) log-probs of the batch's rows under the policy with its LoRA adapter switched off."""
    with runtime.unwrap(model).disable_adapter():
        logps = batch_logps(model, batch, runtime.device, mask_dtype, chunked)
    return torch.cat([logps.chosen, logps.rejected])


@torch.no_grad()
def evaluate_preferences(runtime, model, dataset, batch_size: int, collate, objective, mask_dtype, chunked: bool,
                         live_reference=None) -> dict:
    """Mean per-pair loss, the implicit rewards, and the share of pairs whose chosen answer the
    policy finds more likely than the rejected one (logps/accuracy, no reference involved), over
    `dataset`, split across ranks; every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively in each)."""
    model.eval()
    parts = np.array_split(np.arange(len(dataset)), runtime.world_size)
    mine = parts[runtime.rank]
    totals, loss_sum, prefers_chosen = RewardTotals(runtime.device), 0.0, 0.0
    for b in range(math.ceil(max(len(p) for p in parts) / batch_size)):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        batch = collate([dataset[int(i)] for i in (idx if len(idx) else [0])])
        policy = batch_logps(model, batch, runtime.device, mask_dtype, chunked)
        losses, chosen, rejected = pair_losses(objective, policy, batch_reference(batch, runtime.device, objective, live_reference))
        if len(idx):  # an idle rank still joins the collective forward
            loss_sum += float(losses.sum())
            totals.add(chosen, rejected)
            prefers_chosen += float((policy.chosen > policy.rejected).sum())
    model.train()
    loss_sum, prefers_chosen = runtime.all_reduce_sum([loss_sum, prefers_chosen])
    figures = totals.take(runtime, prefix="eval_")
    return {"eval_loss": loss_sum / len(dataset), **figures, "eval_logps/accuracy": round(prefers_chosen / len(dataset), 6),
            "eval_pairs": len(dataset)}


def describe_preference_eval(figures: dict) -> str:
    return (f"eval_loss {figures['eval_loss']:.4f} reward accuracy {figures['eval_rewards/accuracy']:.3f} "
            f"margin {figures['eval_rewards/margin']:.4f} over {figures['eval_pairs']} pairs")


def model_fingerprint(model_path: str) -> list[dict]:
    """The starting model's files (path, size, mtime) as the cache key sees them: the local
    directory, or for a hub id its snapshot in the local cache (whose path names the commit);
    the id alone only where no snapshot can be found."""
    local = Path(model_path)
    if not local.exists():
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(model_path, local_files_only=True))
        except Exception:  # noqa: BLE001  (no snapshot, or no huggingface_hub: the id is all there is)
            return [{"hub_id": model_path}]
    return fingerprint([local])


def reference_table(runtime, model, pairs, what: str, settings: dict, model_path: str, cache_dir: str, batch_size: int,
                    collate, mask_dtype, chunked: bool, lora: bool) -> tuple[np.ndarray, dict]:
    """The reference log-probs of every pair of `pairs` (rows as in `pairs`), from the cache or
    computed now and cached (rank 0 writes; every rank gets rank 0's table); (table, facts)."""
    key = reference_cache_key(pairs_digest(pairs), model_fingerprint(model_path), settings)
    path = cache_root(cache_dir, "reference") / f"{key}.npy"
    start = time.perf_counter()
    table = None
    if runtime.is_main and path.is_file():
        try:
            table = np.load(path)
        except (OSError, ValueError) as err:  # unreadable: computed again below, on every rank
            log.warning("reference cache %s unreadable (%s); computing the table again", path, err)
    table = runtime.broadcast_object(table)
    cached = table is not None
    if not cached:
        switched_off = runtime.unwrap(model).disable_adapter() if lora else contextlib.nullcontext()
        with switched_off:
            table = compute_reference(runtime, model, PreferenceDataset(pairs, np.arange(len(pairs))), batch_size, collate, mask_dtype, chunked)
        if runtime.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial_path = path.with_suffix(f".{os.getpid()}.partial.npy")
            np.save(partial_path, table)
            os.replace(partial_path, path)  # complete or absent: a killed run leaves no half table
        table = runtime.broadcast_object(table if runtime.is_main else None)  # one table on every rank, bit for bit
    seconds = time.perf_counter() - start
    log.info("reference log-probs of %d %s pairs: %s in %.1f s (%s)", len(pairs), what,
             "read from the cache" if cached else "computed", seconds, path)
    return table, {"cache": str(path), "cached": bool(cached), "seconds": round(seconds, 3)}


def train(run: Run) -> dict:
    # ------------------------------------------------------------------------ config
    cfg = run.cfg
    setup.resolve_batch(run)
    m, d, lora, p = cfg.model, cfg.data, cfg.lora, cfg.preference
    if not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: the model to align, usually an SFT run's final/ (or final/merged)")
    objective = objective_from(p)
    settle_lora_flags(run, LORA_LEARNING_RATE)
    live = objective.needs_reference and p.reference == "adapter_disabled"
    if live and lora.lora_r == 0:
        raise UsageError("--reference adapter_disabled takes the reference from the policy with its LoRA adapter off: it needs --lora_r > 0 "
                         "(full training uses --reference precomputed)")
    model_config = resolve_model_config(m, d.max_seq_length, "--max_seq_length")  # bad paths and sizes fail before data work

    # ----------------------------------------------------------------------- runtime
    runtime = setup.start(run, model_config)
    attn, why = setup.attention(runtime, m)
    masks = mask_dtype(attn, runtime.precision)

    # -------------------------------------------------------------------------- data
    tokenizer, tokenizer_flag = tokenizer_for(m)
    ensure_chat_template(tokenizer)

    def pairs_for(patterns, flag):
        pairs, stats = encode_preferences(patterns, flag, tokenizer, d.max_seq_length, d.default_system_prompt, tokenizer_flag)
        for line in preference_summary(stats):
            log.info("%s%s", f"{flag}: " if flag != "--train_files" else "", line)
        return pairs, stats

    pairs, stats = pairs_for(d.train_files, "--train_files")
    train_idx, eval_idx = setup.validation_split(len(pairs), 0 if d.validation_files else d.validation_split_ratio, cfg.run.seed)
    eval_pairs = pairs
    if d.validation_files:
        eval_pairs, _ = pairs_for(d.validation_files, "--validation_files")
        eval_idx = np.arange(len(eval_pairs))
    train_set = PreferenceDataset(pairs, train_idx)
    eval_set = PreferenceDataset(eval_pairs, eval_idx) if eval_idx is not None else None
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    collate = partial(collate_preferences, pad_id=pad_id)
    global_batch = micro * accumulation * runtime.world_size
    sampler = ResumableSampler(train_set, runtime.world_size, runtime.rank, seed=cfg.run.seed, global_batch=global_batch,
                               lengths=train_set.lengths, group_size=LENGTH_GROUP * global_batch)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda",
                        generator=setup.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = setup.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_set)} training pairs",
                                                    "--per_device_train_batch_size/--gradient_accumulation_steps")
    log.info("pairs: %d training, %s validation; batches of %d pairs (%d rows), length-grouped", len(train_set),
             len(eval_set) if eval_set is not None else "no", micro, 2 * micro)

    # ------------------------------------------------------------------------- model
    with runtime.model_init_context(sharded=True):
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed, **base_loading(lora, runtime.precision, runtime.device))
    if lora.lora_r > 0:
        model = apply_lora(model, lora, cfg.run.seed)
    facts = setup.finish_model(model, m)
    chunked = facts["chunked_loss"]
    n_params, n_trainable = count_parameters(model), setup.trainable_parameters(model)

    # --------------------------------------------------------------------- optimizer
    model, optimizer, raw_optimizer = setup.prepare(runtime, model, cfg.optim)
    source = "none (reference-free)" if not objective.needs_reference else p.reference
    log.info("model: %s, %.2fM parameters, %.2fM trained (%s); loss %s, beta %g%s; reference: %s; strategy %s, precision %s, lr %.1e",
             m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, lora_description(lora), objective.loss_type, objective.beta,
             f", label smoothing {objective.label_smoothing:g}" if objective.label_smoothing else "", source,
             runtime.strategy, runtime.precision, cfg.optim.learning_rate)
    log.info("batch: micro %d x accumulation %d x world %d = global %d pairs per step; %d steps (%d per epoch over %d pairs)",
             micro, accumulation, runtime.world_size, global_batch, total_steps, steps_per_epoch, len(train_set))

    # --------------------------------------------------------------------- reference
    eval_batch = cfg.batch.per_device_eval_batch_size or micro
    live_reference = partial(adapter_off_logps, runtime, model, mask_dtype=masks, chunked=chunked) if live else None
    reference = {"source": source}
    if objective.needs_reference and not live:
        # before fit() loads a checkpoint: the weights are still the starting model's
        # everything that changes the reference's numerics: the weights' dtype (fp32 masters under autocast, a 16-bit
        # LoRA base, DeepSpeed's 16-bit engine weights), the engine, quantization, attention kernel and head path
        weights = runtime.unwrap(model).get_input_embeddings().weight.dtype
        settings = {"precision": runtime.precision, "weights": str(weights), "strategy": runtime.strategy, "lora": lora.lora_r > 0,
                    "base_bits": base_bits(lora), "quant_type": lora.bnb_4bit_quant_type, "double_quant": lora.bnb_4bit_use_double_quant,
                    "attention": attn, "chunked": chunked, "compiled": facts["compiled_layers"]}
        table_args = (settings, m.model_name_or_path, d.data_cache_dir, eval_batch, collate, masks, chunked, lora.lora_r > 0)
        train_set.reference, reference["train"] = reference_table(runtime, model, pairs, "training", *table_args)
        if eval_set is not None:
            if eval_pairs is pairs:
                eval_set.reference = train_set.reference
            else:
                eval_set.reference, reference["validation"] = reference_table(runtime, model, eval_pairs, "validation", *table_args)
            held_out = eval_set.reference[eval_set.indices]
            # what eval_logps/accuracy was before the first step: the starting model's own preference
            reference["eval_logps/accuracy"] = round(float((held_out[:, 0] > held_out[:, 1]).mean()), 6)
            log.info("the starting model finds the chosen answer more likely in %.1f%% of the %d validation pairs",
                     100 * reference["eval_logps/accuracy"], len(eval_set))
    if runtime.is_main:
        setup.write_plan(run, runtime, attn, why,
                         extra={"max_seq_length": d.max_seq_length, "loss_type": objective.loss_type, "beta": objective.beta,
                                "reference": source, "trainable_parameters": n_trainable, **facts})

    # ---------------------------------------------------------------------- training
    out = Path(cfg.run.output_dir)
    totals = RewardTotals(runtime.device)
    evaluate = partial(evaluate_preferences, runtime, model, eval_set, eval_batch, collate, objective, masks, chunked, live_reference)
    return fit(run, runtime, Training(
        name="dpo", model=model, optimizer=optimizer, raw_optimizer=raw_optimizer, loader=loader, sampler=sampler,
        total_steps=total_steps, samples="pairs", unit="trained_pairs", counts=pair_counts,
        loss_sum=partial(preference_loss, objective=objective, totals=totals, mask_dtype=masks, chunked=chunked, live_reference=live_reference),
        layout={"global_batch": global_batch, "pairs": len(train_set)},
        save_final=lambda: save_final_model(runtime, model, tokenizer, out, lora, m),
        summary=lambda state: {"pairs_seen": state.trained_pairs, "parameters": n_params, "trainable_parameters": n_trainable,
                               "loss_type": objective.loss_type, "beta": objective.beta, "reference": reference,
                               "data": {"read": stats.read, "kept": stats.kept, "truncated": stats.truncated,
                                        "skipped": dict(stats.skipped)}},
        log_counts=lambda state: {"tokens": state.input_tokens, "pairs": state.trained_pairs},
        step_figures=lambda: totals.take(runtime),
        evaluate=evaluate if eval_set is not None else None, describe_eval=describe_preference_eval))
