"""Preference pairs for the reward model: a context and two answers, the chosen one better.

Record forms (per line of .jsonl/.json, parquet or a datasets directory):
    {"prompt": "...", "chosen": "...", "rejected": "..."}          also "question" for "prompt"
    {"messages": [context turns], "chosen": "...", "rejected": "..."}
    {"prompt": [context turns], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   (TRL's conversational form)
An optional "system" adds a system turn. Each answer becomes the last assistant turn of the
context, rendered with the tokenizer's chat template, so the reward model scores text in the
format the SFT model writes. A pair whose longer side exceeds --max_seq_length is dropped and
counted; a malformed record stops with its file:line (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.attention import ROW_MULTIPLE
from trainers.data.chat import SampleError, normalize_turn, iter_records, validate_messages
from trainers.data.sources import resolve_files
from trainers.errors import UsageError


@dataclass
class PairStats:
    read: int = 0
    kept: int = 0
    too_long: int = 0
    identical: int = 0  # chosen == rejected: no preference to learn


def _context(record: dict, where: str) -> list[dict]:
    prompt = record.get("prompt", record.get("question", record.get("messages")))
    if isinstance(prompt, str) and prompt.strip():
        context = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        try:  # each turn checked as SFT checks it: an object with role/content (or ShareGPT's from/value), a known role
            context = [normalize_turn(turn, i, "messages") for i, turn in enumerate(prompt)]
        except SampleError as err:
            raise UsageError(f"{where}: {err} ({err.reason})") from None
    else:
        raise UsageError(f"{where}: needs a non-empty 'prompt' (or 'question', or a 'messages' list) beside 'chosen' and 'rejected'")
    if record.get("system") and context[0].get("role") != "system":
        context.insert(0, {"role": "system", "content": record["system"]})
    return context


def _answer(value, where: str, field: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")  # TRL's conversational form: the answer as an assistant turn
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: '{field}' must be a non-empty string (or a list ending with an assistant turn)")
    return value


def pair_messages(record, where: str) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation) of one record, validated."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = list(record)[:6] if isinstance(record, dict) else type(record).__name__
        raise UsageError(f"{where}: a preference pair needs 'chosen' and 'rejected' (found {keys})")
    context = _context(record, where)
    conversations = []
    for field in ("chosen", "rejected"):
        messages = context + [{"role": "assistant", "content": _answer(record[field], where, field)}]
        try:
            validate_messages(messages)
        except SampleError as err:
            raise UsageError(f"{where}: {err} ({err.reason})") from None
        conversations.append(messages)
    return conversations[0], conversations[1]


def encode_pairs(patterns: list[str], flag: str, tokenizer, max_seq_length: int) -> tuple[list[tuple[list[int], list[int]]], PairStats]:
    """Token ids of every kept pair, (chosen, rejected), and the counts."""
    pairs, stats = [], PairStats()
    for path in resolve_files(patterns, flag):
        for where, record in iter_records(Path(path)):
            if isinstance(record, SampleError):
                raise UsageError(f"{where}: {record}; fix the line")
            stats.read += 1
            chosen, rejected = (tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]
                                for m in pair_messages(record, where))
            if chosen == rejected:
                stats.identical += 1
            elif max(len(chosen), len(rejected)) > max_seq_length:
                stats.too_long += 1
            else:
                pairs.append((chosen, rejected))
    stats.kept = len(pairs)
    if not pairs:
        raise UsageError(f"{flag} {' '.join(patterns)}: no usable pairs ({stats}); raise --max_seq_length or check the data")
    return pairs, stats


class PairDataset:
    def __init__(self, pairs: list[tuple[list[int], list[int]]], indices: np.ndarray):
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        chosen, rejected = self.pairs[int(self.indices[i])]
        return {"chosen": chosen, "rejected": rejected, "index": int(self.indices[i])}


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """B pairs -> 2B rows padded on the right: the chosen answers first, then the rejected ones in
    the same order, so rewards[:B] - rewards[B:] are the pairs' margins."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    length = -(-max(len(r) for r in rows) // ROW_MULTIPLE) * ROW_MULTIPLE  # 16-aligned: see trainers/attention.py
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pairs": len(pairs),
            "num_tokens": int(attention_mask.sum()), "sample_ids": torch.tensor([p["index"] for p in pairs])}
