"""`trainrig inspect <stage> --config F [--num_samples N] [--output F.jsonl] [flags]`:
what the model will be trained on, before any GPU time is spent.

Takes the same config and flags as the stage's entry script, prepares the data exactly as
training does (same cache), prints a few samples with the trained tokens marked and the data
statistics, and with --output writes `{"input_ids": [...], "labels": [...]}` per line (HF
convention: labels unshifted, -100 where untrained): one line per sample, or with packing one per
packed row (with its `position_ids`), i.e. what one row of a batch holds. For the reward model a
line is one pair: `{"chosen_input_ids": [...], "rejected_input_ids": [...]}`, the two conversations
whose last tokens the score head reads. For DPO a line is one pair with each side's ids and labels
(`chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`): the labels mark
the answer tokens whose log-probs are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trainers.config import Run, parse_run
from trainers.data import IGNORE_INDEX
from trainers.errors import UsageError
from trainers.stages import STAGES

GREEN, RESET = "\033[42;30m", "\033[0m"


def marked_text(tokenizer, input_ids: np.ndarray, labels: np.ndarray, color: bool) -> str:
    """The decoded sample with trained runs highlighted (terminal) or wrapped in [[ ]]."""
    trained = labels != IGNORE_INDEX
    pieces, start = [], 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            text = tokenizer.decode(input_ids[start:end].tolist())
            if trained[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            pieces.append(text)
            start = end
    return "".join(pieces)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="trainrig inspect", add_help=False, allow_abbrev=False)
    parser.add_argument("stage", choices=tuple(STAGES))
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--output", default="")

    def error(message):  # one line naming the problem, exit 2 (argparse would print its usage too)
        raise UsageError(f"trainrig inspect: {message}; usage: trainrig inspect {{{','.join(STAGES)}}} --config F "
                         f"[--num_samples N] [--output F.jsonl] [stage flags]")

    parser.error = error
    return parser.parse_known_args(argv)


def preview_global_batch(batch_cfg) -> int:
    """The global batch of a one-process run with these flags: the unit of SFT's epoch and of its
    length grouping, so the preview batches as that run would."""
    if batch_cfg.global_batch_size > 0:
        return batch_cfg.global_batch_size
    accumulation = batch_cfg.gradient_accumulation_steps
    return batch_cfg.per_device_train_batch_size * (accumulation if isinstance(accumulation, int) else 1)


def inspect_sft(run: Run, num_samples: int, output: str, color: bool) -> dict:
    from trainers.data.chat import chat_settings, ensure_chat_template, prepare_chat, summary_lines
    from trainers.data.collate import batch_fill, collate_rows
    from trainers.models import tokenizer_for
    from trainers.sft import make_rows, row_sampler

    cfg = run.cfg
    m, d = cfg.model, cfg.data
    if not m.model_name_or_path and not m.tokenizer_name_or_path:
        raise UsageError("--model_name_or_path (or --tokenizer_name_or_path) is required: the tokenizer decides the tokens")
    tokenizer, flag = tokenizer_for(m)
    ensure_chat_template(tokenizer)
    samples = prepare_chat(d.train_files, "--train_files", tokenizer, chat_settings(d),
                           d.chat_format, d.strict, d.data_cache_dir, build=True, tokenizer_flag=flag)
    meta = samples.meta
    for i in range(min(num_samples, len(samples))):
        s = samples[i]
        n_trained = int((s["labels"][1:] != IGNORE_INDEX).sum())
        print(f"--- sample {i} ({samples.where(i)}): {len(s['input_ids'])} tokens, {n_trained} trained")
        print(marked_text(tokenizer, s["input_ids"], s["labels"], color))
    rows = make_rows(samples, np.arange(len(samples)), d.max_seq_length, d.packing, cfg.run.seed)
    micro, row_lengths = cfg.batch.per_device_train_batch_size, rows.row_lengths()
    sampler = row_sampler(rows, samples.lengths, d.packing, preview_global_batch(cfg.batch), 1, 0, cfg.run.seed)  # one rank's first epoch, as training batches it
    fill = batch_fill(row_lengths, list(sampler), micro)
    if d.packing:
        layout = (f"{len(rows)} packed rows of {d.max_seq_length} ({row_lengths.sum() / (len(rows) * d.max_seq_length):.1%} used); "
                  f"micro batches of {micro} rows are {fill:.1%} non-pad")
    else:
        layout = f"no packing: length-grouped micro batches of {micro} are {fill:.1%} non-pad"
    print("=== data")
    for line in summary_lines(meta):
        print(line)
    print(f"formats: {', '.join(f'{Path(f).name}={v}' for f, v in meta['formats'].items())}; --max_seq_length {d.max_seq_length}")
    print(f"layout: {layout}")
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            for r in range(len(rows)):
                batch = collate_rows([rows[r]], pad_id=0, layout="packed" if d.packing else "padded")
                n = batch["num_tokens"]  # the row without the collator's alignment padding
                line = {"input_ids": batch["input_ids"][0, :n].tolist(), "labels": batch["labels"][0, :n].tolist()}
                if d.packing:
                    line["position_ids"] = batch["position_ids"][0, :n].tolist()
                fh.write(json.dumps(line) + "\n")
        print(f"wrote {len(rows)} {'rows' if d.packing else 'samples'} to {output}")
    return {**meta, "rows": len(rows)}


def inspect_reward(run: Run, num_samples: int, output: str, color: bool) -> dict:
    from trainers.data.chat import ensure_chat_template
    from trainers.data.pairs import encode_pairs
    from trainers.models import tokenizer_for

    cfg = run.cfg
    tokenizer, _ = tokenizer_for(cfg.model)
    ensure_chat_template(tokenizer)
    pairs, stats = encode_pairs(cfg.data.train_files, "--train_files", tokenizer, cfg.data.max_seq_length)
    for i, (chosen, rejected) in enumerate(pairs[:num_samples]):
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            last = np.zeros(len(ids), dtype=np.int64) + IGNORE_INDEX
            last[-1] = ids[-1]  # the token whose hidden state the score head reads
            print(f"--- pair {i}, {name}: {len(ids)} tokens, scored at the marked last token")
            print(marked_text(tokenizer, np.array(ids), last, color))
    print("=== data")
    print(f"{stats.read} pairs read, {stats.kept} kept; dropped: {stats.too_long} longer than --max_seq_length "
          f"{cfg.data.max_seq_length}, {stats.identical} with identical answers")
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            for chosen, rejected in pairs:
                fh.write(json.dumps({"chosen_input_ids": chosen, "rejected_input_ids": rejected}) + "\n")
        print(f"wrote {len(pairs)} pairs to {output}")
    return {"read": stats.read, "kept": stats.kept, "too_long": stats.too_long, "identical": stats.identical}


def inspect_dpo(run: Run, num_samples: int, output: str, color: bool) -> dict:
    from trainers.data.chat import ensure_chat_template
    from trainers.data.pairs import encode_preferences, preference_summary
    from trainers.models import tokenizer_for

    cfg = run.cfg
    d = cfg.data
    tokenizer, tokenizer_flag = tokenizer_for(cfg.model)
    ensure_chat_template(tokenizer)
    pairs, stats = encode_preferences(d.train_files, "--train_files", tokenizer, d.max_seq_length, d.default_system_prompt, tokenizer_flag)
    for i, pair in enumerate(pairs[:num_samples]):
        dropped = f", {pair.dropped_turns} earliest context turns dropped to fit" if pair.dropped_turns else ""
        for name, ids, labels in (("chosen", pair.chosen, pair.chosen_labels), ("rejected", pair.rejected, pair.rejected_labels)):
            scored = int((labels != IGNORE_INDEX).sum())
            print(f"--- pair {i} ({pair.where}), {name}: {len(ids)} tokens, {scored} scored (marked){dropped}")
            print(marked_text(tokenizer, ids, labels, color))
    print("=== data")
    for line in preference_summary(stats):
        print(line)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            for pair in pairs:
                fh.write(json.dumps({"where": pair.where, "chosen_input_ids": pair.chosen.tolist(), "chosen_labels": pair.chosen_labels.tolist(),
                                     "rejected_input_ids": pair.rejected.tolist(), "rejected_labels": pair.rejected_labels.tolist()}) + "\n")
        print(f"wrote {len(pairs)} pairs to {output}")
    return {"read": stats.read, "kept": stats.kept, "truncated": stats.truncated, "skipped": dict(stats.skipped)}


def inspect_pretrain(run: Run, num_samples: int, output: str, color: bool) -> dict:
    from trainers.data.packing import prepare_blocks
    from trainers.models import tokenizer_for

    cfg = run.cfg
    d = cfg.data
    tokenizer, _ = tokenizer_for(cfg.model)
    blocks = prepare_blocks(d.train_files, "--train_files", tokenizer, d.block_size, d.text_field, d.data_cache_dir,
                            d.tokenize_batch_size, build=True)
    for i in range(min(num_samples, len(blocks))):
        ids = blocks[i]["input_ids"]
        print(f"--- block {i}: {len(ids)} tokens, all trained (labels = input_ids)")
        print(marked_text(tokenizer, ids, ids, color))
    meta = blocks.meta
    print("=== data")
    print(f"{meta['documents']:,} documents, {meta['tokens']:,} tokens -> {meta['blocks']:,} blocks of {d.block_size} "
          f"(EOS after each document; final tail of {meta['tail_tokens_dropped']} tokens dropped)")
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            for i in range(len(blocks)):
                ids = blocks[i]["input_ids"].tolist()
                fh.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
        print(f"wrote {len(blocks)} blocks to {output}")
    return meta


def main(argv: list[str]) -> dict:
    args, rest = _parse(argv)
    color = sys.stdout.isatty()
    stage = STAGES[args.stage]
    return stage.inspect(parse_run(stage.config, rest, prog=f"trainrig inspect {stage.name}"), args.num_samples, args.output, color)
