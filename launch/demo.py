"""The embedded end-to-end demo (`make demo` / `trainrig demo`): synthetic data
(trainers/data/synthetic.py: fictional people, deterministic by seed), then tokenizer -> pretrain
a tiny Qwen2 from scratch -> evaluate -> LoRA SFT -> evaluate -> reward model -> LoRA DPO -> evaluate -> report
(report.json, summary.md, loss.png). The held-out questions ask about people whose facts are only
in the pretraining corpus.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainers.config import opt

from trainers.data.synthetic import QUESTIONS, make_chat, make_corpus, make_preference_pairs

log = logging.getLogger("trainrig.demo")


@dataclass
class DemoArgs:
    output_dir: str = opt("outputs/demo", "Where the demo writes its data, tokenizer, runs, evaluations and report.")
    seed: int = opt(1234, "Seed for the synthetic data and the training runs.")
    max_steps: int = opt(500, "Pretraining steps (500 x 16 blocks x 128 tokens: about one pass over the corpus, ~3 minutes on 2 CPU cores).")
    sft_steps: int = opt(150, "LoRA SFT steps on the embedded chat data.")
    reward_steps: int = opt(300, "Reward-model steps on the embedded preference pairs, 4 epochs of 1,200 (0: skip the reward model).")
    dpo_steps: int = opt(150, "LoRA DPO steps from the SFT model on the same preference pairs, 2 epochs of 1,200 (0: skip DPO).")
    model_preset: str = opt("tiny", "Model shape from configs/models/.")


@dataclass
class DemoConfig:
    """The embedded end-to-end demo: synthetic data -> tokenizer -> pretraining -> evaluation ->
    LoRA SFT -> evaluation -> reward model -> LoRA DPO -> evaluation -> report."""

    demo: DemoArgs = field(default_factory=DemoArgs)


def plot_runs(runs: dict[str, Path], out_png: Path) -> None:
    """One panel per run: its training loss (and eval loss) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers.tracking import read_metrics

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), dpi=110, squeeze=False)
    for ax, (name, metrics) in zip(axes[0], runs.items()):
        records = read_metrics(metrics)
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train", lw=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval", lw=1.2, ms=4)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def summary_markdown(report: dict, out: Path) -> str:
    t = report["timings_s"]
    lines = [
        "# trainrig demo", "",
        f"A {report['pretrain']['parameters'] / 1e6:.2f}M-parameter Qwen2 model pretrained from scratch on a synthetic corpus of facts, "
        f"then fine-tuned with LoRA on chat Q&A about {report['chat_data']['people_seen']} of the people. "
        f"The held-out questions ask about the other {report['chat_data']['held_out'] // len(QUESTIONS)}: "
        "their answers are in the pretraining corpus and never in the SFT data.", "",
        "| held-out questions | EM | F1 |", "|---|---|---|",
        f"| before SFT (base model, same chat prompt) | {report['em_before_sft']:.3f} | {report['f1_before_sft']:.3f} |",
        f"| after SFT | {report['em_after_sft']:.3f} | {report['f1_after_sft']:.3f} |",
        *([f"| after SFT + DPO | {report['dpo']['em_after']:.3f} | {report['dpo']['f1_after']:.3f} |"] if report.get("dpo") else []), "",
        f"n = {report['n']} questions. " + (f"Reward model: pair accuracy {report['reward']['eval_accuracy']:.3f} on "
                                            f"{report['reward']['eval_pairs']} held-out pairs (the true fact vs. a wrong one, combinations never trained on)."
                                            if report.get("reward") else ""), "",
        *([f"DPO ({report['dpo']['step']} LoRA steps from the SFT model): on {report['dpo']['eval_pairs']} held-out pairs the policy finds the "
           f"true fact more likely than the wrong one in {report['dpo']['pair_accuracy_after']:.3f} of them "
           f"(the SFT model: {report['dpo']['pair_accuracy_before']:.3f}); its implicit reward ranks them right in "
           f"{report['dpo']['reward_accuracy_after']:.3f} (0 before: the policy starts as its own reference), "
           f"mean margin {report['dpo']['reward_margin_after']:.3f}. Held-out EM changes by {report['dpo']['em_change']:+.3f}.", ""]
          if report.get("dpo") else []),
        "| stage | seconds |", "|---|---|", *(f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in t.items()), "",
        "![losses](loss.png)", "", "Examples after SFT:", "",
        *(f"- {p['question']} -> {p['prediction']} ({'right' if p['em'] else 'expected: ' + p['references'][0]})"
          for p in report["examples"]),
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def run_demo(args: DemoArgs) -> dict:
    from launch import dpo as dpo_entry
    from launch import evaluate as evaluate_entry
    from launch import pretrain as pretrain_entry
    from launch import reward as reward_entry
    from launch import sft as sft_entry
    from trainers import tokenizer as tokenizer_entry

    out = Path(args.output_dir)
    data, cache = out / "data", out / "cache"
    timings = {}
    start = time.perf_counter()
    corpus = data / "corpus.jsonl"
    make_corpus(corpus, args.seed)
    chat = make_chat(data, args.seed)
    pairs = make_preference_pairs(data, args.seed)
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    tokenizer_entry.main(["--train_files", str(corpus), "--vocab_size", "1024", "--min_frequency", "2",
                          "--output_dir", str(out / "tokenizer")])
    timings["tokenizer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = out / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts fresh every time
    summary = pretrain_entry.main([
        "--train_files", str(corpus), "--tokenizer_name_or_path", str(out / "tokenizer"),
        "--model_preset", args.model_preset, "--block_size", "128", "--per_device_train_batch_size", "16",
        "--learning_rate", "4e-3", "--warmup_steps", "30", "--weight_decay", "0", "--max_steps", str(args.max_steps),
        "--logging_steps", "50", "--eval_steps", "250", "--save_steps", "250", "--save_total_limit", "1",
        "--seed", str(args.seed), "--output_dir", str(run_dir), "--resume", "never", "--data_cache_dir", str(cache),
    ])
    timings["pretrain_s"] = time.perf_counter() - t

    def evaluate(model_dir: Path, name: str) -> dict:
        return evaluate_entry.main(["--model_name_or_path", str(model_dir), "--eval_files", str(data / "heldout.jsonl"),
                                    "--max_new_tokens", "24", "--batch_size", "32", "--output_dir", str(out / name)])

    t = time.perf_counter()
    before = evaluate(run_dir / "final", "eval_before_sft")
    timings["eval_before_sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_dir = out / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft_summary = sft_entry.main([
        "--train_files", str(data / "sft.jsonl"), "--model_name_or_path", str(run_dir / "final"),
        "--lora_r", "16", "--lora_alpha", "32", "--merge_lora", "--max_seq_length", "128",
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "10",
        "--max_steps", str(args.sft_steps), "--logging_steps", "25", "--seed", str(args.seed),
        "--output_dir", str(sft_dir), "--resume", "never", "--data_cache_dir", str(cache),
    ])
    timings["sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(sft_dir / "final" / "merged", "eval_after_sft")
    timings["eval_after_sft_s"] = time.perf_counter() - t

    runs = {"pretraining": run_dir / "metrics.jsonl", "LoRA SFT": sft_dir / "metrics.jsonl"}
    reward_summary = None
    if args.reward_steps > 0:
        t = time.perf_counter()
        reward_dir = out / "reward"
        shutil.rmtree(reward_dir, ignore_errors=True)
        reward_summary = reward_entry.main([
            "--model_name_or_path", str(sft_dir / "final" / "merged"), "--train_files", str(data / "pairs.jsonl"),
            "--validation_files", str(data / "pairs_heldout.jsonl"), "--max_seq_length", "128",
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--warmup_steps", "10",
            "--max_steps", str(args.reward_steps), "--logging_steps", "10", "--seed", str(args.seed),
            "--output_dir", str(reward_dir), "--resume", "never",
        ])
        timings["reward_s"] = time.perf_counter() - t
        runs["reward model"] = reward_dir / "metrics.jsonl"
    dpo_summary, after_dpo = None, None
    if args.dpo_steps > 0:
        t = time.perf_counter()
        dpo_dir = out / "dpo"
        shutil.rmtree(dpo_dir, ignore_errors=True)
        dpo_summary = dpo_entry.main([
            "--model_name_or_path", str(sft_dir / "final" / "merged"), "--train_files", str(data / "pairs.jsonl"),
            "--validation_files", str(data / "pairs_heldout.jsonl"), "--max_seq_length", "128",
            "--lora_r", "16", "--lora_alpha", "32", "--merge_lora", "--beta", "0.1",
            "--per_device_train_batch_size", "16", "--learning_rate", "5e-4", "--warmup_steps", "10",
            "--max_steps", str(args.dpo_steps), "--logging_steps", "10", "--seed", str(args.seed),
            "--output_dir", str(dpo_dir), "--resume", "never", "--data_cache_dir", str(cache),
        ])
        timings["dpo_s"] = time.perf_counter() - t
        runs["LoRA DPO"] = dpo_dir / "metrics.jsonl"
        t = time.perf_counter()
        after_dpo = evaluate(dpo_dir / "final" / "merged", "eval_after_dpo")
        timings["eval_after_dpo_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    examples = [json.loads(line) for line in (out / "eval_after_sft" / "predictions.jsonl").read_text().splitlines()[:6]]
    report = {
        "em_before_sft": before["em"], "f1_before_sft": before["f1"], "em_after_sft": after["em"], "f1_after_sft": after["f1"],
        "n": after["n"], "reward": reward_summary, "pretrain": summary, "sft": sft_summary, "chat_data": chat,
        "dpo": dpo_summary and {
            "step": dpo_summary["step"], "eval_pairs": dpo_summary["eval_pairs"],
            "pair_accuracy_before": dpo_summary["reference"]["eval_logps/accuracy"],
            "pair_accuracy_after": dpo_summary["eval_logps/accuracy"],
            "reward_accuracy_after": dpo_summary["eval_rewards/accuracy"], "reward_margin_after": dpo_summary["eval_rewards/margin"],
            "em_after": after_dpo["em"], "f1_after": after_dpo["f1"], "em_change": round(after_dpo["em"] - after["em"], 6)},
        "preference_pairs": pairs, "timings_s": {k: round(v, 1) for k, v in timings.items()}, "examples": examples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_runs(runs, out / "loss.png")
    print("\n" + summary_markdown(report, out))
    print(f"report: {out / 'report.json'}, {out / 'summary.md'}, {out / 'loss.png'}")
    return report
