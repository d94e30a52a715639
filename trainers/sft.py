"""Supervised fine-tuning on chat data: assistant-only loss, packed rows, full or LoRA.

Sections, in the order every trainer follows:
config -> runtime -> data -> model -> optimizer -> resume -> loop -> save -> eval.
The step itself (loss normalised by the global trained-token count, so packing, accumulation
and world size give the same gradients) is trainers/loop.py's.

Data: trainers/data/chat.py renders ChatML and computes the labels; with --packing the samples
are packed best-fit into --max_seq_length rows; without it, batches are length-grouped and padded
to their longest sample. The micro batch counts rows. How a micro batch reaches the model keeps
every sample's attention to itself under each kernel (trainers/attention.py): FlashAttention gets
all its samples flattened into one row with their boundaries, SDPA and eager one shared mask.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from trainers import checkpoint as ckpt
from trainers import loop, stopping
from trainers.config import SFTConfig, save_resolved_config
from trainers.attention import mask_dtype, resolve_attn_implementation, row_layout
from trainers.data.chat import IM_END, IM_START, ChatSettings, ensure_chat_template, prepare_chat
from trainers.data.collate import ResumableSampler, batch_fill, collate_rows
from trainers.data.packing import RowDataset, pack_rows
from trainers.errors import UsageError, check_output_dir
from trainers.chunked_loss import use_chunked_loss
from trainers.lora import apply_lora, merge_adapter
from trainers.models import build_model, check_torch_compile, compile_decoder_layers, count_parameters, resolve_model_config, tokenizer_for
from trainers.optim import build_optimizer, set_learning_rate
from trainers.runtime import Runtime, launcher_world
from trainers.tracking import METRICS_FILE, StepLog, Tracker, plot_loss

log = logging.getLogger("trainrig.sft")

LORA_LEARNING_RATE = 2e-4  # the SFT default with LoRA; adapters start at zero and need ~10x full FT's 2e-5
LENGTH_GROUP = 64  # without packing: sort lengths within chunks of 64 global micro batches (HF uses 50)


def make_rows(samples, indices: np.ndarray, max_seq_length: int, packed: bool, seed: int) -> RowDataset:
    """Rows over `indices` of `samples`: packed best-fit, or one sample per row."""
    if not packed:
        return RowDataset(samples, [[int(i)] for i in indices])
    rows = pack_rows(samples.lengths[indices], max_seq_length, seed)
    return RowDataset(samples, [[int(indices[j]) for j in row] for row in rows])


def train(cfg: SFTConfig) -> dict:
    # ------------------------------------------------------------------------ config
    out = Path(cfg.run.output_dir)
    world_size, _, _ = launcher_world()
    cfg.batch.gradient_accumulation_steps = loop.resolve_accumulation(cfg.batch, world_size)
    m, d, lora = cfg.model, cfg.data, cfg.lora
    if not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: the model to fine-tune (a directory written by save_pretrained, e.g. <pretrain output>/final)")
    if lora.merge_lora and lora.lora_r == 0:
        raise UsageError("--merge_lora needs LoRA (--lora_r > 0); full fine-tuning already writes a plain model to final/")
    if lora.lora_r > 0 and "learning_rate" not in getattr(cfg, "_sources", {}):
        cfg.optim.learning_rate = LORA_LEARNING_RATE
    model_config = resolve_model_config(m, d.max_seq_length, "--max_seq_length")  # bad paths and sizes fail before data work
    loop.check_run_settings(cfg, out)
    check_output_dir(out)
    loop.seed_everything(cfg.run.seed)

    # ----------------------------------------------------------------------- runtime
    runtime = Runtime(cfg.dist, cfg.batch, cfg.optim, getattr(cfg, "_sources", {}),
                      uses_muon=cfg.optim.optimizer == "muon", hidden_size=model_config.hidden_size)
    loop.setup_logging(runtime.is_main)
    loop.check_plan_agrees(runtime, cfg)
    check_torch_compile(m.torch_compile, runtime.device, runtime.zero_stage)
    if runtime.is_main:
        save_resolved_config(cfg, out / "resolved_config.yaml")
    attn, why = resolve_attn_implementation(m.attn_implementation, runtime.device, runtime.precision)
    log.info("attention: %s (%s)", attn, why)
    layout, masks = row_layout(attn, d.packing), mask_dtype(attn, runtime.precision)  # the batches this kernel needs

    # -------------------------------------------------------------------------- data
    tokenizer, tokenizer_flag = tokenizer_for(m)
    ensure_chat_template(tokenizer)
    settings = ChatSettings(d.max_seq_length, d.train_on, d.default_system_prompt)

    def samples_for(patterns, flag):
        return runtime.main_first(lambda: prepare_chat(patterns, flag, tokenizer, settings, d.chat_format, d.strict,
                                                       d.data_cache_dir, build=runtime.is_main, tokenizer_flag=tokenizer_flag))

    samples = samples_for(d.train_files, "--train_files")
    train_idx, eval_idx, eval_samples = np.arange(len(samples)), None, samples
    if d.validation_files:
        eval_samples = samples_for(d.validation_files, "--validation_files")
        eval_idx = np.arange(len(eval_samples))
    elif d.validation_split_ratio > 0 and len(samples) >= 2:
        split = len(samples) - max(1, int(len(samples) * d.validation_split_ratio))
        order = np.random.default_rng(cfg.run.seed).permutation(len(samples))  # files are often sorted by topic
        train_idx, eval_idx = np.sort(order[:split]), np.sort(order[split:])
    train_rows = make_rows(samples, train_idx, d.max_seq_length, d.packing, cfg.run.seed)
    eval_rows = make_rows(eval_samples, eval_idx, d.max_seq_length, d.packing, cfg.run.seed) if eval_idx is not None else None
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps
    sampler = ResumableSampler(train_rows, runtime.world_size, runtime.rank, seed=cfg.run.seed,
                               lengths=None if d.packing else samples.lengths[train_idx],
                               group_size=LENGTH_GROUP * micro * runtime.world_size)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    collate = partial(collate_rows, pad_id=pad_id, layout=layout)
    loader = DataLoader(train_rows, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda",
                        generator=loop.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = loop.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_rows)} training rows",
                                                   "--per_device_train_batch_size/--gradient_accumulation_steps")
    evaluate = partial(loop.evaluate, batch_size=cfg.batch.per_device_eval_batch_size or micro, collate=collate, mask_dtype=masks)
    row_lengths = train_rows.row_lengths()
    # this rank's first epoch, as the loader will batch it; a flat batch (FlashAttention) has no padding
    fill = 1.0 if layout == "flat" else batch_fill(row_lengths, list(sampler), micro)
    log.info("rows: %d training samples -> %d rows (%s, %.1f%% of %d tokens used); batches %.1f%% non-pad (%s layout); %s validation rows",
             len(train_idx), len(train_rows), "packed" if d.packing else "one sample each, length-grouped",
             100 * row_lengths.sum() / (len(train_rows) * d.max_seq_length), d.max_seq_length, 100 * fill, layout,
             len(eval_rows) if eval_rows is not None else "no")

    # ------------------------------------------------------------------------- model
    with runtime.model_init_context(sharded=True):
        # a frozen LoRA base needs no fp32 master copy: load it in the training precision (7B: 15 GB, not 30)
        base_dtype = runtime.precision if lora.lora_r > 0 else "fp32"
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed, dtype=base_dtype)
    if lora.lora_r > 0:
        chat_tokens = tokenizer.convert_tokens_to_ids([IM_START, IM_END]) if lora.lora_train_chat_tokens else None
        if chat_tokens and runtime.zero_stage == 3 and runtime.device.type != "cuda":
            # peft 0.21 gathers the token rows under ZeRO-3 into a CUDA tensor; without a GPU it cannot
            log.warning("--lora_train_chat_tokens needs a GPU under ZeRO-3 (PEFT gathers the rows on CUDA); "
                        "training the LoRA adapters without the chat-token embedding rows")
            chat_tokens = None
        model = apply_lora(model, lora, cfg.run.seed, chat_tokens)
    chunked, loss_why = use_chunked_loss(model, m.chunked_loss)
    log.info("loss: %s", loss_why)
    compiled, compile_why = compile_decoder_layers(model, m.torch_compile)
    log.info("compile: %s", compile_why)
    n_params = count_parameters(model)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    # --------------------------------------------------------------------- optimizer
    optimizer = build_optimizer(model, cfg.optim, runtime.device)
    raw_optimizer = optimizer  # its param_groups carry the lr the schedule sets, whatever wraps it
    model, optimizer = runtime.prepare(model, optimizer)
    global_batch = micro * accumulation * runtime.world_size
    log.info("model: %s, %.2fM parameters, %.2fM trained (%s); strategy %s, precision %s, device %s, lr %.1e",
             m.model_name_or_path, n_params / 1e6, n_trainable / 1e6, f"LoRA r={lora.lora_r}" if lora.lora_r else "full",
             runtime.strategy, runtime.precision, runtime.device, cfg.optim.learning_rate)
    log.info("batch: micro %d x accumulation %d x world %d = global %d rows of up to %d tokens per step; %d steps (%d per epoch over %d rows)",
             micro, accumulation, runtime.world_size, global_batch, d.max_seq_length, total_steps, steps_per_epoch, len(train_rows))
    if runtime.is_main:
        loop.write_plan(out, runtime, cfg, attn, why, global_batch,
                        extra={"packing": d.packing, "batch_layout": layout, "max_seq_length": d.max_seq_length, "batch_fill": round(fill, 4),
                               "lora_r": lora.lora_r, "trainable_parameters": n_trainable, "chunked_loss": chunked, "loss_reason": loss_why,
                               "compiled_layers": compiled})

    # ------------------------------------------------------------------------ resume
    state = {"step": 0, "micro_step": 0, "epoch": 0, "samples_in_epoch": 0, "tokens_seen": 0, "input_tokens_seen": 0,
             "world_size": runtime.world_size, "best_eval_loss": None, "best_checkpoint": None,
             "skipped_steps": 0, "bad_steps_in_a_row": 0}
    layout = {"micro_batch": micro, "accumulation": accumulation, "packing": d.packing,
              "max_seq_length": d.max_seq_length, "rows": len(train_rows)}
    resume_from = ckpt.resolve_resume(cfg.run.resume, out, runtime)
    if resume_from is not None:
        state = ckpt.load_checkpoint(runtime, model, optimizer, resume_from, expect=layout)
        log.info("resumed from %s at step %d (epoch %d, %d rows into it per rank)",
                 resume_from, state["step"], state["epoch"], state["samples_in_epoch"])
    state.update(layout)
    tracker = Tracker(out, cfg.run.report_to, cfg.run.run_name, cfg, runtime.is_main, state["step"])
    batches = loop.batch_stream(loader, sampler, state, micro)
    resumed_step = state["step"]
    sample_log = loop.SampleLog(out, runtime.rank, cfg.run.record_sample_ids, resumed_step)

    # -------------------------------------------------------------------------- loop
    model.train()
    report = StepLog(runtime, tracker, total_steps, state["step"], cfg.run.logging_steps, "sft",
                     {"tokens": state["input_tokens_seen"], "trained_tokens": state["tokens_seen"]})
    stopped = None  # why all ranks stopped early (a signal), else None
    while state["step"] < total_steps:
        report.step_started()
        lr = set_learning_rate(raw_optimizer, state["step"], total_steps, cfg.optim) * cfg.optim.learning_rate
        window = [next(batches) for _ in range(accumulation)]
        result = loop.train_step(runtime, model, optimizer, window, cfg.optim.max_grad_norm,
                                 loss_sum=partial(loop.lm_loss, mask_dtype=masks))
        state["micro_step"] += accumulation
        state["step"] += 1
        state["tokens_seen"] += result.units
        state["input_tokens_seen"] += result.input_tokens
        report.step_finished(result.loss, result.applied)
        step = state["step"]
        sample_log.write(step, state["epoch"], window)
        loop.account_step(runtime, state, result, window, tracker, cfg.run.max_bad_steps, out)
        if report.due(step):
            report.log(step, lr, result.grad_norm, {"tokens": state["input_tokens_seen"], "trained_tokens": state["tokens_seen"]},
                       epoch=state["epoch"] + state["samples_in_epoch"] / sampler.num_samples, skipped_steps=state["skipped_steps"])

        evaluated = None
        if eval_rows is not None and cfg.run.eval_steps > 0 and step % cfg.run.eval_steps == 0 and step < total_steps:
            evaluated = evaluate(runtime, model, eval_rows)
            tracker.log({"step": step, **evaluated})
            log.info("step %d eval_loss %.4f eval_ppl %.2f", step, evaluated["eval_loss"], evaluated["eval_ppl"])

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
        final = loop.save_final(runtime, model, tokenizer, out, adapter_only=lora.lora_r > 0)
        if lora.merge_lora:
            if runtime.is_main:
                with runtime.model_init_context(sharded=False):  # a plain load on rank 0 alone, not a collective ZeRO-3 one
                    merge_adapter(m.model_name_or_path, final, final / "merged", tokenizer, m.trust_remote_code)
            runtime.barrier()

    # -------------------------------------------------------------------------- eval
    summary = {"step": state["step"], "loss": report.last.get("loss"), "trained_tokens": state["tokens_seen"],
               "tokens": state["input_tokens_seen"], "parameters": n_params, "trainable_parameters": n_trainable,
               "strategy": runtime.strategy, "world_size": runtime.world_size, "stopped": stopped, "rows": len(train_rows),
               "batch_fill": round(fill, 4), "data": {k: samples.meta[k] for k in ("read", "kept", "truncated", "skipped")}}
    if eval_rows is not None and not stopped:
        final_eval = evaluate(runtime, model, eval_rows)
        tracker.log({"step": state["step"], **final_eval})
        log.info("final eval_loss %.4f eval_ppl %.2f over %d trained tokens", final_eval["eval_loss"], final_eval["eval_ppl"],
                 final_eval["eval_tokens"])
        summary.update(final_eval)
    tracker.close()
    if runtime.is_main:
        plot_loss(out / METRICS_FILE, out / "loss.png", title=f"sft {m.model_name_or_path}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    loop.report_outcome(runtime, out, state, resumed_step, stopped)
    runtime.end()
    return summary
