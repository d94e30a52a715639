"""`trainrig plan` and `trainrig launch`, and the planning every entry script does before training.

    trainrig plan --stage sft --hardware rtx5090 --model_name_or_path qwen2.5-7b --lora_r 16 --max_seq_length 2048
    trainrig launch sft --config configs/sft_lora_qwen2.5-0.5b.yaml          (plans for this machine, then runs it)
    trainrig launch sft --probe --config ...                                 (first confirms the micro batch with real steps)

In an entry script (`launch/pretrain.py`, `launch/sft.py`, under any launcher) every rank makes the
same plan from the same inputs -- the model's config, the flags, its own GPU's model and the world
size the launcher exported -- so no rank waits on another to plan; the trainer then checks that
all ranks agree before the first collective. `auto` batch flags take the plan's numbers (and, with
--deepspeed/--zero_stage/--offload left on auto, its strategy and checkpointing); explicit flags
are planned around, and the plan's memory estimate goes into plan.json either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch.planner import files, hardware, memory
from launch.planner.memory import GiB
from launch.planner.search import SAFETY_MARGIN, Plan, Request, accumulation_for, plan
from trainers.config import Run, parse_run, redact
from trainers.errors import UsageError, exit_on_usage_error
from trainers.quantization import base_bits
from trainers.stages import REPO, plan_names, stage_named

QWEN_VOCAB = 151936  # a preset planned without its tokenizer is assumed to use Qwen2.5's vocabulary


# ------------------------------------------------------------------------- config -> request


def _opted_in(cfg) -> bool:
    return "auto" in (cfg.batch.per_device_train_batch_size, cfg.batch.gradient_accumulation_steps)


def _vocab_of_tokenizer(model_cfg) -> int:
    from trainers.models import padded_vocab_size, tokenizer_for

    tokenizer, _ = tokenizer_for(model_cfg)
    return padded_vocab_size(tokenizer)  # as build_model pads it


def model_shape(cfg, notes: list[str]) -> memory.ModelShape:
    """The shape to plan for: a shipped shape name (qwen2.5-7b), else the run's own model config,
    resolved and checked exactly as the trainer will (same errors, before any data work)."""
    from trainers.models import resolve_model_config

    m = cfg.model
    seq_len, flag = (cfg.data.block_size, "--block_size") if hasattr(cfg.data, "block_size") else (cfg.data.max_seq_length, "--max_seq_length")
    preset = getattr(m, "model_preset", "")
    name = m.model_name_or_path
    if not preset and not Path(name).expanduser().exists():
        if name.lower() in memory.shipped_shape_names():
            return memory.load_shape(name)
        if name.startswith(("/", "./", "../", "~")) or "/" not in name:  # a local path, or no hub id (org/name)
            raise UsageError(f"--model_name_or_path {name}: no such directory and not a shipped shape "
                             f"({', '.join(memory.shipped_shape_names())}); pass a model directory or one of those")
    if hasattr(m, "model_preset") and bool(preset) == bool(m.model_name_or_path):  # the trainer's own rule, checked first
        raise UsageError("pass exactly one of --model_preset (from scratch) or --model_name_or_path (continued pretraining)")
    if not preset and not m.model_name_or_path:
        raise UsageError("--model_name_or_path is required: a model directory (for trainrig plan also a shipped shape: "
                         f"{', '.join(memory.shipped_shape_names())})")
    config = resolve_model_config(m, seq_len, flag)
    if preset:
        vocab = _vocab_of_tokenizer(m) if m.tokenizer_name_or_path and Path(m.tokenizer_name_or_path).exists() else 0
        if not vocab:
            vocab = QWEN_VOCAB
            notes.append(f"--model_preset {preset} planned with a {QWEN_VOCAB:,}-token vocabulary; pass --tokenizer_name_or_path for yours")
        config.vocab_size = vocab
    return memory.shape_from_config(config, preset or m.model_name_or_path, trust_remote_code=m.trust_remote_code)


def _deepspeed_constraint(dist, plan_everything: bool, hidden: int) -> tuple[str, str, str, tuple]:
    """(deepspeed, zero_stage, offload, the named DS JSON's buffer settings) for the request. The
    planner is free, within --zero_stage and --offload, when it picks the strategy and no DS JSON is
    named (or a shipped one, which is trainrig's own build); otherwise the run uses what the
    runtime's own rule (trainers.ds_config.deepspeed_json) gives, and the plan follows it and counts
    that file's buckets."""
    from trainers.ds_config import DS_CONFIG_DIR, buffer_keys, deepspeed_json, load_ds_json, zero_setup

    path, zero_stage, offload = deepspeed_json(dist)
    if plan_everything and dist.deepspeed == "auto" and (path is None or path.parent == DS_CONFIG_DIR):
        return "auto", zero_stage, offload, ()
    if path is None:
        return "none", "auto", "auto", ()
    stage, offload, _ = zero_setup(dist)
    zero = load_ds_json(path).get("zero_optimization", {})
    return f"{stage}:{offload}", "auto", "auto", buffer_keys({**zero, "stage": stage}, hidden)


def request_for(run: Run, stage: str, hw: hardware.Hardware, plan_everything: bool, notes: list[str]) -> Request:
    """The planning request for a parsed run. plan_everything: the planner picks what the user
    left at its default (trainrig plan/launch, or an `auto` batch flag)."""
    cfg = run.cfg
    batch = cfg.batch
    micro = batch.per_device_train_batch_size
    accumulation = batch.gradient_accumulation_steps
    if plan_everything:
        micro = None if micro == "auto" or not run.given("per_device_train_batch_size") else micro
        accumulation = None if accumulation == "auto" or not run.given("gradient_accumulation_steps") else accumulation
    else:
        micro = None if micro == "auto" else micro
        accumulation = None if accumulation == "auto" else accumulation
    if batch.global_batch_size:
        accumulation = None  # --global_batch_size fixes it, as in the trainer (a resume on another world size sets it)
    elif accumulation is None and micro is not None:
        accumulation = 1
    from trainers.lora import settle_lora_flags  # imports torch, which `trainrig plan --help` need not

    lora = cfg.lora  # the trainer's own defaults and refusals (a quantized base without LoRA, under ZeRO-3), before a plan
    settle_lora_flags(run, from_scratch=bool(getattr(cfg.model, "model_preset", "")), needs_library=False)
    shape = model_shape(cfg, notes)
    deepspeed, zero_stage, offload, ds_zero = _deepspeed_constraint(cfg.dist, plan_everything, shape.hidden)
    ckpt = cfg.model.gradient_checkpointing if (run.given("gradient_checkpointing") or not plan_everything) else None
    seq_len = cfg.data.block_size if hasattr(cfg.data, "block_size") else cfg.data.max_seq_length
    return Request(stage=stage, shape=shape, seq_len=seq_len, hardware=hw,
                   global_batch=batch.global_batch_size, micro_batch=micro, accumulation=accumulation,
                   precision=cfg.dist.precision, optimizer=cfg.optim.optimizer,
                   lora_rank=lora.lora_r, lora_dropout=lora.lora_dropout > 0, dora=lora.use_dora, quantization_auto=lora.quantization == "auto",
                   base_bits=base_bits(lora), double_quant=lora.bnb_4bit_use_double_quant,
                   gradient_checkpointing=ckpt, deepspeed=deepspeed, zero_stage=zero_stage, offload=offload, ds_zero=ds_zero,
                   attn=cfg.model.attn_implementation if cfg.model.attn_implementation in ("eager", "flash_attention_2") else "sdpa",
                   chunked_loss=chunked_loss_applies(cfg, shape))


def chunked_loss_applies(cfg, shape: memory.ModelShape) -> bool:
    """Whether the trainer will route the loss through trainers/chunked_loss.py (use_chunked_loss's
    rules, known before the model exists): asked for, a supported model type, and a plain head
    (PEFT wraps a tied head for --lora_train_chat_tokens)."""
    from trainers.chunked_loss import SUPPORTED_MODEL_TYPES

    lora = cfg.lora
    wrapped_head = lora.lora_r > 0 and getattr(lora, "lora_train_chat_tokens", False) and shape.tied_embeddings  # SFT's flag
    return getattr(cfg.model, "chunked_loss", False) and shape.model_type in SUPPORTED_MODEL_TYPES and not wrapped_head


def make_plan(run: Run, stage: str, local_only: bool, plan_everything: bool) -> Plan:
    hw = hardware.resolve(run.cfg.dist.hardware, local_only=local_only)
    notes: list[str] = []
    result = plan(request_for(run, stage, hw, plan_everything, notes))
    result.notes[:0] = notes
    return result


def _no_fit_message(result: Plan, flag: str) -> str:
    best = result.chosen
    tips = "; ".join(result.notes) if result.notes else "nothing"
    return (f"{flag}: nothing fits {result.request.hardware.describe()} for {result.request.shape.name} at "
            f"{result.request.seq_len} tokens (closest: {best.setup.name}, {best.why_not}); would fit: {tips}")


# ---------------------------------------------------------------------- in the entry scripts


def plan_in_process(run: Run, stage: str) -> Run:
    """Fill the config's `auto` fields from a plan for the hardware this rank sees, and keep the
    plan (run.plan) for plan.json. A plan that does not fit is an error when the planner was
    asked to size the batch, and a warning in plan.json when the user sized it."""
    cfg = run.cfg
    opted_in = _opted_in(cfg)
    result = make_plan(run, stage, local_only=True, plan_everything=opted_in)
    if opted_in and not result.fits:
        raise UsageError(_no_fit_message(result, "--per_device_train_batch_size auto"))
    if opted_in:
        s = result.setup
        cfg.batch.per_device_train_batch_size = s.micro_batch
        cfg.batch.gradient_accumulation_steps = result.chosen.accumulation
        cfg.batch.global_batch_size = result.global_batch
        if not run.given("gradient_checkpointing"):
            cfg.model.gradient_checkpointing = s.gradient_checkpointing
        if cfg.dist.deepspeed == "auto" and cfg.dist.zero_stage == "auto" and s.deepspeed:
            cfg.dist.zero_stage, cfg.dist.offload = str(s.zero_stage), s.offload
    if cfg.lora.quantization == "auto":  # the planner's choice of base, decided for the trainer (plan.json's notes say why)
        cfg.lora.load_in_4bit, cfg.lora.quantization = result.setup.base_bits == 4, "none"
    for key, value in result.env.items():  # NCCL_P2P_DISABLE=1 where GPUs lack peer access; set before NCCL starts
        os.environ.setdefault(key, value)
    run.plan = result.to_json()
    return run


def stage_main(name: str):
    """The `main(argv)` of a stage's entry script: parse its flags, plan for the hardware this rank
    sees (filling `auto` batch flags; the estimate goes to plan.json), train."""
    stage = stage_named(name, "entry script")

    @exit_on_usage_error
    def main(argv: list[str] | None = None) -> dict:
        from trainers.runtime import launcher_world
        from trainers.setup import keep_resumed_global_batch

        run = parse_run(stage.config, argv, prog=stage.entry_script)
        keep_resumed_global_batch(run, launcher_world()[0])
        plan_in_process(run, stage.plan_name(run.cfg))
        return stage.train(run)

    return main


# -------------------------------------------------------------------------------- the CLI


def _parse(argv: list[str], stage: str | None, prog: str) -> tuple[str, list[str], Run]:
    argv = list(argv)
    if stage is None and ("-h" in argv or "--help" in argv) and "--stage" not in argv:
        print(__doc__.strip() + f"\n\nStage flags: {prog} --stage <stage> --help")
        sys.exit(0)
    if stage is None:
        if "--stage" not in argv or argv.index("--stage") + 1 >= len(argv):
            raise UsageError(f"{prog}: --stage {{{','.join(plan_names())}}} is required")
        i = argv.index("--stage")
        stage = argv[i + 1]
        del argv[i:i + 2]
    config = stage_named(stage, prog, plan_names()).config
    return stage, argv, parse_run(config, argv, prog=f"{prog} {stage}")


def table(result: Plan) -> str:
    """The plan as a person reads it: every candidate, then the chosen one term by term."""
    req, s = result.request, result.setup
    base = f" on a {s.base_bits}-bit base" if s.base_bits < 16 else ""
    lora = f", {'Q' if s.base_bits == 4 else ''}LoRA r{req.lora_rank}{base} ({s.lora_parameters / 1e6:.1f}M trainable)" if req.lora_rank else ""
    size = f"{req.shape.parameters / 1e9:.2f}B" if req.shape.parameters >= 1e9 else f"{req.shape.parameters / 1e6:.1f}M"
    lines = [f"plan: {req.stage} {req.shape.name} ({size} parameters), {req.seq_len} tokens{lora}, "
             f"{s.precision}, on {req.hardware.describe()}",
             "", f"  {'strategy':<32}{'micro':>6}{'GiB/rank':>10}  {'est. s/step':>11}  {'s/seq':>6}  fits"]
    for c in result.candidates:
        micro = str(c.setup.micro_batch) if c.fits else "-"
        step, per = (f"{c.step_seconds:.2f}", f"{c.seconds_per_sequence:.3f}") if c.fits else ("", "")
        mark = "<- chosen" if c is result.chosen and c.fits else ("yes" if c.fits else f"no: {c.why_not}")
        lines.append(f"  {c.setup.name:<32}{micro:>6}{c.memory.total / GiB:>10.1f}  {step:>11}  {per:>6}  {mark}")
    m = result.chosen.memory
    stage = plan_names()[req.stage]
    unit, per = stage.samples, stage.sequences_per_sample
    lines += ["", f"chosen: {s.name}, micro batch {s.micro_batch} x accumulation {result.chosen.accumulation} x world {s.world} "
                  f"= global {result.global_batch} {unit} ({result.global_batch * req.seq_len * per:,} tokens)" if result.fits else
              f"chosen: nothing fits; closest: {s.name} at micro batch {s.micro_batch} ({result.chosen.why_not})",
              f"memory per rank (GiB): parameters {m.parameters / GiB:.2f} | gradients {m.gradients / GiB:.2f} | "
              f"optimizer states {m.optimizer_states / GiB:.2f} | activations {m.activations / GiB:.2f} | logits {m.logits / GiB:.2f} | "
              f"overhead {m.overhead / GiB:.2f} | total {m.total / GiB:.2f} of {req.hardware.device_memory_bytes / GiB:.2f} "
              f"(budget {result.budget / GiB:.2f} after the {SAFETY_MARGIN:.0%} margin); "
              f"host RAM per node {m.cpu / GiB:.0f} GiB"]
    if result.env:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in result.env.items()) + "  (GPUs without peer-to-peer access)")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def write_plan_files(run: Run, result: Plan, stage: str, user_args: list[str]) -> tuple[list[str], str]:
    cfg = run.cfg
    out = Path(cfg.run.output_dir)
    ds_path, acc_path = files.write_files(result, out, cfg.optim.max_grad_norm)
    command = files.launch_command(result, stage, user_args, ds_path, rdzv_seed=str(out.resolve()))
    line = files.shell_line(result.env, redact(command))  # printed and kept in plan.json: no token from the environment
    record = {**result.to_json(), "command": line,
              "files": [str(p) for p in (out / "plan.json", ds_path, acc_path) if p is not None]}
    (out / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
    return command, line


@exit_on_usage_error
def main_plan(argv: list[str] | None = None) -> int:
    stage, rest, run = _parse(sys.argv[1:] if argv is None else argv, None, "trainrig plan")
    cfg = run.cfg
    result = make_plan(run, stage, local_only=False, plan_everything=True)
    print(table(result))
    out = Path(cfg.run.output_dir)
    if not result.fits:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        raise UsageError(_no_fit_message(result, "trainrig plan"))
    _, line = write_plan_files(run, result, stage, rest)
    script = REPO / plan_names()[stage].entry_script
    print(f"\nwrote {out / 'plan.json'}" + (f", {out / 'ds_config.json'}" if result.setup.deepspeed else "") + f", {out / 'accelerate.yaml'}")
    print(f"launch: {line}")
    if result.request.hardware.gpu is not None:  # accelerate's CPU multi-process mode is not torchrun's
        per_node = " --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR" if result.request.hardware.nodes > 1 else ""
        print(f"    or: accelerate launch --config_file {out.resolve() / 'accelerate.yaml'}{per_node} {script} [your flags] "
              + " ".join(files.run_arguments(result, out.resolve() / "ds_config.json" if result.setup.deepspeed else None)))
    if Path(cfg.model.model_name_or_path).name.lower() in memory.shipped_shape_names() and not Path(cfg.model.model_name_or_path).exists():
        print(f"note: {cfg.model.model_name_or_path} is a shipped shape for planning; give the run your model directory")
    return 0


# ------------------------------------------------------------------------------- the probe

PROBE_STEPS = 2
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
               "DefaultCPUAllocator: can't allocate memory", "MemoryError", "Signal 9 (SIGKILL)")  # CPU, the OOM killer


def with_micro_batch(result: Plan, micro: int, accumulation: int) -> Plan:
    setup = dataclasses.replace(result.setup, micro_batch=micro)
    chosen = dataclasses.replace(result.chosen, setup=setup, accumulation=accumulation,
                                 memory=memory.estimate(result.request.shape, setup))
    return dataclasses.replace(result, chosen=chosen, notes=list(result.notes))


def probe_micro_batch(planned: int, attempt) -> tuple[int, list[str]]:
    """The largest micro batch <= `planned` with which `attempt(micro)` -> (ok, out_of_memory, log)
    ran real steps on every rank; steps down 10% (at least one) after each out-of-memory.
    Another failure stops the probe: it is not the batch's fault."""
    tried = []
    micro = planned
    while micro >= 1:
        ok, out_of_memory, output = attempt(micro)
        tried.append(f"micro batch {micro}: {'ran' if ok else 'out of memory' if out_of_memory else 'failed'}")
        if ok:
            return micro, tried
        if not out_of_memory:
            raise UsageError(f"--probe: the trial run at micro batch {micro} failed for another reason than memory; "
                             f"fix that first: {output.strip().splitlines()[-1] if output.strip() else 'no output'}")
        micro -= max(1, micro // 10)  # 10% steps: the probed batch is within 10% of the largest that runs
    raise UsageError("--probe: even micro batch 1 runs out of memory here; " + "; ".join(tried)
                     + "; try --lora_r 16, --gradient_checkpointing, --offload optimizer or a shorter sequence")


def trial_runner(result: Plan, stage: str, user_args: list[str], out: Path, max_grad_norm: float):
    """attempt(micro) for probe_micro_batch: the real entry script under the real launcher, all
    ranks, PROBE_STEPS optimizer steps of one micro batch each, nothing saved. A rank that runs out
    of memory exits, torchrun then stops the others: no rank waits in a collective for a dead one,
    and the trial counts as passed only when every rank finished (the job's exit status)."""
    trial_dir = out / "probe"

    def attempt(micro: int) -> tuple[bool, bool, str]:
        trial = with_micro_batch(result, micro, 1)
        shutil.rmtree(trial_dir, ignore_errors=True)
        ds_path, _ = files.write_files(trial, trial_dir, max_grad_norm)
        overrides = ["--output_dir", str(trial_dir), "--max_steps", str(PROBE_STEPS), "--save_steps", "0", "--eval_steps", "0",
                     "--resume", "never", "--report_to", "none", "--no-save_final", "--logging_steps", "1"]
        command = files.launch_command(trial, stage, [*user_args, *overrides], ds_path, rdzv_seed=str(trial_dir))
        print(f"probe: micro batch {micro} ...", flush=True)
        proc = subprocess.run(command, env={**os.environ, **result.env}, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        killed = proc.returncode in (-9, 137)  # the kernel's OOM killer took a single process
        return proc.returncode == 0, killed or any(marker in output for marker in OOM_MARKERS), output

    return attempt


def check_profile_is_here(planned: hardware.Hardware) -> None:
    """trainrig launch runs on this machine: a profile for another one (4x4090 on a CPU box) would
    plan batches that are wrong here."""
    if planned.name == "detected":
        return
    here = hardware.detect()
    mismatch = (planned.gpu is None) != (here.gpu is None)
    if planned.gpu is not None and here.gpu is not None:  # fewer or smaller GPUs here than planned for
        mismatch = here.devices_per_node < planned.devices_per_node or here.gpu.memory_bytes < 0.98 * planned.gpu.memory_bytes
    if mismatch:
        raise UsageError(f"--hardware {planned.name}: trainrig launch runs on this machine, which has {here.describe()}; "
                         f"use --hardware auto here, or trainrig plan --hardware {planned.name} to plan for another machine")


@exit_on_usage_error
def main_launch(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"trainrig launch: name the stage first: trainrig launch {{{','.join(plan_names())}}} [--probe] [flags]")
    probe = "--probe" in argv
    argv = [a for a in argv if a != "--probe"]
    stage, rest, run = _parse(argv[1:], argv[0], "trainrig launch")
    cfg = run.cfg
    result = make_plan(run, stage, local_only=False, plan_everything=True)
    check_profile_is_here(result.request.hardware)
    print(table(result), flush=True)
    if not result.fits:
        raise UsageError(_no_fit_message(result, f"trainrig launch {stage}"))
    if probe and result.request.hardware.nodes == 1:
        out = Path(cfg.run.output_dir)
        micro, tried = probe_micro_batch(result.setup.micro_batch, trial_runner(result, stage, rest, out, cfg.optim.max_grad_norm))
        shutil.rmtree(out / "probe", ignore_errors=True)
        if micro != result.setup.micro_batch:
            micro, accumulation = accumulation_for(result.request.global_batch, micro, result.setup.world, result.request.accumulation)
            result = with_micro_batch(result, micro, accumulation)
        result.notes.append("probe: " + "; ".join(tried))
        print(f"probe: {'; '.join(tried)} -> micro batch {micro} x accumulation {result.chosen.accumulation}", flush=True)
    command, line = write_plan_files(run, result, stage, rest)
    if result.request.hardware.nodes > 1:
        raise UsageError(f"a {result.request.hardware.nodes}-node plan runs one command per node: "
                         f"submit {plan_names()[stage].sbatch}, or run on every node: {line}")
    print(f"launch: {line}", flush=True)
    os.execve(command[0], command, {**os.environ, **result.env})
    return 0  # not reached
