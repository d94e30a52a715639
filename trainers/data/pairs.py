"""Preference pairs for the reward model and preference optimisation (DPO): a context and two
answers, the chosen one better.

Record forms (per line of .jsonl/.json, parquet or a datasets directory):
    {"prompt": "...", "chosen": "...", "rejected": "..."}          also "question" for "prompt"
    {"messages": [context turns], "chosen": "...", "rejected": "..."}
    {"prompt": [context turns], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   (TRL's conversational form)
An optional "system" adds a system turn. Each answer becomes the last assistant turn of the
context, rendered with the tokenizer's chat template, so the reward model scores text in the
format the SFT model writes. A pair whose longer side exceeds --max_seq_length is dropped and
counted; a malformed record stops with its file:line (exit 2).

For DPO (encode_preferences) each side is rendered by SFT's renderer (trainers/data/chat.py: the
model's own chat template) with labels on the answer alone: what the template writes for it
through the token that ends the turn (<|im_end|> in ChatML), the prompt masked. A pair too long for --max_seq_length first loses its earliest context exchanges
(whole user/assistant turns; the system prompt and the last user turn stay), and is skipped,
counted with its place, only when that is not enough. Special-token text in content and
identical answers are skipped and counted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.attention import ROW_MULTIPLE
from trainers.data import IGNORE_INDEX
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


# ------------------------------------------------------------ preference optimisation (DPO)

# Why a pair is skipped, for the log and `trainrig inspect dpo`.
PAIR_REASONS = {
    "too_long": "longer than --max_seq_length even with only the system prompt and the last user turn of its context",
    "identical_answers": "chosen and rejected render to the same tokens: no preference to learn",
    "special_token_in_content": "content contains a special token's text, e.g. <|im_end|> (it would forge a turn boundary or an EOS)",
    "tools_not_rendered": "the context has tool calls, and the chat template does not render them",
}
CHECKED_PER_FILE = 8  # pairs per file whose rendering is compared with the tokenizer's own apply_chat_template


@dataclass
class PreferencePair:
    """One pair as the policy reads it: each side is the context and one answer, rendered as
    ChatML and ending at the answer's <|im_end|>; the labels (unshifted, -100 elsewhere) are the
    answer's content and that <|im_end|>, the tokens whose log-probs DPO compares."""

    chosen: np.ndarray  # int32 ids
    chosen_labels: np.ndarray
    rejected: np.ndarray
    rejected_labels: np.ndarray
    where: str  # file:line of the record
    dropped_turns: int  # earliest context turns dropped to fit --max_seq_length


def _scored(encoded) -> tuple[np.ndarray, np.ndarray]:
    """ids and labels up to the last scored token (the token ending the answer's turn, e.g.
    <|im_end|>): what follows it (ChatML's "\\n") is never scored, so it is not run either."""
    end = int(np.nonzero(encoded.labels != IGNORE_INDEX)[0][-1]) + 1
    return encoded.input_ids[:end], encoded.labels[:end]


def _droppable(context: list[dict]) -> tuple[int, int] | None:
    """The turns [start, stop) that may be dropped from a context ([system] user (assistant user)*,
    tool calls and results inside an exchange): its earliest exchange, from its user turn to the
    next one, keeping the system prompt and the last user turn; None when only those are left."""
    first = 1 if context[0]["role"] == "system" else 0
    users = [i for i, m in enumerate(context) if m["role"] == "user"]
    return (first, users[1]) if len(users) > 1 else None


def encode_preferences(patterns: list[str], flag: str, tokenizer, max_seq_length: int, default_system_prompt: str = "",
                       tokenizer_flag: str = "--model_name_or_path"):
    """(the kept PreferencePairs in file order, ChatStats with the skips and their places). A
    malformed record stops with its file:line (exit 2), as for the reward model; a pair longer than
    --max_seq_length loses its earliest context exchanges until it fits, and is skipped (counted,
    with its place) when even its last user turn with the answers does not."""
    import sys

    from trainers.data.chat import ChatRenderer, ChatSettings, ChatStats, Conversation

    # the renderer labels the last assistant turn and cuts nothing: the fitting is done here, by whole turns
    renderer = ChatRenderer(tokenizer, ChatSettings(sys.maxsize, "last_assistant", default_system_prompt), tokenizer_flag)
    stats, kept = ChatStats(), []
    for path in resolve_files(patterns, flag):
        checked = 0
        for where, record in iter_records(Path(path)):
            if isinstance(record, SampleError):
                raise UsageError(f"{where}: {record}; fix the line")
            stats.read += 1
            chosen_msgs, rejected_msgs = pair_messages(record, where)
            try:
                renderer.check_content(chosen_msgs)
                renderer.check_content(rejected_msgs[-1:])
            except SampleError as err:
                stats.skip(err.reason, where, str(err))
                continue
            if checked < CHECKED_PER_FILE:
                checked += renderer.check_against_template(Conversation(chosen_msgs), where)
            context, dropped = chosen_msgs[:-1], 0
            while True:
                chosen, rejected = (_scored(e) for e in renderer.encode_batch([context + chosen_msgs[-1:], context + rejected_msgs[-1:]],
                                                                                  [where, where]))
                longest = max(len(chosen[0]), len(rejected[0]))
                cut = _droppable(context)
                if longest <= max_seq_length or cut is None:
                    break
                context, dropped = context[:cut[0]] + context[cut[1]:], dropped + cut[1] - cut[0]
            if longest > max_seq_length:
                stats.skip("too_long", where, f"{longest} tokens with {len(context)} context turn(s) left, over --max_seq_length {max_seq_length}")
            elif np.array_equal(chosen[0], rejected[0]):
                stats.skip("identical_answers", where, "chosen and rejected are the same tokens")
            else:
                kept.append(PreferencePair(chosen[0], chosen[1], rejected[0], rejected[1], where, dropped))
                stats.truncated += dropped > 0
                stats.tokens += len(chosen[0]) + len(rejected[0])
                stats.trained_tokens += int((chosen[1] != IGNORE_INDEX).sum() + (rejected[1] != IGNORE_INDEX).sum())
    stats.kept = len(kept)
    if not kept:
        skipped = ", ".join(f"{n} x {r}" for r, n in stats.skipped.items()) or "the files are empty"
        raise UsageError(f"{flag} {' '.join(patterns)}: no usable pairs ({skipped}); raise --max_seq_length or check the data "
                         f"(`trainrig inspect dpo` shows what is kept)")
    return kept, stats


def preference_summary(stats) -> list[str]:
    """What encode_preferences did, for the log and `trainrig inspect dpo`."""
    lines = [f"pairs: {stats.read} read, {stats.kept} kept, {sum(stats.skipped.values())} skipped, {stats.truncated} with their "
             f"earliest context turns dropped to fit; {stats.tokens:,} tokens, {stats.trained_tokens:,} scored"]
    for reason, count in sorted(stats.skipped.items(), key=lambda kv: -kv[1]):
        places = ", ".join(e["where"] for e in stats.examples if e["reason"] == reason)
        lines.append(f"  skipped {count} x {reason} ({PAIR_REASONS[reason]}): first at {places}")
    return lines


def pairs_digest(pairs: list[PreferencePair]) -> str:
    """A hash of every pair's ids and labels, in order (what the reference log-probs depend on)."""
    import hashlib

    digest = hashlib.sha256()
    for p in pairs:
        for part in (p.chosen, p.chosen_labels, p.rejected, p.rejected_labels):
            digest.update(np.int64(len(part)).tobytes())
            digest.update(np.ascontiguousarray(part, dtype=np.int32).tobytes())
    return digest.hexdigest()


class PreferenceDataset:
    """Pairs over `indices` of `pairs`; after the reference pass, `reference` holds each pair's
    reference log-probs (chosen, rejected), one row per index of `pairs`."""

    def __init__(self, pairs: list[PreferencePair], indices: np.ndarray):
        self.pairs, self.indices = pairs, indices
        self.reference: np.ndarray | None = None
        self.lengths = np.array([max(len(pairs[int(i)].chosen), len(pairs[int(i)].rejected)) for i in indices], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        p = self.pairs[index]
        item = {"chosen": p.chosen, "chosen_labels": p.chosen_labels, "rejected": p.rejected,
                "rejected_labels": p.rejected_labels, "index": index}
        if self.reference is not None:
            item["reference"] = self.reference[index]
        return item


def collate_preferences(pairs: list[dict], pad_id: int) -> dict:
    """B pairs -> 2B rows padded on the right, chosen first then rejected in the same order (as
    collate_pairs), with their labels (-100 on padding) and, once computed, "reference" (2B,)."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    length = -(-max(len(r) for r in rows) // ROW_MULTIPLE) * ROW_MULTIPLE  # 16-aligned: see trainers/attention.py
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    label_ids = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        label_ids[i, :len(row)] = torch.as_tensor(label, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids, "pairs": len(pairs),
             "num_tokens": int(attention_mask.sum()), "sample_ids": torch.tensor([p["index"] for p in pairs])}
    if "reference" in pairs[0]:
        batch["reference"] = torch.tensor(np.concatenate([[p["reference"][0] for p in pairs], [p["reference"][1] for p in pairs]]))
    return batch
