"""Pretraining from scratch (--model_preset) and continued pretraining (--model_name_or_path) on
packed blocks; continued pretraining in full or with LoRA, on a 16-bit or a quantized base (QLoRA),
as in SFT (a new domain's text into a 14B model on one 24-32 GB card).

Sections, in the order every stage follows: config -> runtime -> data -> model -> optimizer ->
training, the last being trainers/fit.py's run loop (resume, steps, checkpoints, final save, eval);
the step itself (loss normalised by the global trained-token count) is trainers/step.py's.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from trainers import setup
from trainers.config import Run
from trainers.data.collate import ResumableSampler, collate_blocks
from trainers.data.packing import prepare_blocks
from trainers.errors import UsageError
from trainers.fit import Training, fit, save_final_model
from trainers.lora import apply_lora, lora_description, settle_lora_flags
from trainers.models import base_loading, build_model, count_parameters, resolve_model_config, tokenizer_for
from trainers.step import describe_lm_eval, evaluate_lm

log = logging.getLogger("trainrig.pretrain")


def train(run: Run) -> dict:
    # ------------------------------------------------------------------------ config
    cfg = run.cfg
    setup.resolve_batch(run)
    m, d, lora = cfg.model, cfg.data, cfg.lora
    if bool(m.model_preset) == bool(m.model_name_or_path):
        raise UsageError("pass exactly one of --model_preset (from scratch) or --model_name_or_path (continued pretraining)")
    settle_lora_flags(run, from_scratch=bool(m.model_preset))
    model_config = resolve_model_config(m, d.block_size)  # before any data work: bad paths and sizes fail fast

    # ----------------------------------------------------------------------- runtime
    runtime = setup.start(run, model_config)

    # -------------------------------------------------------------------------- data
    tokenizer, _ = tokenizer_for(m)

    def blocks_for(patterns, flag):
        return runtime.main_first(lambda: prepare_blocks(patterns, flag, tokenizer, d.block_size, d.text_field,
                                                         d.data_cache_dir, d.tokenize_batch_size, build=runtime.is_main))

    train_blocks = blocks_for(d.train_files, "--train_files")
    if d.validation_files:
        eval_blocks = blocks_for(d.validation_files, "--validation_files")
    elif d.validation_split_ratio > 0 and len(train_blocks) >= 2:  # the last blocks: a document's blocks are contiguous
        split = len(train_blocks) - max(1, int(len(train_blocks) * d.validation_split_ratio))
        train_blocks, eval_blocks = Subset(train_blocks, range(split)), Subset(train_blocks, range(split, len(train_blocks)))
    else:
        eval_blocks = None
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    global_batch = micro * accumulation * runtime.world_size
    sampler = ResumableSampler(train_blocks, runtime.world_size, runtime.rank, seed=cfg.run.seed, global_batch=global_batch)
    loader = DataLoader(train_blocks, batch_size=micro, sampler=sampler, collate_fn=collate_blocks, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda",
                        generator=setup.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = setup.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_blocks)} training blocks",
                                                    "--per_device_train_batch_size/--gradient_accumulation_steps/--block_size")

    # ------------------------------------------------------------------------- model
    attn, why = setup.attention(runtime, m)
    with runtime.model_init_context(sharded=bool(m.model_name_or_path)):
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed, **base_loading(lora, runtime.precision, runtime.device))
    if lora.lora_r > 0:
        model = apply_lora(model, lora, cfg.run.seed)
    facts = setup.finish_model(model, m)
    n_params, n_trainable = count_parameters(model), setup.trainable_parameters(model)

    # --------------------------------------------------------------------- optimizer
    model, optimizer, raw_optimizer = setup.prepare(runtime, model, cfg.optim)
    log.info("model: %s, %.2fM parameters, %.2fM trained (%s); strategy %s, precision %s, device %s",
             m.model_preset or m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, lora_description(lora),
             runtime.strategy, runtime.precision, runtime.device)
    log.info("batch: micro %d x accumulation %d x world %d = global %d sequences = %s tokens per step; %d steps (%d per epoch over %d blocks)",
             micro, accumulation, runtime.world_size, global_batch, f"{global_batch * d.block_size:,}", total_steps,
             steps_per_epoch, len(train_blocks))
    if runtime.is_main:
        setup.write_plan(run, runtime, attn, why,
                         extra={"trainable_parameters": n_trainable, **facts})

    # ---------------------------------------------------------------------- training
    out = Path(cfg.run.output_dir)
    evaluate = partial(evaluate_lm, runtime, model, eval_blocks, cfg.batch.per_device_eval_batch_size or micro, collate_blocks)
    return fit(run, runtime, Training(
        name="pretrain", model=model, optimizer=optimizer, raw_optimizer=raw_optimizer, loader=loader, sampler=sampler,
        total_steps=total_steps, layout={"global_batch": global_batch},
        save_final=lambda: save_final_model(runtime, model, tokenizer, out, lora, m),
        summary=lambda state: {"tokens_seen": state.trained_tokens, "parameters": n_params, "trainable_parameters": n_trainable},
        log_counts=lambda state: {"tokens": state.trained_tokens},  # the predicted tokens (block - 1 each): bench's MFU convention
        evaluate=evaluate if eval_blocks is not None else None, describe_eval=describe_lm_eval))
