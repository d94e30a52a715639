"""trainrig benchmarks, side by side with what users would run instead; writes bench/RESULTS.md.

    make bench                      # or: python bench/run.py --output bench/RESULTS.md [--repeats 3]

(a) data preparation: tokenize + pack a jsonl corpus into blocks, trainrig's `prepare_blocks`
    vs. HF run_clm's recipe (`datasets.load_dataset` -> `map(tokenize, num_proc)` -> `map(group_texts)`).
    Also chat rendering + assistant-only masking vs. `apply_chat_template` + offset-based masking.
(b) training step throughput: `launch/pretrain.py` vs. the HF `Trainer` and a bare hand-written
    PyTorch loop on the same model init, blocks, micro batch, optimizer and precision; model FLOP/s
    over the machine's measured matmul peak (CPU efficiency).
(c) SFT on a length-skewed chat set: `launch/sft.py` packed (default) and `--no-packing`
    (length-grouped) vs. TRL's `SFTTrainer` (its defaults, and its packing; bench/trl_sft.py) and
    pad-to-max (Qwen's classic `preprocess` + a bare PyTorch loop): non-pad share of the batches,
    trained (assistant) tokens/s, and the loss after equal steps; then, for a loss at equal data,
    every loop trains the same budget of assistant tokens (the padded ones taking ~4x the steps) and
    one evaluator scores each saved model on the same held-out conversations.
(d) the memory model: the planner's estimate for a run (plan.json `memory_gb`) against the run's
    measured peak (metrics.jsonl `peak_memory_gb`: the process's peak RSS on CPU, where the
    estimate includes the process's own libraries; `torch.cuda.max_memory_allocated` on a GPU,
    compared with the estimate less the CUDA context, which the allocator does not count).
(f) QLoRA: `launch/sft.py` with a 16-bit LoRA base, an NF4 base, and NF4 + 8-bit AdamW, beside TRL's
    `SFTTrainer` + PEFT with the same bases (BitsAndBytesConfig) and optimizers, on the 0.5b preset in
    bf16: trained tokens/s, peak RSS, and the planner's predicted peak (bench_qlora.py).
(g) DPO: `launch/dpo.py` (reference precomputed) beside TRL's `DPOTrainer` (resident reference) on
    the same pairs, model, micro batch and steps: pairs/s, peak RSS, held-out reward accuracy (bench_dpo.py).
Every figure in RESULTS.md comes from this script's measurements (medians of --repeats runs).

    python bench/run.py --only sft [--repeats 3]     # one section: data, pretrain, sft, memory, qlora or dpo
    python bench/run.py --only report                # re-render RESULTS.md from the JSONs, nothing measured

Results: each section writes its figures to results/<section>.json beside --output (data.json,
pretrain.json, sft.json, with the machine and date they were measured on) as soon as it finishes,
and RESULTS.md is then rendered from every JSON there. So `--only X` refreshes section X and keeps
the others' last measurements (each section states its own date), an interrupted run loses only the
section it was in, and the report never mixes hand-typed figures in. A section with no JSON yet
that the existing RESULTS.md has (measured before the JSONs existed) is carried over verbatim,
marked as carried over, until that section is run again.

Layout: this file is the command line; each section is a module beside it (bench_data.py (a),
bench_pretrain.py (b), bench_sft.py (c), bench_memory.py (d), bench_gpu.py (e), run by bench/gpu.py, bench_qlora.py (f), bench_dpo.py (g)),
with its measurements and its part of RESULTS.md; bench_report.py renders RESULTS.md from the
JSONs, and bench_common.py holds what they share.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, SECTIONS, load_results, machine, make_chat_set, matmul_peak_flops, save_result
from bench_data import bench_chat_masking, bench_data, bench_template_masking
from bench_dpo import bench_dpo
from bench_memory import bench_memory
from bench_pretrain import bare_loop_tokens_per_s, bench_training, hf_trainer_tokens_per_s
from bench_qlora import bench_qlora
from bench_report import write_report
from bench_sft import bare_sft_loop, bench_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--results_dir", default="", help="per-section JSON results (default: results/ beside --output)")
    parser.add_argument("--only", choices=("all", *SECTIONS, "report"), default="all",
                        help="run one section (the others keep their last results), or none: report re-renders RESULTS.md from the JSONs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=60000, help="documents in the synthetic corpus")
    parser.add_argument("--bare_loop", help=argparse.SUPPRESS)  # internal: one bare-loop measurement, JSON args
    parser.add_argument("--bare_sft", help=argparse.SUPPRESS)  # internal: one pad-to-max SFT measurement, JSON args
    parser.add_argument("--hf_trainer", help=argparse.SUPPRESS)  # internal: one HF Trainer measurement, JSON args
    parser.add_argument("--hf_trainer_compiled", help=argparse.SUPPRESS)  # internal: the same with torch_compile=True
    args = parser.parse_args()
    if args.bare_loop:
        corpus, tok, cache, preset, block, micro, steps, warmup, seed, lr = json.loads(args.bare_loop)
        print(bare_loop_tokens_per_s(Path(corpus), Path(tok), Path(cache), preset, int(block), int(micro), int(steps),
                                     int(warmup), int(seed), float(lr)))
        return
    if args.hf_trainer or args.hf_trainer_compiled:
        corpus, tok, cache, preset, block, micro, steps, warmup, seed, lr = json.loads(args.hf_trainer or args.hf_trainer_compiled)
        print(hf_trainer_tokens_per_s(Path(corpus), Path(tok), Path(cache), preset, int(block), int(micro), int(steps),
                                      int(warmup), int(seed), float(lr), torch_compile=bool(args.hf_trainer_compiled)))
        return
    if args.bare_sft:
        chat, model_dir, max_len, micro, steps, warmup, loss_steps, lr, seed = json.loads(args.bare_sft)
        print(json.dumps(bare_sft_loop(Path(chat), Path(model_dir), int(max_len), int(micro), int(steps), int(warmup),
                                       int(loss_steps), float(lr), int(seed))))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    output = Path(args.output)
    results_dir = Path(args.results_dir) if args.results_dir else output.parent / "results"
    run = set(SECTIONS) if args.only == "all" else {args.only}
    if args.only == "report":
        write_report(output, load_results(results_dir), results_dir)
        print(f"wrote {output} from {results_dir}")
        return
    if "gpu" in run:  # its own process, before this one touches CUDA; without a GPU it says so and writes nothing
        subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--output", str(output), "--results_dir", str(results_dir)], cwd=REPO,
                       check=True)  # a failed GPU run fails make bench
        run.discard("gpu")
        if not run:
            return

    logging.basicConfig(level=logging.WARNING)
    from trainers.data.synthetic import make_corpus
    from trainers.tokenizer import main as train_tokenizer
    from trainers.models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="trainrig-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, seed=11, n_docs=args.docs)
        train_tokenizer(["--train_files", str(corpus), "--vocab_size", "4096", "--output_dir", str(work / "tok")])
        tokenizer = load_tokenizer(str(work / "tok"), False, "--tokenizer_name_or_path")
        info = machine()
        if "data" in run:
            data = bench_data(corpus, tokenizer, 512, args.repeats, work)
            data["block_size"] = 512
            chat_set = work / "chat_masking.jsonl"
            make_chat_set(chat_set, corpus, tokenizer, 5000, 512, seed=3)
            data["chat"] = bench_chat_masking(chat_set, tokenizer, 512, args.repeats)
            print(f"(a) chat rendering + masking: trainrig {data['chat']['trainrig']['samples_s']:,.0f} samples/s, "
                  f"{data['chat']['ratio']:.2f}x apply_chat_template + offsets", flush=True)
            data["templates"] = bench_template_masking(chat_set, work / "tok", args.repeats)
            for case in ("qwen3_reasoning_tools", "llama3"):
                row = data["templates"][case]
                print(f"(a) {case}: trainrig {row['trainrig']['samples_s']:,.0f} samples/s, {row['ratio']:.2f}x HF's assistant mask, "
                      f"same labels: {row['same_labels']}", flush=True)
            print("(a) data:", {k: round(v["tok_s"]) for k, v in data.items() if isinstance(v, dict) and "tok_s" in v}, flush=True)
            save_result(results_dir, "data", info, data)
        if "pretrain" in run:
            training, peak = [], matmul_peak_flops()
            for preset, block, micro, steps, warmup in (("tiny", 256, 16, 60, 10), ("small", 256, 8, 24, 4)):
                result = bench_training(corpus, work / "tok", work, preset, block, micro, steps, warmup, args.repeats, peak)
                print(f"(b) {preset}: trainrig {result['trainrig_tok_s']:,.0f} tok/s vs Trainer {result['hf_trainer_tok_s']:,.0f} "
                      f"= {result['trainer_ratio']:.3f}, vs bare {result['bare_tok_s']:,.0f} = {result['ratio']:.3f}; "
                      f"MFU {result['mfu']['trainrig']:.1%} of {peak / 1e9:.1f} GFLOP/s", flush=True)
                training.append(result)
            save_result(results_dir, "pretrain", info, training)
        if "sft" in run:
            sft = bench_sft(corpus, work / "tok", work, repeats=args.repeats)
            trl = "".join(f", TRL {v} {sft['trl_' + v]['trained_tok_s']:,.0f}" for v in sft.get("trl_variants", ()))
            print(f"(c) sft: trained tok/s packed {sft['packed']['trained_tok_s']:,.0f}, no-packing {sft['grouped']['trained_tok_s']:,.0f}, "
                  f"pad-to-max {sft['pad_to_max']['trained_tok_s']:,.0f} = {sft['ratio']:.2f}x{trl}; non-pad packed "
                  f"{sft['packed']['non_pad']:.1%}", flush=True)
            save_result(results_dir, "sft", info, sft)
        if "memory" in run:
            cases = bench_memory(corpus, work / "tok", work)
            for c in cases:
                print(f"(d) {c['stage']} {c['preset']} micro {c['micro_batch']} x {c['length']}: predicted {c['predicted_gb']:.2f} GiB, "
                      f"measured {c['measured_gb']:.2f} GiB ({c['ratio']:.2f})", flush=True)
            save_result(results_dir, "memory", info, cases)
        if "qlora" in run:
            save_result(results_dir, "qlora", info, bench_qlora(corpus, work / "tok", work, repeats=args.repeats))
        if "dpo" in run:
            save_result(results_dir, "dpo", info, bench_dpo(corpus, work / "tok", work, repeats=args.repeats))
    write_report(output, load_results(results_dir), results_dir)
    print(f"wrote {output} from {results_dir}")


if __name__ == "__main__":
    main()
