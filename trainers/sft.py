"""Supervised fine-tuning on chat data: assistant-only loss, packed rows, full or LoRA.

Sections, in the order every stage follows: config -> runtime -> data -> model -> optimizer ->
training, the last being trainers/fit.py's run loop (resume, steps, checkpoints, final save, eval);
the step itself (loss normalised by the global trained-token count, so packing, accumulation and
world size give the same gradients) is trainers/step.py's.

Data: trainers/data/chat.py renders ChatML and computes the labels; with --packing the samples
are packed best-fit into --max_seq_length rows; without it, batches are length-grouped and padded
to their longest sample. The micro batch counts rows. How a micro batch reaches the model keeps
every sample's attention to itself under each kernel (trainers/attention.py): FlashAttention gets
all its samples flattened into one row with their boundaries, SDPA and eager one shared mask.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from trainers import setup
from trainers.attention import mask_dtype, row_layout
from trainers.config import Run
from trainers.data.chat import ChatRenderer, chat_settings, ensure_chat_template, prepare_chat
from trainers.data.collate import ResumableSampler, batch_fill, collate_rows
from trainers.data.packing import RowDataset, pack_rows
from trainers.errors import UsageError
from trainers.fit import Training, fit, save_final_model
from trainers.lora import apply_lora, lora_description, settle_lora_flags
from trainers.models import base_loading, build_model, count_parameters, resolve_model_config, tokenizer_for
from trainers.step import describe_lm_eval, evaluate_lm, lm_loss

log = logging.getLogger("trainrig.sft")

LORA_LEARNING_RATE = 2e-4  # the SFT default with LoRA; adapters start at zero and need ~10x full FT's 2e-5
LENGTH_GROUP = 16  # without packing: sort lengths within chunks of 16 global batches (HF: 50 micro batches of every rank)


def make_rows(samples, indices: np.ndarray, max_seq_length: int, packed: bool, seed: int) -> RowDataset:
    """Rows over `indices` of `samples`: packed best-fit, or one sample per row."""
    if not packed:
        return RowDataset(samples, [[int(i)] for i in indices])
    rows = pack_rows(samples.lengths[indices], max_seq_length, seed)
    return RowDataset(samples, [[int(indices[j]) for j in row] for row in rows])


def row_sampler(rows: RowDataset, sample_lengths: np.ndarray, packed: bool, global_batch: int, world_size: int, rank: int,
                seed: int) -> ResumableSampler:
    """This rank's order over `rows`: shuffled; without packing, length-grouped within chunks of
    LENGTH_GROUP global batches so that a batch pads little (`sample_lengths`: one per row). Both
    depend on the global batch only, so the order is the same on any world size."""
    return ResumableSampler(rows, world_size, rank, seed=seed, global_batch=global_batch,
                            lengths=None if packed else sample_lengths, group_size=LENGTH_GROUP * global_batch)


def train(run: Run) -> dict:
    # ------------------------------------------------------------------------ config
    cfg = run.cfg
    setup.resolve_batch(run)
    m, d, lora = cfg.model, cfg.data, cfg.lora
    if not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: the model to fine-tune (a directory written by save_pretrained, e.g. <pretrain output>/final)")
    settle_lora_flags(run, LORA_LEARNING_RATE)
    model_config = resolve_model_config(m, d.max_seq_length, "--max_seq_length")  # bad paths and sizes fail before data work

    # ----------------------------------------------------------------------- runtime
    runtime = setup.start(run, model_config)
    attn, why = setup.attention(runtime, m)
    layout, masks = row_layout(attn, d.packing), mask_dtype(attn, runtime.precision)  # the batches this kernel needs

    # -------------------------------------------------------------------------- data
    tokenizer, tokenizer_flag = tokenizer_for(m)
    ensure_chat_template(tokenizer)
    settings = chat_settings(d)

    def samples_for(patterns, flag):
        return runtime.main_first(lambda: prepare_chat(patterns, flag, tokenizer, settings, d.chat_format, d.strict,
                                                       d.data_cache_dir, build=runtime.is_main, tokenizer_flag=tokenizer_flag))

    samples = samples_for(d.train_files, "--train_files")
    train_idx, eval_idx = setup.validation_split(len(samples), 0 if d.validation_files else d.validation_split_ratio, cfg.run.seed)
    eval_samples = samples
    if d.validation_files:
        eval_samples = samples_for(d.validation_files, "--validation_files")
        eval_idx = np.arange(len(eval_samples))
    train_rows = make_rows(samples, train_idx, d.max_seq_length, d.packing, cfg.run.seed)
    eval_rows = make_rows(eval_samples, eval_idx, d.max_seq_length, d.packing, cfg.run.seed) if eval_idx is not None else None
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    global_batch = micro * accumulation * runtime.world_size
    sampler = row_sampler(train_rows, samples.lengths[train_idx], d.packing, global_batch, runtime.world_size, runtime.rank, cfg.run.seed)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    collate = partial(collate_rows, pad_id=pad_id, layout=layout)
    loader = DataLoader(train_rows, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda",
                        generator=setup.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = setup.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_rows)} training rows",
                                                    "--per_device_train_batch_size/--gradient_accumulation_steps")
    row_lengths = train_rows.row_lengths()
    # this rank's first epoch, as the loader will batch it; a flat batch (FlashAttention) has no padding
    fill = 1.0 if layout == "flat" else batch_fill(row_lengths, list(sampler), micro)
    log.info("rows: %d training samples -> %d rows (%s, %.1f%% of %d tokens used); batches %.1f%% non-pad (%s layout); %s validation rows",
             len(train_idx), len(train_rows), "packed" if d.packing else "one sample each, length-grouped",
             100 * row_lengths.sum() / (len(train_rows) * d.max_seq_length), d.max_seq_length, 100 * fill, layout,
             len(eval_rows) if eval_rows is not None else "no")

    # ------------------------------------------------------------------------- model
    with runtime.model_init_context(sharded=True):
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed, **base_loading(lora, runtime.precision, runtime.device))
    if lora.lora_r > 0:
        turn_tokens = ChatRenderer(tokenizer, settings, tokenizer_flag).shape.structure_tokens  # <|im_start|>, <|im_end|> in ChatML
        chat_tokens = tokenizer.convert_tokens_to_ids(list(turn_tokens)) if lora.lora_train_chat_tokens else None
        if chat_tokens and runtime.zero_stage == 3 and runtime.device.type != "cuda":
            # peft 0.21 gathers the token rows under ZeRO-3 into a CUDA tensor; without a GPU it cannot
            log.warning("--lora_train_chat_tokens needs a GPU under ZeRO-3 (PEFT gathers the rows on CUDA); "
                        "training the LoRA adapters without the chat-token embedding rows")
            chat_tokens = None
        model = apply_lora(model, lora, cfg.run.seed, chat_tokens)
    facts = setup.finish_model(model, m)
    n_params, n_trainable = count_parameters(model), setup.trainable_parameters(model)

    # --------------------------------------------------------------------- optimizer
    model, optimizer, raw_optimizer = setup.prepare(runtime, model, cfg.optim)
    log.info("model: %s, %.2fM parameters, %.2fM trained (%s); strategy %s, precision %s, device %s, lr %.1e",
             m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, lora_description(lora),
             runtime.strategy, runtime.precision, runtime.device, cfg.optim.learning_rate)
    log.info("batch: micro %d x accumulation %d x world %d = global %d rows of up to %d tokens per step; %d steps (%d per epoch over %d rows)",
             micro, accumulation, runtime.world_size, global_batch, d.max_seq_length, total_steps, steps_per_epoch, len(train_rows))
    if runtime.is_main:
        setup.write_plan(run, runtime, attn, why,
                         extra={"packing": d.packing, "batch_layout": layout, "max_seq_length": d.max_seq_length, "batch_fill": round(fill, 4),
                                "trainable_parameters": n_trainable, **facts})

    # ---------------------------------------------------------------------- training
    out = Path(cfg.run.output_dir)

    evaluate = partial(evaluate_lm, runtime, model, eval_rows, cfg.batch.per_device_eval_batch_size or micro, collate, mask_dtype=masks)
    return fit(run, runtime, Training(
        name="sft", model=model, optimizer=optimizer, raw_optimizer=raw_optimizer, loader=loader, sampler=sampler,
        total_steps=total_steps, samples="rows", loss_sum=partial(lm_loss, mask_dtype=masks),
        layout={"global_batch": global_batch, "packing": d.packing, "max_seq_length": d.max_seq_length,
                "rows": len(train_rows)},
        save_final=lambda: save_final_model(runtime, model, tokenizer, out, lora, m),
        summary=lambda state: {"trained_tokens": state.trained_tokens, "tokens": state.input_tokens, "parameters": n_params,
                               "trainable_parameters": n_trainable, "rows": len(train_rows), "batch_fill": round(fill, 4),
                               "data": {k: samples.meta[k] for k in ("read", "kept", "truncated", "skipped")}},
        log_counts=lambda state: {"tokens": state.input_tokens, "trained_tokens": state.trained_tokens},
        evaluate=evaluate if eval_rows is not None else None, describe_eval=describe_lm_eval))
