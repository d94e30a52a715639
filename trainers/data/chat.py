"""Chat samples -> ChatML `input_ids` + `labels` with assistant-only loss, computed by trainrig.

Formats in (`--chat_format auto` decides per file from its first record):
  messages   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}   (OpenAI style)
  sharegpt   {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
  alpaca     {"instruction": "...", "input": "...", "output": "..."} (+ optional "system")

Rendering is ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, which is what
Qwen's chat template and tokenizer/train.py's produce. The whole rendered string is tokenised in
one piece (so content starting with spaces or newlines, CJK and emoji tokenise exactly as the
template's `apply_chat_template(tokenize=True)` would), and a token is trained when its character
offsets overlap an assistant span: the assistant's content plus its closing `<|im_end|>`, so the
model learns to stop. This is the rule HF uses for `{% generation %}` spans; here the spans come
from the ChatML structure, so stock templates without those markers work too. A token can cross
into a span only at its start (the header's "\\n" merged with content that starts with a newline);
special tokens split everything else.

`ChatRenderer` checks once per tokenizer that its own chat template renders exactly this ChatML
(adopting a default system prompt the template injects, as Qwen2.5's does), and again on the
first samples of every file, so `input_ids` always equal the template's.

Every sample problem has a reason; the default is to skip and count it, `--strict` stops at the
first one. Samples over `--max_seq_length` are cut only after a whole assistant turn, keeping at
least one; a sample that cannot keep one is dropped, so no sample with all labels -100 is kept.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.data import IGNORE_INDEX
from trainers.data.sources import JSON_SUFFIXES, PARQUET_SUFFIXES, arrow_batches, is_json_array, read_json_array
from trainers.errors import UsageError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML as Qwen2 renders it, without the default system prompt Qwen's template injects.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Why a sample is skipped (the key is what the summary and `trainrig inspect` print).
REASONS = {
    "bad_json": "not valid JSON",
    "unknown_format": "no messages / conversations / instruction+output fields for this file's format",
    "malformed_turn": "a turn is not an object with role/content (from/value)",
    "unknown_role": "a role other than system, user, assistant (sharegpt: system, human, gpt)",
    "wrong_order": "turns not in the order [system] user assistant (user assistant)*",
    "non_string_content": "a content that is not a string",
    "empty_assistant": "an assistant turn with empty content",
    "no_assistant_turn": "no assistant turn to train on",
    "special_token_in_content": "content contains a special token's text, e.g. <|im_end|> (it would forge a turn boundary or an EOS)",
    "too_long": "not even the first assistant turn fits in --max_seq_length",
}


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ------------------------------------------------------------------------------- formats


def detect_format(record, where: str) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
    keys = list(record)[:6] if isinstance(record, dict) else type(record).__name__
    raise UsageError(f"{where}: cannot tell the chat format (fields {keys}); expected 'messages' (OpenAI), "
                     f"'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca), or set --chat_format")


def to_messages(record, chat_format: str) -> list[dict]:
    """One record in `chat_format` -> [{"role", "content"}], validated (SampleError otherwise)."""
    if not isinstance(record, dict):
        raise SampleError("unknown_format", f"a {type(record).__name__}, not a JSON object")
    if chat_format == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise SampleError("unknown_format", f"no 'instruction'/'output' fields (found {list(record)[:6]})")
        parts = [record["instruction"], record.get("input") or ""]
        if not all(isinstance(p, str) for p in parts + [record["output"]]):
            raise SampleError("non_string_content", "instruction, input and output must be strings")
        messages = [{"role": "user", "content": "\n".join(p for p in parts if p)},
                    {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        key = "messages" if chat_format == "messages" else "conversations"
        turns = record.get(key)
        if not isinstance(turns, list):
            raise SampleError("unknown_format", f"no '{key}' list (found {list(record)[:6]})")
        messages = [normalize_turn(t, i, chat_format) for i, t in enumerate(turns)]
    validate_messages(messages)
    return messages


def normalize_turn(turn, index: int, chat_format: str) -> dict:
    """A turn of either style; ShareGPT files often use role/content too, and vice versa."""
    if not isinstance(turn, dict):
        raise SampleError("malformed_turn", f"turn {index} is a {type(turn).__name__}, not an object")
    if "role" in turn and "content" in turn:
        role, content = turn["role"], turn["content"]
    elif "from" in turn and "value" in turn:
        role, content = turn["from"], turn["value"]
    else:
        raise SampleError("malformed_turn", f"turn {index} has no role/content (or from/value): {list(turn)[:4]}")
    names = SHAREGPT_ROLES if chat_format == "sharegpt" or "from" in turn else {r: r for r in ROLES}
    if role not in names:
        raise SampleError("unknown_role", f"turn {index} has role {role!r}; use one of {', '.join(names)}")
    return {"role": names[role], "content": content}


def validate_messages(messages: list[dict]) -> None:
    """[system] user assistant (user assistant)*, string contents, no empty assistant turn."""
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise SampleError("non_string_content", f"turn {i} ({m['role']}) content is {type(m['content']).__name__}, not a string")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise SampleError("no_assistant_turn", f"roles {roles}: no assistant turn")
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if body != expected[:len(body)] or len(body) % 2:
        raise SampleError("wrong_order", f"roles {roles}; expected [system] user assistant (user assistant)..., ending with assistant")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise SampleError("empty_assistant", f"turn {i} (assistant) is empty")


# ------------------------------------------------------------------------------ records


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) per sample: `file:line` for JSON lines, `file[i]` for a JSON array,
    `file row i` for parquet and datasets directories. A bad JSON line comes out as a
    SampleError instead of a record, so it can be skipped and counted."""
    if path.is_dir() or path.name.endswith(PARQUET_SUFFIXES):
        yield from _arrow_records(arrow_batches(path, 1024), str(path))
    elif path.name.endswith(JSON_SUFFIXES):
        if is_json_array(path):  # one JSON array: parsed whole (use .jsonl for big sets)
            for i, record in enumerate(read_json_array(path)):
                yield f"{path}[{i}]", record
            return
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    yield where, SampleError("bad_json", f"not valid JSON ({getattr(err, 'msg', err)})")
    else:
        raise UsageError(f"{path}: chat data must be .jsonl/.json, .parquet or a datasets directory")


def _arrow_records(batches, where: str) -> Iterator[tuple[str, object]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{where} row {row}", record
            row += 1


# ----------------------------------------------------------------------------- rendering


def render_chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text, assistant spans, turn ends): each assistant span covers its content and closing
    `<|im_end|>` (character offsets); turn ends are the offsets just after each turn's "\\n"."""
    parts, spans, ends, pos = [], [], [], 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        turn = f"{header}{m['content']}{IM_END}\n"
        if m["role"] == "assistant":
            spans.append((pos + len(header), pos + len(turn) - 1))
        parts.append(turn)
        pos += len(turn)
        ends.append(pos)
    return "".join(parts), spans, ends


def trained_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character range [start, end) overlaps any span."""
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


@dataclass
class ChatSettings:
    max_seq_length: int
    train_on: str = "all_assistant"  # or last_assistant
    default_system_prompt: str = ""


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where untrained (unshifted: the model shifts)
    truncated: bool


class ChatRenderer:
    """Renders ChatML for one tokenizer and turns batches of conversations into ids and labels."""

    def __init__(self, tokenizer, settings: ChatSettings, tokenizer_flag: str = "--model_name_or_path"):
        self.tokenizer, self.settings = tokenizer, settings
        vocab = tokenizer.get_vocab()
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        missing = [t for t in (IM_START, IM_END) if t not in vocab or t not in specials]
        if missing:
            named = f"{tokenizer_flag} {tokenizer.name_or_path}" if getattr(tokenizer, "name_or_path", "") else tokenizer_flag
            raise UsageError(f"{named}: the tokenizer has no special token {' '.join(missing)}; SFT renders ChatML. "
                             f"Use a ChatML tokenizer (Qwen's, or one from tokenizer/train.py), or add them as special tokens")
        self.system_prompt = settings.default_system_prompt or self._template_default_system()
        # the tokenizer turns these texts into special tokens wherever they appear
        self._specials = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def check_content(self, messages: list[dict]) -> None:
        for i, m in enumerate(messages):
            found = self._specials.search(m["content"])
            if found:
                raise SampleError("special_token_in_content", f"turn {i} ({m['role']}) contains {found.group()!r}")

    def _template_default_system(self) -> str:
        """The system prompt the tokenizer's chat template adds when a conversation has none
        ("" if none); raises if the template does not render plain ChatML at all."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return ""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        rendered = self.tokenizer.apply_chat_template(probe, tokenize=False)
        plain = render_chatml(probe)[0]
        if rendered == plain:
            return ""
        prefix = f"{IM_START}system\n"
        if rendered.startswith(prefix) and rendered.endswith(plain):
            system = rendered[len(prefix):-len(plain)]
            if system.endswith(f"{IM_END}\n"):
                return system[:-len(IM_END) - 1]
        raise UsageError(f"the tokenizer's chat template does not render ChatML (<|im_start|>role\\ncontent<|im_end|>\\n): it gives "
                         f"{rendered[:120]!r}; use a ChatML tokenizer, or remove chat_template from its tokenizer_config.json")

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def check_against_template(self, messages: list[dict], where: str) -> None:
        """The rendering must equal the tokenizer's own template output for this conversation."""
        if not getattr(self.tokenizer, "chat_template", None):
            return
        conversation = self.with_system(messages)  # an added default system prompt is part of it
        ours = render_chatml(conversation)[0]
        theirs = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UsageError(f"{where}: the tokenizer's chat template renders this sample differently from ChatML at character "
                             f"{at} ({theirs[max(0, at - 20):at + 40]!r}); use a plain ChatML template")

    def encode_batch(self, conversations: list[list[dict]]) -> list[Encoded | SampleError]:
        """Conversations (validated) -> Encoded, or a SampleError("too_long") for each."""
        rendered = [render_chatml(self.with_system(m)) for m in conversations]
        encodings = self.tokenizer.backend_tokenizer.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        return [self._labelled(enc, spans, ends) for enc, (_, spans, ends) in zip(encodings, rendered)]

    def _labelled(self, encoding, spans, turn_ends) -> Encoded | SampleError:
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        limit, truncated = len(ids), False
        if len(ids) > self.settings.max_seq_length:
            # cut after the last whole assistant turn that fits (its "\n" included)
            cuts = [int(np.searchsorted(offsets[:, 1], span_end + 1, side="right")) for _, span_end in spans]
            fitting = [c for c in cuts if c <= self.settings.max_seq_length]
            if not fitting:
                return SampleError("too_long", f"{len(ids)} tokens; the first assistant turn ends at token {cuts[0]}, "
                                               f"beyond --max_seq_length {self.settings.max_seq_length}")
            limit, truncated = fitting[-1], True
            spans = spans[:len(fitting)]
        if self.settings.train_on == "last_assistant":
            spans = spans[-1:]
        ids, offsets = ids[:limit], offsets[:limit]
        labels = np.where(trained_mask(offsets, spans), ids, IGNORE_INDEX).astype(np.int32)
        return Encoded(ids, labels, truncated)


# ------------------------------------------------------------------------------- a whole set


@dataclass
class ChatStats:
    """What data preparation kept, skipped (per reason, first few places) and truncated."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # [{"reason", "where", "detail"}], first 3 per reason
    formats: dict = field(default_factory=dict)  # file -> format

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            self.examples.append({"reason": reason, "where": where, "detail": detail})

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "skipped": dict(self.skipped), "examples": self.examples,
                "formats": self.formats}


def summary_lines(stats: dict) -> list[str]:
    """What data preparation did, for the log and `trainrig inspect` (`stats`: ChatStats.to_dict(),
    as kept in the cache's meta.json)."""
    lines = [f"chat data: {stats['read']} samples read, {stats['kept']} kept, {sum(stats['skipped'].values())} skipped, "
             f"{stats['truncated']} truncated at a turn boundary; {stats['tokens']:,} tokens, {stats['trained_tokens']:,} trained "
             f"({stats['trained_tokens'] / max(stats['tokens'], 1):.1%})"]
    for reason, count in sorted(stats["skipped"].items(), key=lambda kv: -kv[1]):
        places = ", ".join(e["where"] for e in stats["examples"] if e["reason"] == reason)
        lines.append(f"  skipped {count} x {reason} ({REASONS[reason]}): first at {places}")
    return lines


STRICT_MESSAGE = "{where}: {detail} ({reason}); fix the sample, or drop --strict to skip and count such samples"
CHECKED_PER_FILE = 8  # samples per file compared with the tokenizer's own apply_chat_template


def iter_encoded(files: list[Path], chat_format: str, renderer: ChatRenderer, stats: ChatStats, strict: bool,
                 batch_size: int = 512) -> Iterator[tuple[str, Encoded]]:
    """(where, Encoded) for every kept sample of `files`, in order; problems counted in `stats`
    (or raised as a UsageError naming the sample with `strict`)."""

    def problem(where: str, err: SampleError) -> None:
        if strict:
            raise UsageError(STRICT_MESSAGE.format(where=where, detail=err, reason=err.reason))
        stats.skip(err.reason, where, str(err))

    pending: list[tuple[str, list[dict]]] = []

    def flush():
        results = renderer.encode_batch([m for _, m in pending])
        for (where, _), result in zip(pending, results):
            if isinstance(result, SampleError):
                problem(where, result)
                continue
            stats.kept += 1
            stats.truncated += result.truncated
            stats.tokens += len(result.input_ids)
            stats.trained_tokens += int((result.labels[1:] != IGNORE_INDEX).sum())
            yield where, result
        pending.clear()

    for path in files:
        file_format = None if chat_format == "auto" else chat_format
        checked = 0
        for where, record in iter_records(path):
            stats.read += 1
            if isinstance(record, SampleError):
                problem(where, record)
                continue
            if file_format is None:
                file_format = detect_format(record, where)
            stats.formats[str(path)] = file_format
            try:
                messages = to_messages(record, file_format)
                renderer.check_content(messages)
            except SampleError as err:
                problem(where, err)
                continue
            if checked < CHECKED_PER_FILE:
                renderer.check_against_template(messages, where)
                checked += 1
            pending.append((where, messages))
            if len(pending) == batch_size:
                yield from flush()
    if pending:
        yield from flush()


# ------------------------------------------------------------------------------- the cache

CHAT_CACHE_VERSION = 1  # bump when rendering or masking changes, so old caches are not reused
SAMPLES_FILE = "samples.arrow"


def ensure_chat_template(tokenizer) -> None:
    """A tokenizer without a chat template gets ChatML's, so final/ generates in the trained format."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def chat_cache_key(tokenizer, files: list[Path], chat_format: str, settings: ChatSettings) -> str:
    import hashlib

    from trainers.data.sources import fingerprint

    payload = json.dumps({
        "version": CHAT_CACHE_VERSION,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "template": getattr(tokenizer, "chat_template", None) or "", "format": chat_format,
        "settings": vars(settings), "files": fingerprint(files),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def build_chat_cache(files: list[Path], chat_format: str, renderer: ChatRenderer, strict: bool, out_dir: Path) -> dict:
    """Encode every sample into `out_dir/samples.arrow` (+ meta.json with the stats); written
    under a temporary name and renamed when complete."""
    import time

    import pyarrow as pa

    from trainers.data.packing import META_FILE, cache_build

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("where", pa.string())])
    stats = ChatStats()
    start = time.perf_counter()
    with cache_build(out_dir) as tmp_dir:
        with pa.OSFile(str(tmp_dir / SAMPLES_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            rows: dict[str, list] = {"input_ids": [], "labels": [], "where": []}

            def write():
                writer.write_batch(pa.record_batch([pa.array(rows[k], type=schema.field(k).type) for k in schema.names], schema=schema))
                for column in rows.values():
                    column.clear()

            for where, encoded in iter_encoded(files, chat_format, renderer, stats, strict):
                rows["input_ids"].append(encoded.input_ids)
                rows["labels"].append(encoded.labels)
                rows["where"].append(where)
                if len(rows["where"]) == 2048:
                    write()
            if rows["where"]:
                write()
        seconds = time.perf_counter() - start
        meta = {"version": CHAT_CACHE_VERSION, **stats.to_dict(), "system_prompt": renderer.system_prompt,
                "files": [str(f) for f in files], "seconds": round(seconds, 3),
                "samples_per_s": round(stats.read / max(seconds, 1e-9))}
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


class ChatDataset:
    """Memory-mapped encoded samples; item i is `{"input_ids", "labels" (int64 arrays), "index": i}`."""

    def __init__(self, path: Path):
        import pyarrow as pa

        from trainers.data.packing import META_FILE

        self.path = path
        self.meta = json.loads((path / META_FILE).read_text())
        table = pa.ipc.open_stream(pa.memory_map(str(path / SAMPLES_FILE))).read_all()
        self._where = table.column("where")
        self._chunks = []  # per Arrow chunk: (offsets, ids values, labels values), zero-copy
        for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks):
            if len(ids):
                self._chunks.append((ids.offsets.to_numpy(), ids.values.to_numpy(), labels.values.to_numpy()))
        self._starts = np.cumsum([0] + [len(c[0]) - 1 for c in self._chunks])
        self.lengths = np.concatenate([np.diff(c[0]) for c in self._chunks]) if self._chunks else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        chunk = int(np.searchsorted(self._starts, i, side="right") - 1)
        offsets, ids, labels = self._chunks[chunk]
        j = i - self._starts[chunk]
        lo, hi = offsets[j], offsets[j + 1]
        return {"input_ids": ids[lo:hi].astype(np.int64), "labels": labels[lo:hi].astype(np.int64), "index": int(i)}

    def where(self, i: int) -> str:
        return self._where[i].as_py()


def prepare_chat(patterns: list[str], flag: str, tokenizer, settings: ChatSettings, chat_format: str, strict: bool,
                 cache_dir: str, build: bool, tokenizer_flag: str = "--model_name_or_path") -> ChatDataset:
    """The encoded samples of these chat files, from the cache or built now (build=True: rank 0;
    the other ranks open what rank 0 wrote). The stats summary is logged when built."""
    import logging

    from trainers.data.packing import META_FILE, cache_root
    from trainers.data.sources import resolve_files

    log = logging.getLogger("trainrig.data")
    files = resolve_files(patterns, flag)
    renderer = ChatRenderer(tokenizer, settings, tokenizer_flag)
    path = cache_root(cache_dir, "chat") / chat_cache_key(tokenizer, files, chat_format, settings)
    if not (path / META_FILE).is_file():
        if not build:
            raise RuntimeError(f"chat cache {path} missing after rank 0 built it; is --data_cache_dir on a filesystem all nodes share?")
        meta = build_chat_cache(files, chat_format, renderer, strict, path)
        for line in summary_lines(meta):
            log.info("%s", line)
        log.info("rendered and masked %d samples in %.1f s (%s samples/s) -> %s",
                 meta["read"], meta["seconds"], f"{meta['samples_per_s']:,}", path)
    dataset = ChatDataset(path)
    if strict and dataset.meta["skipped"]:  # a cache built without --strict: its first problem is the first bad sample
        first = dataset.meta["examples"][0]
        raise UsageError(STRICT_MESSAGE.format(**first))
    if len(dataset) == 0:
        skipped = ", ".join(f"{n} x {r}" for r, n in dataset.meta["skipped"].items()) or "the files are empty"
        raise UsageError(f"{flag} {' '.join(patterns)}: no trainable sample ({skipped}); see the reasons above or run "
                         f"`trainrig inspect sft` with these flags")
    return dataset
