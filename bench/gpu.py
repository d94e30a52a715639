"""(e) GPU: bf16 pretraining of the 125m and 0.5b Qwen2 shapes at the micro batch the planner picks,
and packed SFT under FlashAttention against SDPA.

    python bench/gpu.py [--output bench/RESULTS.md] [--presets 125m,0.5b] [--steps 60] [--warmup 10] [--block_size 2048]

For each preset, `launch/pretrain.py` runs as a user runs it (its own process, `--precision bf16`,
`--per_device_train_batch_size auto`, everything else the trainer's defaults: the planner also decides
strategy and checkpointing) on a corpus and tokenizer made here, since a lent GPU machine reaches no
hub. Measured:
- tokens/s (the run's metrics.jsonl, warmup window excluded); MFU, model FLOPs/token (bench_common.py's
  `flops_per_token`) x tokens/s, over a bf16 matmul peak measured on the same GPU and over the
  sheet's (target >= 40% of the measured peak for 0.5b on an H100);
- memory: the planner's whole estimate in plan.json against the device memory in use at the run's
  peak (the CUDA context included, so the assumed 1 GiB overhead term is measured, not subtracted),
  and the other terms against `torch.cuda.max_memory_allocated` (target within +-10%);
- the planned micro batch against the largest that runs: 2-step runs of the same setup at micro
  batches 10% apart above it, up to --search_limit x the plan, until one runs out of memory (target
  planned >= 90% of the largest);
- FlashAttention (where flash-attn passes trainers/attention.py's probe): packed SFT rows through
  flash-attn in trainrig's flat layout, each sample's logits against the sample alone through SDPA,
  at micro 1, 2 and 8, with the first preset's trained model;
- with --qlora qwen2.5-7b,qwen2.5-14b: QLoRA SFT (`--lora_r 16 --load_in_4bit`, the planner's micro batch)
  of a random-weight model of each shape, its tokens/s and its memory against the plan.

The figures go to results/gpu.json beside --output (bench/run.py's format), and --output is
re-rendered from every JSON there with bench_report.py's `write_report`. Without a CUDA GPU the script
says so in one line and exits 0, writing nothing.

    python bench/gpu.py --device cpu --presets tiny --steps 3 --warmup 1 --block_size 16 \\
        --vocab_size 1024 --docs 200 --search_limit 1.1 --output /tmp/gpu-smoke/RESULTS.md

is a smoke run of the same pipeline on CPU (fp32; memory compared as bench/run.py does on CPU: the
whole estimate against the peak RSS; the FlashAttention check skipped); its figures are not GPU
figures, so it needs its own --output.

The corpus is trainers/data/synthetic.py's `make_zipf_corpus`; the section's code and its part of
RESULTS.md are in bench_gpu.py, this file is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, load_results, machine, save_result  # noqa: E402
from bench_gpu import QWEN_VOCAB_ROWS, SEARCH_LIMIT, bench_gpu, render_gpu  # noqa: E402
from bench_report import write_report  # noqa: E402

DEFAULT_OUTPUT = REPO / "bench" / "RESULTS.md"


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="RESULTS.md to re-render; results/gpu.json goes beside it")
    parser.add_argument("--results_dir", default="", help="per-section JSON results (default: results/ beside --output)")
    parser.add_argument("--presets", default="125m,0.5b", help="comma-separated model presets (configs/models/)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run, the warmup included")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of tokens/s (also the logging interval)")
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--vocab_size", type=int, default=QWEN_VOCAB_ROWS, help="tokenizer size to train (default: Qwen2.5's rows)")
    parser.add_argument("--docs", type=int, default=10000, help="documents in the synthetic corpus")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the CUDA GPU, or skip without one; cpu: a smoke run of the pipeline (needs its own --output)")
    parser.add_argument("--search_limit", type=float, default=SEARCH_LIMIT,
                        help="micro batches are tried above the planned one up to this multiple of it")
    parser.add_argument("--qlora", default="", help="comma-separated shipped shapes (configs/models/, e.g. qwen2.5-7b,qwen2.5-14b) "
                        "to run QLoRA SFT on, random weights, after the pretraining runs (default: none)")
    parser.add_argument("--qlora_steps", type=int, default=6, help="optimizer steps per QLoRA run, the first third the warmup")
    parser.add_argument("--workdir", default="", help="keep corpus, tokenizer and runs here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.qlora = tuple(p.strip() for p in args.qlora.split(",") if p.strip())
    bad = [p for p in args.qlora if not (REPO / "configs" / "models" / f"{p}.json").is_file()]
    if bad:
        parser.error(f"--qlora {','.join(bad)}: not a shape in configs/models/; pass e.g. qwen2.5-7b,qwen2.5-14b")
    if args.qlora and args.qlora_steps < 3:
        parser.error(f"--qlora_steps {args.qlora_steps}: tokens/s needs a window after the warmup; pass at least 3")
    unknown = [p for p in args.presets if not (REPO / "configs" / "models" / f"{p}.json").is_file()]
    if unknown or not args.presets:
        known = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.json"))
        parser.error(f"--presets {','.join(unknown) or '(empty)'}: not a preset; pass names from configs/models/: {', '.join(known)}")
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: tokens/s needs a window after the warmup; "
                     f"pass --warmup >= 1 and --steps at least 2 x --warmup (e.g. --steps {2 * max(args.warmup, 1)})")
    if args.device == "cpu" and Path(args.output).resolve() == DEFAULT_OUTPUT:
        parser.error("--device cpu is a smoke run whose figures are not GPU figures; pass --output elsewhere "
                     "(e.g. --output /tmp/gpu-smoke/RESULTS.md) so bench/results/gpu.json is not overwritten")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process and the runs it starts
    import torch

    on_gpu = torch.cuda.is_available()  # a device count only: no CUDA context in this process yet
    if args.device == "auto" and not on_gpu:
        print("bench/gpu.py: no CUDA GPU is visible, so the GPU section (e) is skipped (nothing written)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    output = Path(args.output)
    results_dir = Path(args.results_dir) if args.results_dir else output.parent / "results"
    with tempfile.TemporaryDirectory(prefix="trainrig-bench-gpu-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = bench_gpu(args.presets, args.block_size, args.steps, args.warmup, args.vocab_size, args.docs, work, on_gpu,
                           args.search_limit, args.qlora, args.qlora_steps)
    result["seconds"] = round(time.perf_counter() - started, 1)
    save_result(results_dir, "gpu", machine(), result)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_report(output, load_results(results_dir), results_dir)
    print("\n".join(render_gpu(json.loads((results_dir / "gpu.json").read_text()))))
    print(f"wrote {results_dir / 'gpu.json'} and {output}")
    failed = [r["preset"] for r in result["runs"] if "error" in r]
    if failed:
        print(f"bench/gpu.py: the run of {', '.join(failed)} failed (its error is in the table above)", file=sys.stderr)
    if result["flash"].get("flat_ok") is False:
        print("bench/gpu.py: packed SFT under FlashAttention differs from SDPA per sample (see the FlashAttention check)", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
