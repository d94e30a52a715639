"""(b) training step throughput: `launch/pretrain.py` vs. the HF `Trainer` and a bare PyTorch loop
on the same model init, blocks, micro batch, optimizer and precision, each in its own process
(the bare loop and the Trainer as children of bench/run.py's internal --bare_loop / --hf_trainer
modes); and the section's rendering for RESULTS.md."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import REPO, flops_per_token


def pretraining_setup(corpus, tokenizer_dir, cache_dir, preset, block_size, seed, lr):
    """(blocks, model, optimizer) as launch/pretrain.py makes them: the same blocks cache, seeded
    init and fused AdamW, for the loops it is compared with."""
    import torch

    from trainers.config import OptimConfig, PretrainModelConfig
    from trainers.data.packing import prepare_blocks
    from trainers.models import build_model, load_tokenizer, resolve_model_config
    from trainers.optim import build_optimizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(tokenizer_dir), False, "--tokenizer_name_or_path")
    blocks = prepare_blocks([str(corpus)], "--train_files", tokenizer, block_size, "text", str(cache_dir), 1000, build=True)
    model_cfg = PretrainModelConfig(model_preset=preset)
    model = build_model(model_cfg, resolve_model_config(model_cfg, block_size), tokenizer, "sdpa", seed)
    return blocks, model, build_optimizer(model, OptimConfig(learning_rate=lr), torch.device("cpu"))


def bare_loop_tokens_per_s(corpus, tokenizer_dir, cache_dir, preset, block_size, micro, steps, warmup, seed, lr) -> float:
    """The hand-written loop a user would write: same blocks, same init, same fused AdamW."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from trainers.data.collate import collate_blocks

    blocks, model, optimizer = pretraining_setup(corpus, tokenizer_dir, cache_dir, preset, block_size, seed, lr)
    sampler = DistributedSampler(blocks, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(blocks, batch_size=micro, sampler=sampler, collate_fn=collate_blocks, drop_last=True)

    def batches():
        while True:  # epoch after epoch, like trainrig's loop
            yield from loader

    stream = batches()
    model.train()
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(stream)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a real loop logs the loss every step
    return (steps - warmup) * micro * block_size / (time.perf_counter() - start)


def hf_trainer_tokens_per_s(corpus, tokenizer_dir, cache_dir, preset, block_size, micro, steps, warmup, seed, lr,
                            torch_compile: bool = False) -> float:
    """The HF `Trainer` on the same blocks, init, micro batch, fp32 and the very same fused AdamW
    (passed in, constant lr, clip 1.0); its logging every `warmup` steps, like trainrig's here. Timed
    by a callback from the end of step `warmup` to the end of the last step (the bare loop's steps),
    so data loading and the Trainer's per-step work count, as they do in trainrig's figure.
    torch_compile: its `torch_compile=True` (the whole model, loss included, through accelerate)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainers.data.collate import collate_blocks

    blocks, model, optimizer = pretraining_setup(corpus, tokenizer_dir, cache_dir, preset, block_size, seed, lr)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    class Timer(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):  # steps warmup+1..steps, each with its batch's loading
            if state.global_step == warmup:
                Timer.start = time.perf_counter()
            if state.global_step == steps:
                Timer.end = time.perf_counter()

    def collate(samples):  # the model's inputs only: the Trainer passes every key to forward()
        batch = collate_blocks(samples)
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro, max_steps=steps, learning_rate=lr,
                                 max_grad_norm=1.0, logging_steps=warmup, save_strategy="no", report_to=[], disable_tqdm=True,
                                 dataloader_num_workers=0, seed=seed, use_cpu=True, remove_unused_columns=False,
                                 torch_compile=torch_compile)
        trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=collate,
                          optimizers=(optimizer, constant), callbacks=[Timer()])
        trainer.train()
    return (steps - warmup) * micro * block_size / (Timer.end - Timer.start)


def trainrig_tokens_per_s(corpus, tokenizer_dir, cache_dir, preset, block_size, micro, steps, warmup, seed, lr, out,
                          chunked_loss: bool = True, torch_compile: bool = False) -> float:
    """`python launch/pretrain.py` as a user runs it, in its own process; its own tokens_per_sec.
    chunked_loss=False: `--no-chunked_loss`, the model's own loss, as the Trainer and the bare loop use it.
    torch_compile: `--torch_compile`, the decoder layers compiled (built in the warmup steps)."""
    argv = ["--chunked_loss" if chunked_loss else "--no-chunked_loss", "--torch_compile" if torch_compile else "--no-torch_compile",
            "--train_files", str(corpus), "--tokenizer_name_or_path", str(tokenizer_dir), "--model_preset", preset,
            "--block_size", str(block_size), "--per_device_train_batch_size", str(micro), "--max_steps", str(steps),
            "--logging_steps", str(warmup), "--learning_rate", str(lr), "--seed", str(seed), "--output_dir", str(out),
            "--resume", "never", "--data_cache_dir", str(cache_dir), "--validation_split_ratio", "0"]
    subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *argv], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_sec" in r][1:]  # the first window is the warmup
    return sum(r["tokens_per_sec"] for r in timed) / len(timed)  # equal-size windows: mean of rates


def bare_tokens_per_s_in_process(*args) -> float:
    """The bare loop in its own process too, so neither loop inherits the other's heap."""
    return _tokens_per_s_in_process("--bare_loop", *args)


def hf_trainer_tokens_per_s_in_process(*args) -> float:
    return _tokens_per_s_in_process("--hf_trainer", *args)


def hf_trainer_compiled_tokens_per_s_in_process(*args) -> float:
    return _tokens_per_s_in_process("--hf_trainer_compiled", *args)


def _tokens_per_s_in_process(flag: str, *args) -> float:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), flag, json.dumps([str(a) for a in args])], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{flag} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


PRETRAIN_TARGET_VS_TRAINER, PRETRAIN_TARGET_VS_BARE = 1.10, 0.97  # issue 8's targets for trainrig's tokens/s
# Section (b)'s loops, in the order the tables show them.
TRAINING_LOOPS = {
    "trainrig": "trainrig (default: chunked loss)",
    "trainrig_compiled": "trainrig `--torch_compile`",
    "trainrig_own_loss": "trainrig `--no-chunked_loss`",
    "hf_trainer": "HF `Trainer`",
    "hf_trainer_compiled": "HF `Trainer` `torch_compile=True`",
    "bare": "bare PyTorch loop",
}


def bench_training(corpus, tokenizer_dir, workdir, preset, block_size, micro, steps, warmup, repeats, peak_flops: float) -> dict:
    cache = workdir / "train_cache"
    runs: dict[str, list[float]] = {name: [] for name in TRAINING_LOOPS}
    for i in range(repeats):  # interleaved, so drift in machine load hits every loop alike
        common = (corpus, tokenizer_dir, cache, preset, block_size, micro, steps, warmup, 0, 1e-3)
        runs["bare"].append(bare_tokens_per_s_in_process(*common))
        runs["hf_trainer"].append(hf_trainer_tokens_per_s_in_process(*common))
        runs["trainrig"].append(trainrig_tokens_per_s(*common, workdir / f"run_{preset}_{i}"))
        runs["trainrig_own_loss"].append(trainrig_tokens_per_s(*common, workdir / f"run_{preset}_own_{i}", chunked_loss=False))
        runs["trainrig_compiled"].append(trainrig_tokens_per_s(*common, workdir / f"run_{preset}_compiled_{i}", torch_compile=True))
        runs["hf_trainer_compiled"].append(hf_trainer_compiled_tokens_per_s_in_process(*common))
    median = {name: statistics.median(values) for name, values in runs.items()}
    flops = flops_per_token(preset, tokenizer_dir, block_size)
    return {"preset": preset, "block_size": block_size, "micro_batch": micro, "steps": steps, "warmup": warmup, "repeats": repeats,
            **{f"{name}_tok_s": value for name, value in median.items()},
            **{f"{name}_all": [round(x) for x in values] for name, values in runs.items()},
            "ratio": median["trainrig"] / median["bare"], "trainer_ratio": median["trainrig"] / median["hf_trainer"],
            "flops_per_token": flops, "peak_flops": peak_flops,
            "mfu": {name: value * flops["per_token"] / peak_flops for name, value in median.items()}}


def render_training(training: list[dict]) -> list[str]:
    first = training[0]
    lines = [
        "## (b) Pretraining step throughput, 1 process, fp32, fused AdamW",
        "",
        f"Medians of {first['repeats']} runs, the {len(TRAINING_LOOPS)} loops interleaved, the warmup steps excluded (they hold the compile of the "
        "compiled loops); each run is its own process.",
        "",
        "| model (block x micro, steps (warmup)) | loop | tokens/s | vs. HF `Trainer` | vs. bare loop | MFU | runs |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for t in training:
        shape = f"{t['preset']} ({t['block_size']} x {t['micro_batch']}, {t['steps']} ({t['warmup']}))"
        for name, label in TRAINING_LOOPS.items():
            rate = t[f"{name}_tok_s"]
            lines.append(f"| {shape} | {label} | {rate:,.0f} | {rate / t['hf_trainer_tok_s']:.3f}x | {rate / t['bare_tok_s']:.3f}x "
                         f"| {t['mfu'][name]:.1%} | {t[f'{name}_all']} |")
    lines += ["", "trainrig's figures are its own `tokens_per_sec` (time inside training steps, data loading included); the bare "
              "loop is timed over the same steps, the `Trainer` by a callback from the end of the last warmup step to the end of "
              "the last step. All get the same blocks, init, micro batch, fp32, and trainrig's fused AdamW with a constant lr. "
              "trainrig's default runs as a user runs it, with its chunked LM-head loss (trainers/chunked_loss.py); the Trainer "
              "and the bare loop use the model's own loss (transformers' ForCausalLMLoss over the whole logits), as does trainrig "
              "with `--no-chunked_loss`, which isolates the loop. `--torch_compile` compiles trainrig's decoder layers in place "
              "(one graph shared by the layers; the chunked loss stays eager); the Trainer's `torch_compile=True` compiles the "
              "whole model, its loss included.",
              "", f"Targets (>= {PRETRAIN_TARGET_VS_TRAINER:.2f}x the Trainer, >= {PRETRAIN_TARGET_VS_BARE:.2f}x the bare loop):"]
    for t in training:
        verdicts = []
        for name, label in (("trainrig", "default"), ("trainrig_compiled", "`--torch_compile`")):
            vs_trainer, vs_bare = t[f"{name}_tok_s"] / t["hf_trainer_tok_s"], t[f"{name}_tok_s"] / t["bare_tok_s"]
            verdicts.append(f"{label} {vs_trainer:.3f}x the Trainer ({'met' if vs_trainer >= PRETRAIN_TARGET_VS_TRAINER else 'NOT met'}), "
                            f"{vs_bare:.3f}x bare ({'met' if vs_bare >= PRETRAIN_TARGET_VS_BARE else 'NOT met'})")
        compiled_vs_compiled = t["trainrig_compiled_tok_s"] / t["hf_trainer_compiled_tok_s"]
        verdicts.append(f"compiled against compiled, `--torch_compile` {compiled_vs_compiled:.3f}x the Trainer's "
                        f"`torch_compile=True`")
        lines.append(f"- {t['preset']}: " + "; ".join(verdicts) + ".")
    peak = first["peak_flops"]
    lines += ["", f"MFU: model FLOP/s over the measured fp32 matmul peak ({peak / 1e9:,.1f} GFLOP/s, best of 10 2048x2048 products "
              "with the training's threads). Model FLOPs follow PaLM's appendix B: 6 per matmul weight per token (forward and "
              "backward; the input embedding is a lookup, the LM head counts), plus 12 x layers x hidden x block length for "
              "attention, causal masking not discounted: "
              + "; ".join(f"{t['preset']} {t['flops_per_token']['per_token'] / 1e6:,.1f}M per token "
                          f"(6 x {t['flops_per_token']['matmul_weights'] / 1e6:,.2f}M + {t['flops_per_token']['attention'] / 1e6:,.1f}M)"
                          for t in training)
              + ". What the tiny shapes leave of the peak goes to work that is not a large matmul: element-wise ops (what "
              "compiling fuses), the loss's softmax passes over the vocabulary (fewer with the chunked loss), the optimizer "
              "step, small matrices that do not fill the cores."]
    return lines
