"""(d) the memory model: the planner's estimate for a run (plan.json `memory_gb`) against the run's
measured peak (metrics.jsonl `peak_memory_gb`); and the section's rendering for RESULTS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_common import REPO, make_chat_set, make_sft_model, run_quietly


MEMORY_CASES = (  # (stage, preset, tokens per sequence, micro batch, gradient checkpointing, LoRA rank)
    ("pretrain", "small", 1024, 8, False, 0),
    ("pretrain", "small", 512, 16, True, 0),
    ("pretrain", "125m", 256, 16, False, 0),
    ("sft", "small", 512, 8, False, 16),
)


def measure_memory(case, corpus, tokenizer_dir, chat, model_dir, cache, out) -> dict:
    """One case as a user runs it (its own process, 3 steps); the plan's estimate and the peak."""
    stage, preset, length, micro, checkpointing, lora_r = case
    common = ["--max_steps", "3", "--logging_steps", "1", "--output_dir", str(out), "--resume", "never", "--no-save_final",
              "--per_device_train_batch_size", str(micro), "--validation_split_ratio", "0", "--data_cache_dir", str(cache),
              "--gradient_checkpointing" if checkpointing else "--no-gradient_checkpointing"]
    if stage == "pretrain":
        argv = [str(REPO / "launch" / "pretrain.py"), "--train_files", str(corpus), "--tokenizer_name_or_path", str(tokenizer_dir),
                "--model_preset", preset, "--block_size", str(length), *common]
    else:
        argv = [str(REPO / "launch" / "sft.py"), "--train_files", str(chat), "--model_name_or_path", str(model_dir),
                "--max_seq_length", str(length), "--lora_r", str(lora_r), *common]
    run_quietly([sys.executable, *argv])
    plan = json.loads((out / "plan.json").read_text())
    peak = max(r.get("peak_memory_gb", 0.0) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    terms = plan["memory_gb"]
    on_gpu = plan["hardware"]["device"] != "cpu"
    predicted = terms["total"] - terms["overhead"] if on_gpu else terms["total"]
    return {"stage": stage, "preset": preset, "length": length, "micro_batch": micro, "checkpointing": checkpointing,
            "lora_r": lora_r, "device": plan["hardware"]["device"], "precision": plan["precision"], "terms": terms,
            "predicted_gb": round(predicted, 3), "measured_gb": round(peak, 3), "ratio": round(predicted / peak, 3)}


def bench_memory(corpus, tokenizer_dir, workdir) -> list[dict]:
    from trainers.models import load_tokenizer

    corpus, tokenizer_dir, workdir = (Path(p).resolve() for p in (corpus, tokenizer_dir, workdir))
    cache = workdir / "memory_cache"
    model_dir = make_sft_model(corpus, tokenizer_dir, workdir / "memory_sft_base", "small", cache)
    chat = workdir / "memory_chat.jsonl"
    make_chat_set(chat, corpus, load_tokenizer(str(model_dir), False, "--model_name_or_path"), 1000, 512, seed=7)
    return [measure_memory(case, corpus, tokenizer_dir, chat, model_dir, cache, workdir / f"memory_{i}")
            for i, case in enumerate(MEMORY_CASES)]


def render_memory(cases: list[dict]) -> list[str]:
    device = cases[0]["device"]
    measured = "peak RSS of the process" if device == "cpu" else "torch.cuda.max_memory_allocated"
    predicted = "the whole estimate" if device == "cpu" else "the estimate less the CUDA context"
    lines = [f"## (d) Memory model vs. measured peak, {device}, {cases[0]['precision']}", "",
             "| run | micro x tokens | estimate: params / grads / optimizer / activations / logits / overhead (GiB) | "
             "predicted (GiB) | measured (GiB) | predicted / measured |", "|---|---|---|---:|---:|---:|"]
    for c in cases:
        t = c["terms"]
        name = f"{c['stage']} {c['preset']}" + (" + checkpointing" if c["checkpointing"] else "") + (f" LoRA r{c['lora_r']}" if c["lora_r"] else "")
        lines.append(f"| {name} | {c['micro_batch']} x {c['length']} | {t['parameters']:.2f} / {t['gradients']:.2f} / {t['optimizer_states']:.2f} / "
                     f"{t['activations']:.2f} / {t['logits']:.2f} / {t['overhead']:.2f} | {c['predicted_gb']:.2f} | {c['measured_gb']:.2f} | "
                     f"**{c['ratio']:.2f}** |")
    lines += ["", f"Predicted is {predicted} (launch/planner/memory.py, as written to the run's plan.json); measured is the run's "
              f"`peak_memory_gb` ({measured}) over 3 steps. On CPU the peak RSS also holds what glibc's allocator keeps "
              "after frees and the data pipeline's pages, which the model does not itemise; the planner keeps a 10% margin. "
              "The GPU figures (the planner's real target) need a GPU run of this section."]
    return lines
