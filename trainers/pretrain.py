"""Pretraining from scratch (--model_preset) and continued pretraining (--model_name_or_path) on packed blocks.

Sections, in the order every trainer follows:
config -> runtime -> data -> model -> optimizer -> resume -> loop -> save -> eval.
The step itself (loss normalised by the global trained-token count) is trainers/loop.py's.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from trainers import checkpoint as ckpt
from trainers import loop, stopping
from trainers.chunked_loss import use_chunked_loss
from trainers.config import PretrainConfig, save_resolved_config
from trainers.data.collate import ResumableSampler, collate_blocks
from trainers.data.packing import prepare_blocks
from trainers.errors import UsageError, check_output_dir
from trainers.attention import resolve_attn_implementation
from trainers.models import build_model, check_torch_compile, compile_decoder_layers, count_parameters, resolve_model_config, tokenizer_for
from trainers.optim import build_optimizer, set_learning_rate
from trainers.runtime import Runtime, launcher_world
from trainers.tracking import METRICS_FILE, StepLog, Tracker, plot_loss

log = logging.getLogger("trainrig.pretrain")


def train(cfg: PretrainConfig) -> dict:
    # ------------------------------------------------------------------------ config
    out = Path(cfg.run.output_dir)
    world_size, _, _ = launcher_world()
    cfg.batch.gradient_accumulation_steps = loop.resolve_accumulation(cfg.batch, world_size)
    m, d = cfg.model, cfg.data
    if bool(m.model_preset) == bool(m.model_name_or_path):
        raise UsageError("pass exactly one of --model_preset (from scratch) or --model_name_or_path (continued pretraining)")
    model_config = resolve_model_config(m, d.block_size)  # before any data work: bad paths and sizes fail fast
    loop.check_run_settings(cfg, out)
    check_output_dir(out)  # every rank: on several nodes each must be able to write its shards
    loop.seed_everything(cfg.run.seed)

    # ----------------------------------------------------------------------- runtime
    runtime = Runtime(cfg.dist, cfg.batch, cfg.optim, getattr(cfg, "_sources", {}),
                      uses_muon=cfg.optim.optimizer == "muon", hidden_size=model_config.hidden_size)
    loop.setup_logging(runtime.is_main)
    loop.check_plan_agrees(runtime, cfg)
    check_torch_compile(m.torch_compile, runtime.device, runtime.zero_stage)
    if runtime.is_main:
        save_resolved_config(cfg, out / "resolved_config.yaml")

    # -------------------------------------------------------------------------- data
    tokenizer, _ = tokenizer_for(m)

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
                        num_workers=cfg.batch.dataloader_num_workers, pin_memory=runtime.device.type == "cuda",
                        generator=loop.loader_generator(cfg.run.seed))
    steps_per_epoch, total_steps = loop.plan_steps(sampler, cfg.run, micro, accumulation, runtime.world_size, f"{len(train_blocks)} training blocks",
                                                   "--per_device_train_batch_size/--gradient_accumulation_steps/--block_size")
    evaluate = partial(loop.evaluate, batch_size=cfg.batch.per_device_eval_batch_size or micro, collate=collate_blocks)

    # ------------------------------------------------------------------------- model
    attn, why = resolve_attn_implementation(m.attn_implementation, runtime.device, runtime.precision)
    log.info("attention: %s (%s)", attn, why)
    with runtime.model_init_context(sharded=bool(m.model_name_or_path)):
        model = build_model(m, model_config, tokenizer, attn, cfg.run.seed)
    chunked, loss_why = use_chunked_loss(model, m.chunked_loss)
    log.info("loss: %s", loss_why)
    compiled, compile_why = compile_decoder_layers(model, m.torch_compile)
    log.info("compile: %s", compile_why)
    n_params = count_parameters(model)

    # --------------------------------------------------------------------- optimizer
    optimizer = build_optimizer(model, cfg.optim, runtime.device)
    raw_optimizer = optimizer  # its param_groups carry the lr the schedule sets, whatever wraps it
    model, optimizer = runtime.prepare(model, optimizer)
    global_batch = micro * accumulation * runtime.world_size
    log.info("model: %s, %.2fM parameters; strategy %s, precision %s, device %s",
             m.model_preset or m.model_name_or_path, n_params / 1e6, runtime.strategy, runtime.precision, runtime.device)
    log.info("batch: micro %d x accumulation %d x world %d = global %d sequences = %s tokens per step; %d steps (%d per epoch over %d blocks)",
             micro, accumulation, runtime.world_size, global_batch, f"{global_batch * d.block_size:,}", total_steps,
             steps_per_epoch, len(train_blocks))
    if runtime.is_main:
        loop.write_plan(out, runtime, cfg, attn, why, global_batch, extra={"chunked_loss": chunked, "loss_reason": loss_why,
                                                                              "compiled_layers": compiled})

    # ------------------------------------------------------------------------ resume
    state = {"step": 0, "micro_step": 0, "epoch": 0, "samples_in_epoch": 0, "tokens_seen": 0,
             "world_size": runtime.world_size, "best_eval_loss": None, "best_checkpoint": None,
             "skipped_steps": 0, "bad_steps_in_a_row": 0}
    resume_from = ckpt.resolve_resume(cfg.run.resume, out, runtime)
    if resume_from is not None:
        state = ckpt.load_checkpoint(runtime, model, optimizer, resume_from,
                                     expect={"micro_batch": micro, "accumulation": accumulation})
        log.info("resumed from %s at step %d (epoch %d, %d samples into it per rank)",
                 resume_from, state["step"], state["epoch"], state["samples_in_epoch"])
    state.update(micro_batch=micro, accumulation=accumulation)
    tracker = Tracker(out, cfg.run.report_to, cfg.run.run_name, cfg, runtime.is_main, state["step"])
    batches = loop.batch_stream(loader, sampler, state, micro)
    resumed_step = state["step"]
    sample_log = loop.SampleLog(out, runtime.rank, cfg.run.record_sample_ids, resumed_step)

    # -------------------------------------------------------------------------- loop
    model.train()
    report = StepLog(runtime, tracker, total_steps, state["step"], cfg.run.logging_steps, "pretrain",
                     {"tokens": state["tokens_seen"]})
    stopped = None  # why all ranks stopped early (a signal), else None
    while state["step"] < total_steps:
        report.step_started()
        lr = set_learning_rate(raw_optimizer, state["step"], total_steps, cfg.optim) * cfg.optim.learning_rate
        window = [next(batches) for _ in range(accumulation)]
        result = loop.train_step(runtime, model, optimizer, window, cfg.optim.max_grad_norm)
        state["micro_step"] += accumulation
        state["step"] += 1
        state["tokens_seen"] += result.units
        report.step_finished(result.loss, result.applied)
        step = state["step"]
        sample_log.write(step, state["epoch"], window)
        loop.account_step(runtime, state, result, window, tracker, cfg.run.max_bad_steps, out)
        if report.due(step):
            report.log(step, lr, result.grad_norm, {"tokens": state["tokens_seen"]},
                       epoch=state["epoch"] + state["samples_in_epoch"] / sampler.num_samples, skipped_steps=state["skipped_steps"])

        evaluated = None
        if eval_blocks is not None and cfg.run.eval_steps > 0 and step % cfg.run.eval_steps == 0 and step < total_steps:
            evaluated = evaluate(runtime, model, eval_blocks)
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
        loop.save_final(runtime, model, tokenizer, out)

    # -------------------------------------------------------------------------- eval
    summary = {"step": state["step"], "loss": report.last.get("loss"), "tokens_seen": state["tokens_seen"],
               "parameters": n_params, "strategy": runtime.strategy, "world_size": runtime.world_size, "stopped": stopped}
    if eval_blocks is not None and not stopped:
        final_eval = evaluate(runtime, model, eval_blocks)
        tracker.log({"step": state["step"], **final_eval})
        log.info("final eval_loss %.4f eval_ppl %.2f over %d tokens", final_eval["eval_loss"], final_eval["eval_ppl"], final_eval["eval_tokens"])
        summary.update(final_eval)
    tracker.close()
    if runtime.is_main:
        plot_loss(out / METRICS_FILE, out / "loss.png", title=f"pretrain {m.model_preset or m.model_name_or_path}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    loop.report_outcome(runtime, out, state, resumed_step, stopped)
    runtime.end()
    return summary
