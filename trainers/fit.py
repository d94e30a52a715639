"""The run loop, written once for every stage: resume, steps with accumulation, skip accounting,
logging, evaluation, checkpoints and their retention, stopping on a signal, the final save, the
summary and how the run ended.

A stage sets up its config, data and model top to bottom in its own module, then hands the loop
a `Training`: its loss and counts, its evaluation, what it saves at the end, and its figures.
What must be identical everywhere (the step, the data position, what a checkpoint holds) lives
here, so a new stage gets it by construction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainers import checkpoint as ckpt
from trainers import stopping
from trainers.errors import RunFailed, UsageError
from trainers.lora import merge_adapter
from trainers.optim import set_learning_rate
from trainers.step import StepResult, lm_counts, lm_loss, train_step
from trainers.tracking import METRICS_FILE, StepLog, Tracker, plot_loss

log = logging.getLogger("trainrig.fit")


@dataclass
class TrainState:
    """Where a run is: saved as trainer_state.json in every checkpoint, restored on resume."""

    step: int = 0  # optimizer steps done (skipped ones included: they keep their place in the schedule)
    micro_step: int = 0  # micro batches done on each rank (on a resume with another world size, the new ranks' count goes on from it)
    epoch: int = 0  # the epoch the data position is in
    samples_in_epoch: int = 0  # this rank's samples (blocks, rows, pairs) handed out in that epoch; x world_size: all ranks' 
    input_tokens: int = 0  # input tokens of all global batches so far, padding excluded
    trained_tokens: int = 0  # tokens the loss counted (the language-model stages)
    trained_pairs: int = 0  # preference pairs the loss counted (the reward model)
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient (or an fp16 overflow)
    bad_steps_in_a_row: int = 0  # the current run of non-finite steps (--max_bad_steps)
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None  # checkpoint-<step> of best_eval_loss
    world_size: int = 1  # ranks that saved it (samples_in_epoch is per rank; ZeRO's shards are partitioned over them)
    layout: dict = field(default_factory=dict)  # the settings a resume must match (global batch, ...) and the micro batch and accumulation it ran with

    def to_json(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        return {**record, **self.layout}

    @classmethod
    def from_json(cls, record: dict) -> TrainState:
        """A saved state; also one of trainrig <= 0.9, whose "tokens_seen" counted trained tokens
        (pretraining, SFT, which kept input tokens in "input_tokens_seen") or input tokens (the
        reward model, which kept its pairs in "pairs_seen")."""
        record = dict(record)
        if "pairs_seen" in record:
            record.setdefault("trained_pairs", record.pop("pairs_seen"))
            record.setdefault("input_tokens", record.pop("tokens_seen", 0))
        elif "tokens_seen" in record:
            record.setdefault("trained_tokens", record.pop("tokens_seen"))
            record.setdefault("input_tokens", record.pop("input_tokens_seen", 0))  # pretraining kept none: 0
        names = {f.name for f in dataclasses.fields(cls)} - {"layout"}
        return cls(**{k: v for k, v in record.items() if k in names},
                   layout={k: v for k, v in record.items() if k not in names})


@dataclass
class Training:
    """What a stage hands the run loop once its config, data and model are set up."""

    name: str  # the stage, for the progress bar and loss.png's title
    model: Any  # as the runtime prepared it
    optimizer: Any  # as the runtime wrapped it
    raw_optimizer: Any  # the optimizer itself: its param_groups carry the lr the schedule sets
    loader: Any  # this rank's DataLoader over the training set, micro batches of `micro`
    sampler: Any  # its ResumableSampler (the data position lives there)
    total_steps: int
    layout: dict  # batch settings a checkpoint must have been saved with to resume (micro batch, accumulation, ...)
    save_final: Callable[[], None]  # final/ (and whatever the stage derives from it), all ranks
    summary: Callable[[TrainState], dict]  # the stage's own summary.json fields
    log_counts: Callable[[TrainState], dict[str, int]]  # running totals in each metrics record; the first is the headline rate
    loss_sum: Callable = lm_loss  # (model, batch, device, global units) -> this micro batch's summed loss / global units
    counts: Callable = lm_counts  # batch -> (trained units, input tokens)
    unit: str = "trained_tokens"  # the TrainState counter the trained units add to
    samples: str = "samples"  # what a sample of this stage's data is, in the log ("rows", "pairs")
    evaluate: Callable[[], dict] | None = None  # the validation figures, eval_loss first; None without a validation set
    step_figures: Callable[[], dict] | None = None  # the stage's own training figures since the last record, reduced over ranks (every rank calls it at the same steps)
    describe_eval: Callable[[dict], str] = lambda e: f"eval_loss {e['eval_loss']:.4f}"


def fit(run, runtime, t: Training) -> dict:
    """Train `t` to its last step or to an agreed stop; return the summary (also summary.json)."""
    cfg = run.cfg
    out = Path(cfg.run.output_dir)
    micro, accumulation = cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps

    # ------------------------------------------------------------------------ resume
    state = TrainState(world_size=runtime.world_size)
    resume_from = ckpt.resolve_resume(cfg.run.resume, out, runtime)
    if resume_from is not None:
        loading = time.monotonic()
        record = ckpt.load_checkpoint(runtime, t.model, t.optimizer, resume_from, expect=t.layout, work_dir=out)
        state = TrainState.from_json(record)
        keep_saved_grouping(t.sampler, record)
        saved_world = state.world_size
        if saved_world != runtime.world_size:
            state.samples_in_epoch = position_on_world(state.samples_in_epoch, saved_world, runtime.world_size, resume_from)
            state.world_size = runtime.world_size
            log.info("%s was saved by %d ranks, this run has %d: same global batch %d (micro %d x accumulation %d x world %d), "
                     "the data position split anew over the ranks", resume_from, saved_world, runtime.world_size,
                     micro * accumulation * runtime.world_size, micro, accumulation, runtime.world_size)
        log.info("resumed from %s at step %d (epoch %d, %d %s into it per rank), loaded in %.1f s",
                 resume_from, state.step, state.epoch, state.samples_in_epoch, t.samples, time.monotonic() - loading)
    state.layout = {**t.layout, "micro_batch": micro, "accumulation": accumulation, "length_group": t.sampler.group_size}
    tracker = Tracker(out, cfg.run.report_to, cfg.run.run_name, cfg, runtime.is_main, state.step)
    batches = batch_stream(t.loader, t.sampler, state, micro)
    resumed_step = state.step
    sample_log = SampleLog(out, runtime.rank, runtime.world_size, cfg.run.record_sample_ids, resumed_step)

    # -------------------------------------------------------------------------- loop
    t.model.train()
    report = StepLog(runtime, tracker, t.total_steps, state.step, cfg.run.logging_steps, t.name, t.log_counts(state))
    stopped = None  # why all ranks stopped early (a signal), else None
    while state.step < t.total_steps:
        report.step_started()
        lr = set_learning_rate(t.raw_optimizer, state.step, t.total_steps, cfg.optim) * cfg.optim.learning_rate
        window = [next(batches) for _ in range(accumulation)]
        result = train_step(runtime, t.model, t.optimizer, window, cfg.optim.max_grad_norm, loss_sum=t.loss_sum, counts=t.counts)
        state.micro_step += accumulation
        state.step += 1
        setattr(state, t.unit, getattr(state, t.unit) + result.units)
        state.input_tokens += result.input_tokens
        report.step_finished(result.loss, result.applied)
        step = state.step
        sample_log.write(step, state.epoch, window)
        account_step(runtime, state, result, window, tracker, cfg.run.max_bad_steps, out)
        if report.due(step):
            report.log(step, lr, result.grad_norm, t.log_counts(state),
                       epoch=state.epoch + state.samples_in_epoch / t.sampler.num_samples, skipped_steps=state.skipped_steps,
                       figures=t.step_figures() if t.step_figures is not None else None)

        evaluated = None
        if t.evaluate is not None and cfg.run.eval_steps > 0 and step % cfg.run.eval_steps == 0 and step < t.total_steps:
            evaluated = t.evaluate()
            tracker.log({"step": step, **evaluated})
            log.info("step %d %s", step, t.describe_eval(evaluated))

        saved = cfg.run.save_steps > 0 and step % cfg.run.save_steps == 0
        if saved:
            save_and_prune(runtime, t, state, out, cfg.run, evaluated)
        stopped = stopping.agreed_stop(runtime) if step < t.total_steps else None  # the last step ends the run anyway
        if stopped:
            save_on_stop(runtime, t, state, out, cfg.run, stopped, saved)
            break
    report.close()

    # -------------------------------------------------------------------------- save
    if cfg.run.save_final and not stopped:
        t.save_final()

    # -------------------------------------------------------------------------- eval
    summary = {"step": state.step, "loss": report.last.get("loss"), **t.summary(state),
               "strategy": runtime.strategy, "world_size": runtime.world_size, "stopped": stopped}
    if t.evaluate is not None and not stopped:
        final_eval = t.evaluate()
        tracker.log({"step": state.step, **final_eval})
        log.info("final %s", t.describe_eval(final_eval))
        summary.update(final_eval)
    tracker.close()
    if runtime.is_main:
        plot_loss(out / METRICS_FILE, out / "loss.png", title=f"{t.name} {cfg.model.model_name_or_path or getattr(cfg.model, 'model_preset', '')}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report_outcome(runtime, out, state, resumed_step, stopped)
    runtime.end()
    return summary


def keep_saved_grouping(sampler, record: dict) -> None:
    """A length-grouped order resumes with the chunk size it was saved with: trainrig <= 0.14
    grouped by 64 micro batches of every rank, which is not the same on another world size."""
    if sampler.lengths is not None:
        sampler.group_size = record.get("length_group", 64 * record["micro_batch"] * record["world_size"])


def position_on_world(samples_done: int, saved_world: int, world: int, checkpoint: Path) -> int:
    """This rank's position in the epoch on `world` ranks, from a checkpoint's position on
    `saved_world`: the samples all ranks handed out, split anew. Rank r's j-th sample is the
    epoch's (j x world + r)-th (ResumableSampler), so the split is exact where the total is a
    multiple of the new world size -- always at a step boundary, where it is whole global batches."""
    done = samples_done * saved_world
    if done % world:
        raise UsageError(f"{checkpoint} is {done} samples into its epoch, which {world} ranks cannot split evenly (a checkpoint of "
                         f"trainrig <= 0.14 whose step spanned two epochs); resume it with {saved_world} ranks, or from an "
                         f"earlier checkpoint")
    return done // world


def batch_stream(loader, sampler, state: TrainState, micro: int):
    """Micro batches forever, epoch after epoch, from the saved position. The position counts
    batches handed out, so a window that crosses an epoch is recorded exactly."""
    while True:
        sampler.set_position(state.epoch, state.samples_in_epoch)
        for batch in loader:
            state.samples_in_epoch += micro
            yield batch
        state.epoch += 1
        state.samples_in_epoch = 0


def account_step(runtime, state: TrainState, result: StepResult, window: list[dict], tracker, max_bad_steps: int, out: Path) -> None:
    """After state.step advanced: a skipped update is logged with the ranks whose loss was not
    finite and the ids of their samples, counted in state (saved with checkpoints) and written to
    metrics.jsonl; more than `max_bad_steps` bad steps in a row stop the run on every rank. A
    skipped step still consumes its batches and its place in the learning-rate schedule; the
    weights and optimizer state stay as they were. fp16's loss-scale skips (finite loss) are
    counted but are not bad: the scaler lowers its scale and goes on."""
    if result.applied:
        state.bad_steps_in_a_row = 0
        return
    step = state.step
    state.skipped_steps += 1
    bad = not math.isfinite(result.loss) or runtime.precision != "fp16"
    here = [] if result.finite_here else [(runtime.rank, [int(i) for b in window for i in b.get("sample_ids", [])][:32])]
    culprits = runtime.gather_objects(here)  # every rank agrees the step was skipped, so every rank joins
    where = "; ".join(f"rank {r} (sample ids {ids})" for r, ids in culprits) or "gradients only (every loss finite)"
    tracker.log({"step": step, "skipped_update": True, "bad": bad, "nonfinite_loss_ranks": [r for r, _ in culprits],
                 "skipped_steps": state.skipped_steps})
    if not bad:
        log.info("step %d: fp16 loss scale overflow, update skipped (the scaler lowers its scale)", step)
        return
    state.bad_steps_in_a_row += 1
    in_a_row = state.bad_steps_in_a_row
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
    the lines past its checkpoint, so the files read as one uninterrupted run; after a resume on
    fewer ranks, rank 0 cuts the files of the ranks that are gone at the checkpoint too."""

    def __init__(self, out: Path, rank: int, world: int, enabled: bool, resumed_step: int):
        self.path = out / f"sample_ids.rank{rank}.jsonl" if enabled else None
        if self.path is None:
            return
        _keep_steps_to(self.path, resumed_step)
        if rank == 0:
            for gone in out.glob("sample_ids.rank*.jsonl"):
                if int(gone.name.split(".")[1][len("rank"):]) >= world:
                    _keep_steps_to(gone, resumed_step)

    def write(self, step: int, epoch: int, window: list[dict]) -> None:
        if self.path is not None:
            ids = [int(i) for b in window for i in b["sample_ids"]]
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")


def _keep_steps_to(path: Path, step: int) -> None:
    """A sample-id file without its lines past `step` (all of them for a fresh run)."""
    kept = []
    if step and path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-write
                continue
            if record["step"] <= step:
                kept.append(line + "\n")
    path.write_text("".join(kept))


def save_and_prune(runtime, t: Training, state: TrainState, out: Path, run_cfg, evaluated: dict | None) -> None:
    """checkpoint-<step>/ (all ranks), then rank 0 applies --save_total_limit (keeping the best)."""
    step = state.step
    if evaluated is not None and (state.best_eval_loss is None or evaluated["eval_loss"] < state.best_eval_loss):
        state.best_eval_loss, state.best_checkpoint = evaluated["eval_loss"], f"checkpoint-{step}"
    path = ckpt.save_checkpoint(runtime, t.model, t.optimizer, state.to_json(), out, step)
    log.info("saved %s", path)
    if runtime.is_main:
        best = out / state.best_checkpoint if run_cfg.save_best and state.best_checkpoint else None
        ckpt.prune_checkpoints(out, run_cfg.save_total_limit, best)


def save_on_stop(runtime, t: Training, state: TrainState, out: Path, run_cfg, reason: str, saved: bool) -> None:
    """All ranks agreed to stop (trainers/stopping.py): one complete checkpoint of this step,
    unless --save_steps has just written it."""
    if runtime.is_main:
        log.warning("%s: saving checkpoint-%d, then exiting with status %d; the same command (--resume auto) continues from it",
                    reason, state.step, stopping.STOPPED_EXIT_STATUS)
    if not saved:
        save_and_prune(runtime, t, state, out, run_cfg, None)


def report_outcome(runtime, out: Path, state: TrainState, resumed_step: int, stopped: str | None) -> None:
    """How the run ended, for whoever launched it ($TRAINRIG_STATUS_FILE; slurm/common.sh requeues
    a stopped run that made progress)."""
    if runtime.is_main:
        stopping.write_status(os.environ.get(stopping.STATUS_FILE_ENV), {
            "status": "stopped" if stopped else "completed", "reason": stopped, "step": state.step,
            "resumed_from_step": resumed_step, "output_dir": str(out),
            "checkpoint": str(out / f"checkpoint-{state.step}") if stopped else None})


def save_final_model(runtime, model, tokenizer, out: Path, lora_cfg, model_cfg) -> None:
    """final/ for a causal LM: the model, or with LoRA its adapter; with --merge_lora also
    final/merged/, the base reloaded in 16 bits with the adapter merged in (rank 0 alone)."""
    final = save_final(runtime, model, tokenizer, out, adapter_only=lora_cfg.lora_r > 0)
    if lora_cfg.merge_lora:
        if runtime.is_main:
            with runtime.model_init_context(sharded=False):  # a plain load on rank 0 alone, not a collective ZeRO-3 one
                merge_adapter(model_cfg.model_name_or_path, final, final / "merged", tokenizer, model_cfg.trust_remote_code)
        runtime.barrier()


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
