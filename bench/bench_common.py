"""What every benchmark section shares: the repo root (put on sys.path, so that bench/*.py run
from a checkout without an install), the section names, the machine a result was measured on, the
per-section JSON results, child processes, the FLOP counts behind MFU, and the chat set and base
model that sections (a), (c) and (d) train or measure on."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTIONS = {"data": "(a)", "pretrain": "(b)", "sft": "(c)", "memory": "(d)", "gpu": "(e)", "qlora": "(f)", "dpo": "(g)"}  # results/<name>.json -> RESULTS.md section


def machine() -> dict:
    """The machine and the versions a result was measured with; a package the run did not need (a
    lent GPU image may lack deepspeed or datasets) reads "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            **{name: installed(name) for name in ("transformers", "accelerate", "deepspeed", "datasets", "tokenizers")}}


def load_results(results_dir: Path) -> dict[str, dict]:
    return {name: json.loads((results_dir / f"{name}.json").read_text())
            for name in SECTIONS if (results_dir / f"{name}.json").is_file()}


def save_result(results_dir: Path, name: str, info: dict, result) -> None:
    """One section's figures, written as soon as it finishes (an interrupted run keeps them)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, **(result if isinstance(result, dict) else {"runs": result})}
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")


def run_quietly(cmd: list[str]) -> None:
    """A child process from the repo root; its output is shown only if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """The machine's dense fp32 matmul rate with torch's threads as training uses them: the best of
    `repeats` n x n products (2 n^3 FLOPs each), after a warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(preset: str, tokenizer_dir, block_size: int) -> dict:
    """Training FLOPs per token (PaLM's appendix B convention): 6 per weight a token passes through
    in a matmul (the input embedding is a lookup and does not count; the LM head does, tied or not),
    plus attention's 12 x layers x hidden x sequence length (QK^T and AV, forward and backward,
    causal masking not discounted)."""
    import torch

    from trainers.config import PretrainModelConfig
    from trainers.models import build_model, load_tokenizer, resolve_model_config

    tokenizer = load_tokenizer(str(tokenizer_dir), False, "--tokenizer_name_or_path")
    model_cfg = PretrainModelConfig(model_preset=preset)
    config = resolve_model_config(model_cfg, block_size)
    with torch.device("meta"):
        model = build_model(model_cfg, config, tokenizer, "sdpa", 0)
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied head's weight is counted once, as the embedding's
    matmul_weights = total - embedding + head
    attention = 12 * config.num_hidden_layers * config.hidden_size * block_size
    return {"matmul_weights": matmul_weights, "attention": attention, "per_token": 6 * matmul_weights + attention}


def make_chat_set(path: Path, corpus: Path, tokenizer, n_samples: int, max_seq_length: int, seed: int) -> dict:
    """A length-skewed chat set, deterministic by seed: `{"messages": [user, assistant, ...]}`
    records (70% one exchange, 20% two, 10% three) whose ChatML token lengths are drawn from a
    log-normal (median max_seq_length / 5, sigma 0.8) truncated to [16, max_seq_length]. Contents
    are runs of words from the corpus. Every record fits max_seq_length, so no loop truncates."""
    import numpy as np

    from trainers.data.chat import render_chatml

    rng = np.random.default_rng(seed)
    words = " ".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()[:4000]).split()
    cost: dict[str, int] = {}  # tokens of " word" (byte-level BPE splits before every space)

    def length(messages) -> int:
        return len(tokenizer(render_chatml(messages)[0], add_special_tokens=False).input_ids)

    overhead = length([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])  # per exchange

    def take(budget: int) -> str:
        start, used, out = int(rng.integers(len(words))), 0, []
        while not out or used < budget:
            w = words[(start + len(out)) % len(words)]
            if w not in cost:
                cost[w] = len(tokenizer(" " + w, add_special_tokens=False).input_ids)
            used += cost[w]
            out.append(w)
        return " ".join(out)

    median, sigma = max_seq_length / 5, 0.8
    records = []
    while len(records) < n_samples:
        target = float(np.exp(rng.normal(np.log(median), sigma)))
        if not 16 <= target <= max_seq_length:
            continue  # truncated, not clipped: no spike of samples at either bound
        exchanges = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
        content = max(2 * exchanges, int(target) - exchanges * overhead)
        messages = []
        for share in rng.dirichlet(np.ones(exchanges)):
            budget = max(2, int(content * share))
            user = max(1, int(budget * rng.uniform(0.15, 0.45)))
            messages += [{"role": "user", "content": take(user)}, {"role": "assistant", "content": take(budget - user)}]
        records.append({"messages": messages})
    lengths = []
    for record in records:  # the exact rendered length; while over, shorten the longest turn (or drop an exchange)
        messages = record["messages"]
        while (n := length(messages)) > max_seq_length:
            turn = max((m for m in messages if " " in m["content"]), key=lambda m: len(m["content"]), default=None)
            if turn is None and len(messages) == 2:
                raise ValueError(f"max_seq_length {max_seq_length} is too short for a one-word exchange ({n} tokens)")
            if turn is None:
                del messages[-2:]
                continue
            words = turn["content"].split()
            turn["content"] = " ".join(words[:max(1, len(words) - max(1, (n - max_seq_length) // 2))])
        lengths.append(n)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    lengths = np.array(lengths)
    return {"samples": n_samples, "mean_tokens": float(lengths.mean()), "median_tokens": float(np.median(lengths)),
            "max_tokens": int(lengths.max()), "min_tokens": int(lengths.min()),
            "multi_turn": sum(len(r["messages"]) > 2 for r in records)}


def make_sft_model(corpus: Path, tokenizer_dir: Path, out: Path, preset: str, cache_dir: Path) -> Path:
    """The model to fine-tune: `launch/pretrain.py --max_steps 1` from the preset, run in this
    process (nothing here is timed, and it spares a child's imports); its out/final."""
    from launch.pretrain import main as pretrain

    logger = logging.getLogger("trainrig")
    level = logger.level  # the run sets INFO for itself; the caller's level comes back after it
    pretrain(["--train_files", str(corpus), "--tokenizer_name_or_path", str(tokenizer_dir), "--model_preset", preset,
              "--block_size", "256", "--max_steps", "1", "--output_dir", str(out), "--resume", "never",
              "--data_cache_dir", str(cache_dir), "--validation_split_ratio", "0"])
    logger.setLevel(level)
    return out / "final"
