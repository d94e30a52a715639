"""(g) DPO on CPU: `launch/dpo.py` (reference log-probs precomputed, no reference model held) beside
TRL's `DPOTrainer` as shipped (a resident reference model, bench/trl_dpo.py), on the same pairs,
model, micro batch, steps, lr, beta 0.1 and precision (fp32); and the section's rendering.

Measured per run, each in its own process: pairs/s over the timed steps (after `warmup`), the
process's peak RSS (VmHWM, loading included), and the held-out reward accuracy after the run (the
share of held-out pairs whose chosen answer's implicit reward is higher), all after the same number
of pairs. trainrig's one pass that computes the reference log-probs runs before its first step;
its seconds are reported beside the rate, and a rate over the whole run that includes them.

The pairs are the demo's kind (trainers/data/synthetic.py: a true fact against the same sentence
with a wrong value, 1,200 training and 150 held-out), the model the small preset (11M parameters
with the bench's 4,096-token vocabulary) after one pretraining step, as section (c)'s.

Targets (the issue's): pairs/s >= 1.5x TRL's and peak <= TRL's, at the same micro batch.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench_common import REPO, make_sft_model, run_quietly

DPO_PRESET = "small"
DPO_LR = 1e-4  # full training of a barely trained model: enough for the reward accuracy to move in 40 steps
DPO_BETA = 0.1


def trainrig_dpo(pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, seed, out, cache_dir) -> dict:
    """`python launch/dpo.py` as a user runs it, in its own process; the rates are the deltas between
    the metrics lines at steps `warmup` and `steps`."""
    argv = ["--train_files", str(pairs), "--validation_files", str(heldout), "--model_name_or_path", str(model_dir),
            "--max_seq_length", str(max_len), "--per_device_train_batch_size", str(micro), "--max_steps", str(steps),
            "--logging_steps", str(warmup), "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
            "--beta", str(DPO_BETA), "--seed", str(seed), "--output_dir", str(out), "--resume", "never", "--precision", "fp32",
            "--data_cache_dir", str(cache_dir), "--adam_beta2", "0.95", "--weight_decay", "0"]
    run_quietly([sys.executable, str(REPO / "launch" / "dpo.py"), *argv])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "pairs" in r]
    first, last = (next(r for r in timed if r["step"] == at) for at in (warmup, steps))
    seconds = last["elapsed_s"] - first["elapsed_s"]
    summary = json.loads((out / "summary.json").read_text())
    reference_s = sum(v["seconds"] for k, v in summary["reference"].items() if isinstance(v, dict) and "seconds" in v)
    return {"pairs_s": (last["pairs"] - first["pairs"]) / seconds, "seconds": seconds, "loss": last["loss"],
            "reference_s": reference_s, "reference_cached": summary["reference"]["train"]["cached"],
            "whole_pairs_s": last["pairs"] / (last["elapsed_s"] + reference_s),
            "eval_reward_accuracy": summary["eval_rewards/accuracy"], "eval_reward_margin": summary["eval_rewards/margin"],
            "peak_gb": max(r.get("peak_memory_gb", 0.0) for r in records)}


def bench_dpo(corpus, tokenizer_dir, workdir, preset: str = DPO_PRESET, max_len: int = 128, micro: int = 8, steps: int = 40,
              warmup: int = 5, lr: float = DPO_LR, repeats: int = 3, with_trl: bool = True, n_train: int = 1200) -> dict:
    from trainers.data.synthetic import make_preference_pairs
    from trl_sft import trl_available

    from trl_dpo import trl_dpo_in_process

    corpus, tokenizer_dir, workdir = (Path(p).resolve() for p in (corpus, tokenizer_dir, workdir))
    cache = workdir / "dpo_cache"
    model_dir = make_sft_model(corpus, tokenizer_dir, workdir / "dpo_base", preset, cache)
    data = workdir / "dpo_pairs"
    data.mkdir(parents=True, exist_ok=True)
    stats = make_preference_pairs(data, seed=7, n_train=n_train)
    pairs, heldout = data / "pairs.jsonl", data / "pairs_heldout.jsonl"
    with_trl = with_trl and trl_available()
    runs, trl_runs = [], []
    for r in range(repeats):  # each trainrig run computes its reference afresh: its own cache directory
        runs.append(trainrig_dpo(pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, 0, workdir / f"dpo_{r}", workdir / f"dpo_ref_{r}"))
        if with_trl:
            trl_runs.append(trl_dpo_in_process(pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, 0, DPO_BETA))
    median = lambda xs, key: statistics.median(x[key] for x in xs)  # noqa: E731
    result = {"preset": preset, "max_seq_length": max_len, "micro_batch": micro, "steps": steps, "warmup": warmup, "lr": lr,
              "beta": DPO_BETA, "repeats": repeats, "pairs": stats,
              "trainrig": {k: median(runs, k) for k in ("pairs_s", "whole_pairs_s", "reference_s", "peak_gb", "loss",
                                                       "eval_reward_accuracy", "eval_reward_margin")},
              "trainrig_all": [round(x["pairs_s"], 2) for x in runs], "trl_skipped": None if with_trl else "TRL is not installed"}
    if with_trl:
        result["trl"] = {k: median(trl_runs, k) for k in ("pairs_s", "peak_rss_gb", "loss", "eval_reward_accuracy", "eval_reward_margin")}
        result["trl"]["version"] = trl_runs[0]["trl"]
        result["trl_all"] = [round(x["pairs_s"], 2) for x in trl_runs]
        result["speed_ratio"] = result["trainrig"]["pairs_s"] / result["trl"]["pairs_s"]
        result["whole_speed_ratio"] = result["trainrig"]["whole_pairs_s"] / result["trl"]["pairs_s"]
        result["peak_ratio"] = result["trainrig"]["peak_gb"] / result["trl"]["peak_rss_gb"]
        result["targets"] = {"speed": result["speed_ratio"] >= 1.5, "peak": result["peak_ratio"] <= 1.0}
    t = result["trainrig"]
    print(f"(g) dpo: trainrig {t['pairs_s']:.1f} pairs/s (whole run {t['whole_pairs_s']:.1f}), peak {t['peak_gb']:.2f} GiB, "
          f"held-out reward accuracy {t['eval_reward_accuracy']:.3f}"
          + (f"; TRL {result['trl']['pairs_s']:.1f} pairs/s, {result['trl']['peak_rss_gb']:.2f} GiB, "
             f"{result['trl']['eval_reward_accuracy']:.3f}" if with_trl else ""), flush=True)
    return result


def render_dpo(r: dict) -> list[str]:
    t, trl = r["trainrig"], r.get("trl")
    lines = [f"## (g) DPO on CPU: trainrig (reference precomputed) vs TRL `DPOTrainer` (resident reference), {r['preset']} preset, fp32", "",
             f"{r['pairs']['pairs']} training pairs, {r['pairs']['pairs_heldout']} held out, rows up to {r['max_seq_length']} tokens; micro batch "
             f"{r['micro_batch']} pairs, {r['steps'] - r['warmup']} timed steps after {r['warmup']}, lr {r['lr']:g} constant, full training, "
             f"beta {r['beta']}; medians of {r['repeats']} (each run its own process).", "",
             "| loop | pairs/s (timed steps) | pairs/s (whole run, reference pass included) | peak RSS (GiB) | held-out reward accuracy | "
             "held-out reward margin |", "|---|---:|---:|---:|---:|---:|",
             f"| trainrig `launch/dpo.py` | {t['pairs_s']:.1f} | {t['whole_pairs_s']:.1f} (reference pass {t['reference_s']:.1f} s) | "
             f"{t['peak_gb']:.2f} | {t['eval_reward_accuracy']:.3f} | {t['eval_reward_margin']:.3f} |"]
    if trl:
        lines.append(f"| TRL {trl['version']} `DPOTrainer` | {trl['pairs_s']:.1f} | - | {trl['peak_rss_gb']:.2f} | "
                     f"{trl['eval_reward_accuracy']:.3f} | {trl['eval_reward_margin']:.3f} |")
        met = {k: "met" if v else "NOT met" for k, v in r["targets"].items()}
        lines += ["", f"trainrig / TRL: **{r['speed_ratio']:.2f}x** pairs/s over the timed steps ({r['whole_speed_ratio']:.2f}x with the "
                      f"reference pass counted), peak **{r['peak_ratio']:.2f}**. Targets: >= 1.5x TRL's pairs/s: **{met['speed']}**; "
                      f"peak <= TRL's: **{met['peak']}**. Per-run pairs/s: trainrig {r['trainrig_all']}, TRL {r['trl_all']}."]
    else:
        lines += ["", f"TRL row not measured: {r['trl_skipped']}."]
    lines += ["", "TRL also scores the \"\\n\" after each answer's `<|im_end|>` (its completion is the template's text after the "
              "prompt); trainrig scores the answer and its `<|im_end|>`. Peak RSS is the whole process's high-water mark, loading "
              "included: TRL's holds the resident reference model, trainrig's the reference table (16 bytes a pair)."]
    return lines
