"""trainrig benchmarks, side by side with what users would run instead; writes bench/RESULTS.md.

    make bench                      # or: python bench/run.py --output bench/RESULTS.md [--repeats 3]

(a) data preparation: tokenize + pack a jsonl corpus into blocks, trainrig's `prepare_blocks`
    vs. HF run_clm's recipe (`datasets.load_dataset` -> `map(tokenize, num_proc)` -> `map(group_texts)`).
(b) training step throughput: `launch/pretrain.py` vs. a bare hand-written PyTorch loop on the
    same model init, blocks, micro batch, optimizer and precision.
Every figure in RESULTS.md comes from this script's measurements (medians of --repeats runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import accelerate
    import datasets
    import deepspeed
    import tokenizers
    import torch
    import transformers

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
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "deepspeed": deepspeed.__version__, "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


# ------------------------------------------------------------------------------- (a) data


def bench_data(corpus: Path, tokenizer, block_size: int, repeats: int, workdir: Path) -> dict:
    import datasets

    from trainers.data.packing import prepare_blocks

    def trainrig_once(i):
        start = time.perf_counter()
        blocks = prepare_blocks([str(corpus)], "--train_files", tokenizer, block_size, "text",
                                str(workdir / f"trainrig_cache_{i}"), 1000, build=True)
        return time.perf_counter() - start, blocks.meta["tokens"], len(blocks)

    def run_clm_once(i, num_proc):
        start = time.perf_counter()
        raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(workdir / f"hf_cache_{i}"))

        def tokenize(batch):
            return tokenizer(batch["text"])

        def group_texts(examples):  # run_clm's semantics: concatenate, drop the remainder, chunk
            concatenated = {k: list(chain(*examples[k])) for k in examples}
            total = (len(concatenated["input_ids"]) // block_size) * block_size
            result = {k: [t[j:j + block_size] for j in range(0, total, block_size)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
        grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
        return time.perf_counter() - start, sum(len(x) for x in tokenized["input_ids"]), len(grouped)

    def tokenizer_alone_once():
        """The ceiling: the same tokenizer calls trainrig makes, on texts already in memory,
        with nothing read, packed or written."""
        from trainers.data.packing import encode_joined

        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        start = time.perf_counter()
        n = sum(len(encode_joined(tokenizer.backend_tokenizer, texts[i:i + 1000], tokenizer.eos_token))
                for i in range(0, len(texts), 1000))
        return time.perf_counter() - start, n, 0

    # datasets sets TOKENIZERS_PARALLELISM=false in this process before it forks (num_proc), which
    # would leave every later tokenizer call on one core: run_clm goes last, and the variable is restored
    rows = {"trainrig": [trainrig_once(i) for i in range(repeats)],
            "tokenizer_alone": [tokenizer_alone_once() for _ in range(repeats)]}
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    rows["run_clm_default"] = [run_clm_once(f"d{i}", None) for i in range(repeats)]
    rows["run_clm_num_proc"] = [run_clm_once(f"p{i}", os.cpu_count()) for i in range(repeats)]
    if parallelism is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    result = {"repeats": repeats, "tokens": rows["trainrig"][0][1]}
    for name, runs in rows.items():
        seconds = statistics.median(t for t, _, _ in runs)
        result[name] = {"s": seconds, "tok_s": runs[0][1] / seconds, "blocks": runs[0][2]}
    return result


# --------------------------------------------------------------------------- (b) training


def bare_loop_tokens_per_s(corpus, tokenizer_dir, cache_dir, preset, block_size, micro, steps, warmup, seed, lr) -> float:
    """The hand-written loop a user would write: same blocks, same init, same fused AdamW."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from trainers.config import OptimConfig, PretrainModelConfig
    from trainers.data.collate import collate_blocks
    from trainers.data.packing import prepare_blocks
    from trainers.models import build_model, load_tokenizer, resolve_model_config
    from trainers.optim import build_optimizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(tokenizer_dir), False, "--tokenizer_name_or_path")
    blocks = prepare_blocks([str(corpus)], "--train_files", tokenizer, block_size, "text", str(cache_dir), 1000, build=True)
    model_cfg = PretrainModelConfig(model_preset=preset)
    model = build_model(model_cfg, resolve_model_config(model_cfg, block_size), tokenizer, "sdpa", seed)
    optimizer = build_optimizer(model, OptimConfig(learning_rate=lr), torch.device("cpu"))
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


def trainrig_tokens_per_s(corpus, tokenizer_dir, cache_dir, preset, block_size, micro, steps, warmup, seed, lr, out) -> float:
    """`python launch/pretrain.py` as a user runs it, in its own process; its own tokens_per_sec."""
    argv = ["--train_files", str(corpus), "--tokenizer_name_or_path", str(tokenizer_dir), "--model_preset", preset,
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
    out = subprocess.run([sys.executable, __file__, "--bare_loop", json.dumps([str(a) for a in args])], check=True,
                         cwd=REPO, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_training(corpus, tokenizer_dir, workdir, preset, block_size, micro, steps, warmup, repeats) -> dict:
    cache = workdir / "train_cache"
    ours, bare = [], []
    for i in range(repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_tokens_per_s_in_process(corpus, tokenizer_dir, cache, preset, block_size, micro, steps, warmup, 0, 1e-3))
        ours.append(trainrig_tokens_per_s(corpus, tokenizer_dir, cache, preset, block_size, micro, steps, warmup, 0, 1e-3,
                                          workdir / f"run_{preset}_{i}"))
    return {"preset": preset, "block_size": block_size, "micro_batch": micro, "steps": steps, "warmup": warmup,
            "trainrig_tok_s": statistics.median(ours), "bare_tok_s": statistics.median(bare),
            "ratio": statistics.median(ours) / statistics.median(bare), "repeats": repeats,
            "trainrig_all": [round(x) for x in ours], "bare_all": [round(x) for x in bare]}


# -------------------------------------------------------------------------------- report


def write_report(path: Path, info: dict, data: dict, training: list[dict]) -> None:
    lines = [
        "# trainrig benchmarks",
        "",
        f"Generated by `make bench` (`bench/run.py`) on {info['date']}. Do not edit by hand.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}. Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, accelerate {info['accelerate']}, deepspeed {info['deepspeed']}, "
        f"datasets {info['datasets']}, tokenizers {info['tokenizers']}.",
        "",
        f"## (a) Tokenize + pack into {data['block_size']}-token blocks, jsonl file to blocks (median of {data['repeats']})",
        "",
        "| pipeline | seconds | tokens/s | trainrig's speed-up | blocks |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"trainrig": "trainrig `prepare_blocks` (pyarrow jsonl reader, Rust batch encode, numpy packing, Arrow cache)",
              "run_clm_default": "run_clm as shipped: `load_dataset` + `map(tokenize)` + `map(group_texts)`",
              "run_clm_num_proc": f"run_clm with `--preprocessing_num_workers {info['cores']}`",
              "tokenizer_alone": "ceiling: trainrig's tokenizer calls alone, texts already in memory (no reading, packing or writing)"}
    ours = data["trainrig"]["tok_s"]
    for key, label in labels.items():
        row = data[key]
        blocks = f"{row['blocks']:,}" if row["blocks"] else "-"
        lines.append(f"| {label} | {row['s']:.2f} | {row['tok_s']:,.0f} | {ours / row['tok_s']:.2f}x | {blocks} |")
    best_clm = max(data["run_clm_default"]["tok_s"], data["run_clm_num_proc"]["tok_s"])
    verdict = "met" if ours / best_clm >= 3 else "NOT met"
    lines += [
        "",
        f"Target >= 3x over run_clm: **{verdict}** ({ours / best_clm:.2f}x over its faster variant). Corpus: {data['tokens']:,} tokens. "
        f"trainrig runs at {ours / data['tokenizer_alone']['tok_s']:.0%} of the tokenizer's own speed on this machine, so "
        "what is left is BPE time in the Rust tokenizer, which both pipelines pay; the margin over run_clm is run_clm's "
        "work outside the tokenizer (Arrow round trips, Python lists in group_texts). trainrig appends EOS after every "
        "document and drops only the corpus's final tail; run_clm drops a tail per 1000-document map batch, hence the block counts.",
        "",
        "## (b) Pretraining step throughput, 1 process, fp32, fused AdamW",
        "",
        "| model | block x micro | steps (warmup excluded) | trainrig tokens/s | bare PyTorch loop tokens/s | ratio (target >= 0.97) | runs (trainrig / bare) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for t in training:
        lines.append(f"| {t['preset']} | {t['block_size']} x {t['micro_batch']} | {t['steps']} ({t['warmup']}) | {t['trainrig_tok_s']:,.0f} | {t['bare_tok_s']:,.0f} | "
                     f"**{t['ratio']:.3f}** | {t['trainrig_all']} / {t['bare_all']} |")
    lines += ["", f"Medians of {training[0]['repeats']} runs, the two loops interleaved, the warmup steps excluded. trainrig's figure is its own `tokens_per_sec` "
              "(time inside training steps, data loading included); the bare loop is timed over the same steps. Each run is "
              "its own process (`python launch/pretrain.py`, and the bare loop alike).", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=60000, help="documents in the synthetic corpus")
    parser.add_argument("--bare_loop", help=argparse.SUPPRESS)  # internal: one bare-loop measurement, JSON args
    args = parser.parse_args()
    if args.bare_loop:
        corpus, tok, cache, preset, block, micro, steps, warmup, seed, lr = json.loads(args.bare_loop)
        print(bare_loop_tokens_per_s(Path(corpus), Path(tok), Path(cache), preset, int(block), int(micro), int(steps),
                                     int(warmup), int(seed), float(lr)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from launch.demo import make_corpus
    from tokenizer.train import main as train_tokenizer
    from trainers.models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="trainrig-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, seed=11, n_docs=args.docs)
        train_tokenizer(["--train_files", str(corpus), "--vocab_size", "4096", "--output_dir", str(work / "tok")])
        tokenizer = load_tokenizer(str(work / "tok"), False, "--tokenizer_name_or_path")
        info = machine()
        data = bench_data(corpus, tokenizer, 512, args.repeats, work)
        data["block_size"] = 512
        print("(a) data:", {k: round(v["tok_s"]) for k, v in data.items() if isinstance(v, dict)}, flush=True)
        training = []
        for preset, block, micro, steps, warmup in (("tiny", 256, 16, 60, 10), ("small", 256, 8, 24, 4)):
            result = bench_training(corpus, work / "tok", work, preset, block, micro, steps, warmup, args.repeats)
            print(f"(b) {preset}: trainrig {result['trainrig_tok_s']:,.0f} tok/s vs bare {result['bare_tok_s']:,.0f} = {result['ratio']:.3f}", flush=True)
            training.append(result)
        write_report(Path(args.output), info, data, training)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
