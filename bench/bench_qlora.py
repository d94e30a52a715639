"""(f) QLoRA on CPU: `launch/sft.py` with a 16-bit LoRA base, a 4-bit NF4 base, and a 4-bit base
with bitsandbytes' 8-bit AdamW, beside TRL's `SFTTrainer` with PEFT as shipped (the base through
`BitsAndBytesConfig`, its optimizer `adamw_bnb_8bit`), on the same chat set, model, micro batch,
steps, learning rate and precision; and the section's rendering for RESULTS.md.

What is measured per run, each in its own process: trained (assistant) tokens/s over the timed
steps (after `warmup`), the process's peak RSS (VmHWM, model loading included, for every loop
alike) and, for trainrig, the planner's estimate of that peak (plan.json `memory_gb.total`; on CPU
it includes the process's libraries). Both sides pack (trainrig's best-fit rows; TRL's
`packing=True`, padding-free), train the same assistant-only labels (bench/trl_sft.py's template)
and the same adapters: r 16, alpha 32, dropout 0.05, every linear layer of attention and MLP, no
chat-token embedding rows (TRL trains none). Precision bf16 (autocast over a bf16 base): "16-bit"
is then what it says, on a CPU as on a GPU.

The model is the 0.5b preset (Qwen2.5-0.5B's shape with the bench's 4,096-token vocabulary: 360M
parameters, of which 358M in the decoder layers' linear weights that NF4 quantizes): the Qwen2.5
shape this 2-core, 24 GB machine trains in minutes (~6 s a step at micro 2 x 512 tokens).

Targets (the issue's): at the same micro batch, trainrig's peak <= the Trainer's and its trained
tokens/s >= 1.0x the Trainer's, for the QLoRA rows.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench_common import make_chat_set, make_sft_model
from bench_sft import trainrig_sft

QLORA_PRESET = "0.5b"
QLORA_CASES = (  # (name, launch/sft.py flags, TRL's (base bits, optimizer))
    ("LoRA, 16-bit base", [], (16, "adamw")),
    ("QLoRA, NF4 base", ["--load_in_4bit"], (4, "adamw")),
    ("QLoRA, NF4 base + 8-bit AdamW", ["--load_in_4bit", "--optimizer", "adamw8bit"], (4, "adamw8bit")),
)
LORA_FLAGS = ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--no-lora_train_chat_tokens", "--precision", "bf16"]


def bench_qlora(corpus, tokenizer_dir, workdir, preset: str = QLORA_PRESET, max_len: int = 512, micro: int = 2, steps: int = 10,
                warmup: int = 2, samples: int = 400, lr: float = 2e-4, repeats: int = 3, with_trl: bool = True) -> dict:
    from trainers.models import load_tokenizer
    from trl_sft import trl_available, trl_sft_in_process

    corpus, tokenizer_dir, workdir = (Path(p).resolve() for p in (corpus, tokenizer_dir, workdir))
    cache = workdir / "qlora_cache"
    model_dir = make_sft_model(corpus, tokenizer_dir, workdir / "qlora_base", preset, cache)
    chat = workdir / "qlora_chat.jsonl"
    stats = make_chat_set(chat, corpus, load_tokenizer(str(model_dir), False, "--model_name_or_path"), samples, max_len, seed=5)
    with_trl = with_trl and trl_available()
    loss_steps = warmup
    rows = []
    for i, (name, flags, (bits, optimizer)) in enumerate(QLORA_CASES):
        runs, trl_runs = [], []
        for r in range(repeats):
            runs.append(trainrig_sft(chat, model_dir, cache, max_len, micro, steps, warmup, loss_steps, lr, 0,
                                     workdir / f"qlora_{i}_{r}", packing=True, extra=[*LORA_FLAGS, *flags]))
            if with_trl:
                trl_runs.append(trl_sft_in_process(chat, model_dir, max_len, micro, steps, warmup, loss_steps, lr, 0, "packing", 0, "",
                                                   16, bits, optimizer, "bf16"))
        row = {"name": name, "flags": flags, "base_bits": bits, "optimizer": optimizer,
               "trainrig": {"trained_tok_s": statistics.median(x["trained_tok_s"] for x in runs),
                            "peak_gb": statistics.median(x["peak_gb"] for x in runs),
                            "predicted_gb": runs[0]["predicted_gb"], "loss": statistics.median(x["loss"] for x in runs),
                            "all": [round(x["trained_tok_s"], 1) for x in runs]}}
        if with_trl:
            row["trl"] = {"trained_tok_s": statistics.median(x["trained_tok_s"] for x in trl_runs),
                          "peak_gb": statistics.median(x["peak_rss_gb"] for x in trl_runs),
                          "loss": statistics.median(x["loss"] for x in trl_runs), "trl": trl_runs[0]["trl"],
                          "all": [round(x["trained_tok_s"], 1) for x in trl_runs]}
            row["speed_ratio"] = row["trainrig"]["trained_tok_s"] / row["trl"]["trained_tok_s"]
            row["peak_ratio"] = row["trainrig"]["peak_gb"] / row["trl"]["peak_gb"]
        rows.append(row)
        print(f"(f) {name}: trainrig {row['trainrig']['trained_tok_s']:.1f} trained tok/s, peak {row['trainrig']['peak_gb']:.2f} GiB "
              f"(predicted {row['trainrig']['predicted_gb']:.2f})"
              + (f"; TRL {row['trl']['trained_tok_s']:.1f}, {row['trl']['peak_gb']:.2f} GiB" if with_trl else ""), flush=True)
    quantized = [r for r in rows if r["base_bits"] < 16 and "trl" in r]
    targets = {"peak": all(r["peak_ratio"] <= 1.0 for r in quantized), "speed": all(r["speed_ratio"] >= 1.0 for r in quantized)}
    return {"preset": preset, "max_seq_length": max_len, "micro_batch": micro, "steps": steps, "warmup": warmup, "lr": lr,
            "repeats": repeats, "chat": stats, "rows": rows, "trl_skipped": None if with_trl else "TRL is not installed",
            "targets": targets if quantized else {}}


def render_qlora(r: dict) -> list[str]:
    c = r["chat"]
    lines = [f"## (f) QLoRA on CPU: 16-bit LoRA vs NF4 vs NF4 + 8-bit AdamW, trainrig vs TRL `SFTTrainer` + PEFT, {r['preset']} preset, bf16", "",
             f"{c['samples']} chat samples (median {c['median_tokens']:.0f} tokens, max {c['max_tokens']}), packed into rows of "
             f"{r['max_seq_length']}; micro batch {r['micro_batch']}, {r['steps'] - r['warmup']} timed steps after {r['warmup']}, "
             f"lr {r['lr']:g} constant, LoRA r16/alpha 32/dropout 0.05 on every linear layer; medians of {r['repeats']}.", "",
             "| base, optimizer | trainrig trained tok/s | TRL trained tok/s | trainrig / TRL | trainrig peak RSS (GiB) | "
             "trainrig predicted (GiB) | TRL peak RSS (GiB) | trainrig / TRL peak |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        t, trl = row["trainrig"], row.get("trl")
        other = (f"{trl['trained_tok_s']:.1f} | **{row['speed_ratio']:.2f}x** | {t['peak_gb']:.2f} | {t['predicted_gb']:.2f} | "
                 f"{trl['peak_gb']:.2f} | **{row['peak_ratio']:.2f}**") if trl else \
            f"- | - | {t['peak_gb']:.2f} | {t['predicted_gb']:.2f} | - | -"
        lines.append(f"| {row['name']} | {t['trained_tok_s']:.1f} | {other} |")
    lines.append("")
    if r["trl_skipped"]:
        lines.append(f"TRL rows not measured: {r['trl_skipped']}.")
    else:
        met = {k: "met" if v else "NOT met" for k, v in r["targets"].items()}
        lines.append(f"Targets, on the QLoRA rows: trainrig's peak <= the Trainer's at the same micro batch: **{met['peak']}**; "
                     f"its trained tokens/s >= 1.0x the Trainer's: **{met['speed']}** (TRL {r['rows'][0]['trl']['trl']}).")
    lines += ["", "Peak RSS is the whole process's high-water mark, loading included, for both loops; predicted is the planner's "
              "estimate for the same run (it counts the process's libraries on CPU). On CPU the 4-bit matmul dequantizes each "
              "weight for every use, so QLoRA buys memory, not speed; a GPU's figures need a GPU run of this section."]
    return lines
