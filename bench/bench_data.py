"""(a) data preparation: tokenize + pack a jsonl corpus into blocks, trainrig's `prepare_blocks` vs.
HF run_clm's recipe; chat rendering + assistant-only masking vs. `apply_chat_template` + offsets;
and the section's rendering for RESULTS.md."""

from __future__ import annotations

import json
import os
import statistics
import time
from itertools import chain
from pathlib import Path


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


def bench_chat_masking(chat: Path, tokenizer, max_len: int, repeats: int, chunk: int = 1000) -> dict:
    """Chat rendering + assistant-only masking, conversations in memory to (input_ids, labels):
    trainrig's ChatRenderer.encode_batch (ChatML rendered in Python with the assistant spans known
    as it is built, one Rust batch encode with offsets, a numpy mask) against what a user writes
    with HF: `apply_chat_template(tokenize=False)` per conversation, the tokenizer on each chunk with
    `return_offsets_mapping`, and a mask from the assistant spans found in the rendered text. Both
    in chunks of `chunk` conversations; the trained-token totals must agree, or the figure is void."""
    import numpy as np

    from trainers.data.chat import IGNORE_INDEX, IM_END, IM_START, ChatRenderer, ChatSettings, render_chatml

    conversations = [json.loads(line)["messages"] for line in chat.read_text().splitlines()]
    renderer = ChatRenderer(tokenizer, ChatSettings(max_len))
    header = f"{IM_START}assistant\n"

    def trainrig_once():
        start = time.perf_counter()
        trained = 0
        for i in range(0, len(conversations), chunk):
            for encoded in renderer.encode_batch(conversations[i:i + chunk]):
                trained += int((encoded.labels[1:] != IGNORE_INDEX).sum())
        return time.perf_counter() - start, trained

    def hf_once():
        start = time.perf_counter()
        trained = 0
        for i in range(0, len(conversations), chunk):
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations[i:i + chunk]]
            encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for text, ids, offsets in zip(texts, encodings["input_ids"], encodings["offset_mapping"]):
                spans, at = [], text.find(header)
                while at >= 0:
                    begin = at + len(header)
                    end = text.find(IM_END, begin) + len(IM_END)
                    spans.append((begin, end))
                    at = text.find(header, end)
                offsets = np.asarray(offsets).reshape(-1, 2)
                mask = np.zeros(len(ids), dtype=bool)
                for begin, end in spans:
                    mask |= (offsets[:, 0] < end) & (offsets[:, 1] > begin)
                labels = np.where(mask, ids, IGNORE_INDEX)[:max_len]
                trained += int((labels[1:] != IGNORE_INDEX).sum())
        return time.perf_counter() - start, trained

    def encode_alone_once():
        """The floor both pay: the same batch encode (with offsets) of texts already rendered."""
        texts = [render_chatml(renderer.with_system(m))[0] for m in conversations]
        start = time.perf_counter()
        for i in range(0, len(texts), chunk):
            tokenizer.backend_tokenizer.encode_batch(texts[i:i + chunk], add_special_tokens=False)
        return time.perf_counter() - start, 0

    rows = {"trainrig": [trainrig_once() for _ in range(repeats)], "hf_apply_chat_template": [hf_once() for _ in range(repeats)],
            "encode_alone": [encode_alone_once() for _ in range(repeats)]}
    result = {"samples": len(conversations), "chunk": chunk, "repeats": repeats}
    for name, runs in rows.items():
        seconds = statistics.median(t for t, _ in runs)
        result[name] = {"s": seconds, "samples_s": len(conversations) / seconds, "trained_tokens": runs[0][1]}
    result["ratio"] = result["trainrig"]["samples_s"] / result["hf_apply_chat_template"]["samples_s"]
    result["same_labels"] = result["trainrig"]["trained_tokens"] == result["hf_apply_chat_template"]["trained_tokens"]
    return result


def render_data(data: dict, info: dict) -> list[str]:
    lines = [
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
    ]
    chat = data.get("chat")
    if chat:
        verdict = "met" if chat["ratio"] >= 3 else "NOT met"
        same = ("the same trained tokens" if chat["same_labels"] else
                f"DIFFERENT trained tokens ({chat['trainrig']['trained_tokens']:,} vs. {chat['hf_apply_chat_template']['trained_tokens']:,}): "
                "the comparison is void")
        lines += [
            "",
            f"### Chat rendering + assistant-only masking, {chat['samples']:,} conversations in memory to input_ids + labels "
            f"(median of {chat['repeats']})",
            "",
            "| pipeline | seconds | samples/s | trainrig's speed-up |",
            "|---|---:|---:|---:|",
            f"| trainrig `ChatRenderer.encode_batch` (ChatML built in Python with its assistant spans, one batch encode with offsets, numpy mask) "
            f"| {chat['trainrig']['s']:.2f} | {chat['trainrig']['samples_s']:,.0f} | 1.00x |",
            f"| HF: `apply_chat_template(tokenize=False)` per conversation, batch encode with `return_offsets_mapping`, spans found in the text "
            f"| {chat['hf_apply_chat_template']['s']:.2f} | {chat['hf_apply_chat_template']['samples_s']:,.0f} | {chat['ratio']:.2f}x |",
            f"| floor: the batch encode with offsets alone, on texts already rendered | {chat['encode_alone']['s']:.2f} "
            f"| {chat['encode_alone']['samples_s']:,.0f} | - |",
            "",
            f"Target >= 3x: **{verdict}** ({chat['ratio']:.2f}x), on {same} ({chat['trainrig']['trained_tokens']:,}). Both in chunks of "
            f"{chat['chunk']:,} conversations; the rest of trainrig's SFT data preparation (reading, validation, the Arrow cache) is "
            f"not in either figure. The encode alone takes {chat['encode_alone']['s'] / chat['trainrig']['s']:.0%} of trainrig's time "
            f"and {chat['encode_alone']['s'] / chat['hf_apply_chat_template']['s']:.0%} of the HF pipeline's: with that floor shared, "
            f"no pipeline can be {chat['hf_apply_chat_template']['s'] / chat['encode_alone']['s']:.2f}x faster than HF's here.",
        ]
    return lines
