"""Chat samples -> `input_ids` + `labels` with assistant-only loss, rendered by the model's own
chat template and masked exactly.

Formats in (`--chat_format auto` decides per file from its first record):
  messages   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}], "tools": [...]}  (OpenAI style)
  sharegpt   {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": "..."}], "tools": ...}
  alpaca     {"instruction": "...", "input": "...", "output": "..."} (+ optional "system")

An assistant turn may carry `reasoning_content` (also read from `reasoning` or `thinking`, or
written in its content as <think>...</think>) and `tool_calls` (OpenAI form; JSON-string arguments
are parsed); `tool` turns are results. A content may be a list of text parts, joined with newlines;
image, audio and video parts are refused (multimodal training is not supported). `tools` (OpenAI
function schemas, or a JSON string of them) go to the template.

Two ways to render, one result: the `input_ids` of `apply_chat_template(tokenize=True)`.
- Plain ChatML conversations (system/user/assistant text only) under a template that renders
  ChatML (Qwen2.5's, trainrig's own) are rendered here, `<|im_start|>{role}\n{content}<|im_end|>\n`
  per turn, with the assistant spans known as they are written: the fast path, checked against
  the template on the first samples of every file.
- Everything else (any other template; tools, tool calls, tool results, reasoning) is rendered by
  the template itself, and its assistant spans are found as trainers/data/templates.py describes.
Either way the whole text is tokenised in one piece (content starting with spaces or newlines,
CJK and emoji tokenise as the template's own route does), and a token is trained when its
character offsets overlap an assistant span: what the model writes after the turn's header,
through the special token that ends the turn, so it learns to stop. Reasoning blocks inside a span
are trained or not by --train_on_reasoning; text the template drops (Qwen3 drops the reasoning of
turns before the last user message) is never trained, and counted. Tool results are not trained.

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
PLAIN_ROLES = frozenset(ROLES)
MESSAGE_ROLES = {r: r for r in ROLES + ("tool",)}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # what datasets call it; templates read reasoning_content
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")

# Why a sample is skipped (the key is what the summary and `trainrig inspect` print).
REASONS = {
    "bad_json": "not valid JSON",
    "unknown_format": "no messages / conversations / instruction+output fields for this file's format",
    "malformed_turn": "a turn is not an object with role/content (from/value)",
    "unknown_role": "a role other than system, user, assistant, tool (sharegpt: system, human, gpt, function_call, observation)",
    "wrong_order": "turns not in the order [system] user assistant (user assistant)*, tool results aside, ending with assistant",
    "non_string_content": "a content that is neither a string nor a list of text parts",
    "multimodal_content": "an image, audio or video part: multimodal training is not supported",
    "malformed_tools": "'tools' is not a list of function schemas (objects with a name)",
    "malformed_tool_call": "a tool call without a function name, or with arguments that are not a JSON object",
    "tool_result_without_call": "a tool result that does not follow an assistant turn's tool calls",
    "unanswered_tool_call": "an assistant's tool calls not each followed by a tool result before the next turn",
    "tools_not_rendered": "the sample has tools or tool calls, and the chat template does not render them",
    "empty_assistant": "an assistant turn with empty content and no tool calls",
    "no_assistant_turn": "no assistant turn to train on",
    "special_token_in_content": "content contains a special token's text, e.g. <|im_end|> (it would forge a turn boundary or an EOS)",
    "too_long": "not even the first assistant turn fits in --max_seq_length",
}


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Conversation:
    """Validated turns (role, content and, where given, reasoning_content, tool_calls, name,
    tool_call_id) and the record's tools (None when it has none)."""

    messages: list
    tools: list | None = None

    @property
    def plain(self) -> bool:
        """Only system/user/assistant text: what the ChatML fast path renders."""
        return self.tools is None and plain_turns(self.messages)


def plain_turns(messages: list[dict]) -> bool:
    """Every turn is role + text content, and the role system, user or assistant."""
    for m in messages:
        if len(m) != 2 or m["role"] not in PLAIN_ROLES:
            return False
    return True


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


def to_conversation(record, chat_format: str) -> Conversation:
    """One record in `chat_format` -> a validated Conversation (SampleError otherwise)."""
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
        tools = None
    else:
        key = "messages" if chat_format == "messages" else "conversations"
        turns = record.get(key)
        if not isinstance(turns, list):
            raise SampleError("unknown_format", f"no '{key}' list (found {list(record)[:6]})")
        messages = [normalize_turn(t, i, chat_format) for i, t in enumerate(turns)]
        tools = normalize_tools(record.get("tools"))
    validate_messages(messages)
    return Conversation(messages, tools)


def to_messages(record, chat_format: str) -> list[dict]:
    """One record's validated turns (its tools aside)."""
    return to_conversation(record, chat_format).messages


def normalize_turn(turn, index: int, chat_format: str) -> dict:
    """A turn of either style (ShareGPT files often use role/content too, and vice versa), with
    its content joined to a string and its reasoning and tool calls in the form templates read."""
    if not isinstance(turn, dict):
        raise SampleError("malformed_turn", f"turn {index} is a {type(turn).__name__}, not an object")
    if "role" in turn and ("content" in turn or "tool_calls" in turn):
        role, content = turn["role"], turn.get("content")
    elif "from" in turn and "value" in turn:
        role, content = turn["from"], turn["value"]
    else:
        raise SampleError("malformed_turn", f"turn {index} has no role/content (or from/value): {list(turn)[:4]}")
    names = SHAREGPT_ROLES if chat_format == "sharegpt" or "from" in turn else MESSAGE_ROLES
    if role not in names:
        raise SampleError("unknown_role", f"turn {index} has role {role!r}; use one of {', '.join(names)}")
    if role == "function_call":  # ShareGPT's tool call turn: its value is the call(s) as JSON
        return {"role": "assistant", "content": "", "tool_calls": normalize_tool_calls(_json_value(content, index), index)}
    message = {"role": names[role], "content": _text(content, index, names[role], "tool_calls" in turn)}
    if message["role"] == "assistant":
        reasoning = next((turn[k] for k in REASONING_KEYS if turn.get(k) is not None), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise SampleError("non_string_content", f"turn {index} (assistant) reasoning is {type(reasoning).__name__}, not a string")
            if reasoning.strip():
                message["reasoning_content"] = reasoning
        if turn.get("tool_calls"):
            message["tool_calls"] = normalize_tool_calls(turn["tool_calls"], index)
    elif message["role"] == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
    return message


def _text(content, index: int, role: str, has_calls: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and has_calls:
        return ""  # OpenAI's assistant turn that only calls tools
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            kind = part.get("type", "text")
            if kind in MEDIA_PARTS or any(k in part for k in MEDIA_PARTS):
                raise SampleError("multimodal_content", f"turn {index} ({role}) has a {kind!r} part; only text is supported")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise SampleError("non_string_content", f"turn {index} ({role}) has a part {list(part)[:3]} that is not text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise SampleError("non_string_content", f"turn {index} ({role}) content is {type(content).__name__}, not a string or text parts")


def _json_value(value, index: int):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise SampleError("malformed_tool_call", f"turn {index}: {value[:60]!r} is not JSON") from None
    return value


def normalize_tool_calls(calls, index: int) -> list[dict]:
    """[{"type": "function", "function": {"name", "arguments": {...}}}]: the form HF documents
    for templates; bare {"name", "arguments"} calls are wrapped, JSON-string arguments parsed."""
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise SampleError("malformed_tool_call", f"turn {index}: a tool call without a function name ({str(call)[:60]})")
        arguments = _json_value(function.get("arguments", function.get("parameters", {})), index)
        if not isinstance(arguments, dict):
            raise SampleError("malformed_tool_call", f"turn {index}: {name}'s arguments are not a JSON object")
        normalized = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normalized["id"] = call["id"]
        out.append(normalized)
    return out


def normalize_tools(tools) -> list[dict] | None:
    """A record's tools as OpenAI function schemas ({"type": "function", "function": {...}}), or None."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise SampleError("malformed_tools", f"'tools' is a string that is not JSON: {tools[:60]!r}") from None
    if not isinstance(tools, list):
        raise SampleError("malformed_tools", f"'tools' is a {type(tools).__name__}, not a list")
    out = []
    for tool in tools:
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise SampleError("malformed_tools", f"a tool without a name: {str(tool)[:60]}")
        out.append({"type": "function", "function": schema})
    return out or None


def validate_messages(messages: list[dict]) -> None:
    """[system] user assistant (user assistant)*, where an assistant turn with k tool calls is
    followed by k tool results and then by the assistant's next turn; the last turn is the
    assistant's; no empty assistant turn."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise SampleError("no_assistant_turn", f"roles {roles}: no assistant turn")
    order = f"roles {roles}; expected [system] user assistant (user assistant)..., ending with assistant"
    previous, pending = None, 0  # the role before, and tool calls still awaiting their results
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "tool":
            if not pending:
                raise SampleError("tool_result_without_call", f"turn {i} is a tool result with no tool call before it awaiting one")
            pending -= 1
        elif pending:
            raise SampleError("unanswered_tool_call", f"turn {i} ({role}) comes while {pending} tool call(s) of the assistant "
                                                      f"turn before have no result")
        elif role == "system" and i or role == "user" and previous not in (None, "system", "assistant") \
                or role == "assistant" and previous not in ("user", "tool"):
            raise SampleError("wrong_order", order)
        if role == "assistant":
            pending = len(m.get("tool_calls", ()))
            if not m["content"].strip() and not pending:
                raise SampleError("empty_assistant", f"turn {i} (assistant) is empty")
        previous = role
    if previous != "assistant":
        raise SampleError("wrong_order", order)


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


TRAIN_ON_REASONING = ("all", "last", "none")


@dataclass
class ChatSettings:
    max_seq_length: int
    train_on: str = "all_assistant"  # or last_assistant
    default_system_prompt: str = ""
    train_on_reasoning: str = "all"  # reasoning blocks the template renders: all, the last assistant turn's, none
    enable_thinking: str = "template"  # "template": its own default; "true"/"false": passed to it as enable_thinking

    def thinking(self) -> dict:
        """The template keyword for enable_thinking ({} to leave the template's default)."""
        return {} if self.enable_thinking == "template" else {"enable_thinking": self.enable_thinking == "true"}


def chat_settings(data) -> ChatSettings:
    """The ChatSettings of an SFT data config (SFTDataConfig)."""
    return ChatSettings(data.max_seq_length, data.train_on, data.default_system_prompt, data.train_on_reasoning, data.enable_thinking)


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where untrained (unshifted: the model shifts)
    truncated: bool
    notes: Counter | None = None  # turns by kind (NOTE_LINES' keys), for the summary; None: plain text turns only


# What the summary says about the turns of the kept samples (Encoded.notes' keys).
NOTE_LINES = {
    "reasoning_trained": "assistant turns with their reasoning trained",
    "reasoning_context": "with their reasoning rendered but not trained (--train_on_reasoning)",
    "reasoning_dropped": "whose reasoning the chat template does not render (never trained; Qwen3's keeps only the turns after the last user message)",
    "tool_calls": "assistant turns with tool calls (trained)",
    "tool_results": "tool results (never trained)",
}


class ChatRenderer:
    """Renders conversations for one tokenizer's chat template and turns batches of them into ids
    and labels (the module docstring says how)."""

    def __init__(self, tokenizer, settings: ChatSettings, tokenizer_flag: str = "--model_name_or_path"):
        from trainers.data.templates import template_shape

        self.tokenizer, self.settings, self.flag = tokenizer, settings, tokenizer_flag
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        # the tokenizer turns these texts into special tokens wherever they appear
        self._specials = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        ensure_chat_template(tokenizer)
        self.thinking = settings.thinking()
        if self.thinking and "enable_thinking" not in tokenizer.chat_template:
            raise UsageError(f"--enable_thinking {settings.enable_thinking}: the chat template of {tokenizer_flag} "
                             f"{getattr(tokenizer, 'name_or_path', '')} does not read enable_thinking; drop the flag")
        template_system = self._chatml_default_system()
        self.chatml = template_system is not None and not self.thinking  # the fast path renders these
        if self.chatml:
            vocab = tokenizer.get_vocab()
            missing = [t for t in (IM_START, IM_END) if t not in vocab or t not in specials]
            if missing:
                raise UsageError(f"{tokenizer_flag} {getattr(tokenizer, 'name_or_path', '')}: the tokenizer has no special "
                                 f"token {' '.join(missing)}, which its ChatML template writes; add them as special tokens "
                                 f"(tokenizer/train.py's tokenizers have them)")
        self.shape = template_shape(tokenizer, self._specials, self.thinking, tokenizer_flag)
        # the fast path writes the template's default system prompt itself; the template path lets the template do it
        self.system_prompt = settings.default_system_prompt or (template_system or "")

    def check_content(self, conversation: Conversation | list[dict]) -> None:
        """Special-token text anywhere the sample's own text goes: content, reasoning, tool calls, tools."""
        messages, tools = (conversation.messages, conversation.tools) if isinstance(conversation, Conversation) else (conversation, None)
        for i, m in enumerate(messages):
            for key, value in m.items():
                if key == "role":
                    continue
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                found = self._specials.search(text)
                if found:
                    raise SampleError("special_token_in_content", f"turn {i} ({m['role']}) {key} contains {found.group()!r}")
        if tools:
            found = self._specials.search(json.dumps(tools, ensure_ascii=False))
            if found:
                raise SampleError("special_token_in_content", f"'tools' contains {found.group()!r}")
        if tools and not self.shape.renders_tools or not self.shape.renders_tool_calls and any("tool_calls" in m for m in messages):
            raise SampleError("tools_not_rendered", "the sample has tools or tool calls, and the chat template of "
                                                    f"{self.flag} drops them; use a template with tool support (e.g. Qwen2.5's)")

    def _chatml_default_system(self) -> str | None:
        """The system prompt the template adds to a plain ChatML conversation without one ("" if
        none), or None if the template does not render plain ChatML."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            rendered = self.tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:
            return None  # template_shape reports why
        plain = render_chatml(probe)[0]
        if rendered == plain:
            return ""
        prefix = f"{IM_START}system\n"
        if rendered.startswith(prefix) and rendered.endswith(plain):
            system = rendered[len(prefix):-len(plain)]
            if system.endswith(f"{IM_END}\n") and IM_END not in system[:-len(IM_END) - 1]:
                return system[:-len(IM_END) - 1]
        return None

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def fast(self, conversation: Conversation | list[dict]) -> bool:
        """Whether the ChatML fast path renders this conversation (a list: turns without tools)."""
        if isinstance(conversation, list):
            return self.chatml and plain_turns(conversation)
        return self.chatml and conversation.plain

    def check_against_template(self, conversation: Conversation, where: str) -> bool:
        """The fast path's rendering must equal the tokenizer's own template output (the template
        path is that output); True when a comparison was made."""
        if not self.fast(conversation):
            return False
        messages = self.with_system(conversation.messages)  # an added default system prompt is part of it
        ours = render_chatml(messages)[0]
        theirs = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UsageError(f"{where}: the tokenizer's chat template renders this sample differently from ChatML at character "
                             f"{at} ({theirs[max(0, at - 20):at + 40]!r}); trainrig takes a template for ChatML when it renders "
                             f"a plain exchange as ChatML, so this one must be fixed (or made to differ on every exchange)")
        return True

    def render(self, conversation: Conversation, where: str = "this sample"):
        """(text, assistant spans, cuts, reasoning blocks, notes) for one conversation; the fast
        path gives no cuts (ChatML's: one past each span), blocks or notes (None)."""
        from trainers.data.templates import render_conversation

        if self.fast(conversation):  # cuts and notes are derived only where needed: this path is the bench's (a)
            text, spans, _ = render_chatml(self.with_system(conversation if isinstance(conversation, list) else conversation.messages))
            return text, spans, None, None, None
        if isinstance(conversation, list):
            conversation = Conversation(conversation)
        messages = conversation.messages
        if self.settings.default_system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.settings.default_system_prompt}] + messages
        rendered = render_conversation(self.tokenizer, self.shape, messages, conversation.tools, self.thinking, where)
        notes, spans = Counter(), list(rendered.spans)
        assistants = [m for m in messages if m["role"] == "assistant"]
        last = len(spans) - 1
        for k, (m, block) in enumerate(zip(assistants, rendered.reasoning)):
            notes["tool_calls"] += "tool_calls" in m
            written = m.get("reasoning_content") or (self.shape.think_close in m["content"] and m["content"])
            if block and block[2]:
                keep = self.settings.train_on_reasoning == "all" or self.settings.train_on_reasoning == "last" and k == last
                notes["reasoning_trained" if keep else "reasoning_context"] += 1
            elif written:
                notes["reasoning_dropped"] += 1
            if block and not (self.settings.train_on_reasoning == "all" or self.settings.train_on_reasoning == "last" and k == last):
                spans[k] = (block[1], spans[k][1])  # the block is context: train from the answer on
        notes["tool_results"] += sum(m["role"] == "tool" for m in messages)
        return rendered.text, spans, rendered.cuts, rendered.reasoning, +notes

    def encode_batch(self, conversations: list, wheres: list[str] | None = None) -> list[Encoded | SampleError]:
        """Conversations (validated; a Conversation or a list of turns) -> Encoded, or a
        SampleError("too_long") for each; `wheres` name them in a template error."""
        rendered = [self.render(c, w) for c, w in zip(conversations, wheres or ["this sample"] * len(conversations))]
        encodings = self.tokenizer.backend_tokenizer.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        return [self._labelled(enc, spans, cuts, notes) for enc, (_, spans, cuts, _, notes) in zip(encodings, rendered)]

    def _labelled(self, encoding, spans, cuts, notes) -> Encoded | SampleError:
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        limit, truncated = len(ids), False
        if len(ids) > self.settings.max_seq_length:
            # cut after the last whole assistant turn that fits (what the template writes after its end token included)
            cuts = cuts or [end + 1 for _, end in spans]  # ChatML's fast path: the "\n" after <|im_end|>
            ends = [int(np.searchsorted(offsets[:, 1], cut, side="right")) for cut in cuts]
            fitting = [c for c in ends if c <= self.settings.max_seq_length]
            if not fitting:
                return SampleError("too_long", f"{len(ids)} tokens; the first assistant turn ends at token {ends[0]}, "
                                               f"beyond --max_seq_length {self.settings.max_seq_length}")
            limit, truncated = fitting[-1], True
            spans = spans[:len(fitting)]
        if self.settings.train_on == "last_assistant":
            spans = spans[-1:]
        ids, offsets = ids[:limit], offsets[:limit]
        labels = np.where(trained_mask(offsets, spans), ids, IGNORE_INDEX).astype(np.int32)
        return Encoded(ids, labels, truncated, notes)


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
    notes: Counter = field(default_factory=Counter)  # turns of the kept samples by kind (NOTE_LINES' keys)

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            self.examples.append({"reason": reason, "where": where, "detail": detail})

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "skipped": dict(self.skipped), "examples": self.examples,
                "formats": self.formats, "notes": dict(self.notes)}


def summary_lines(stats: dict) -> list[str]:
    """What data preparation did, for the log and `trainrig inspect` (`stats`: ChatStats.to_dict(),
    as kept in the cache's meta.json)."""
    lines = [f"chat data: {stats['read']} samples read, {stats['kept']} kept, {sum(stats['skipped'].values())} skipped, "
             f"{stats['truncated']} truncated at a turn boundary; {stats['tokens']:,} tokens, {stats['trained_tokens']:,} trained "
             f"({stats['trained_tokens'] / max(stats['tokens'], 1):.1%})"]
    for reason, count in sorted(stats["skipped"].items(), key=lambda kv: -kv[1]):
        places = ", ".join(e["where"] for e in stats["examples"] if e["reason"] == reason)
        lines.append(f"  skipped {count} x {reason} ({REASONS[reason]}): first at {places}")
    for key, text in NOTE_LINES.items():
        if stats.get("notes", {}).get(key):
            lines.append(f"  {stats['notes'][key]:,} {text}")
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

    pending: list[tuple[str, Conversation]] = []

    def flush():
        results = renderer.encode_batch([c for _, c in pending], [w for w, _ in pending])
        for (where, _), result in zip(pending, results):
            if isinstance(result, SampleError):
                problem(where, result)
                continue
            stats.kept += 1
            stats.truncated += result.truncated
            stats.tokens += len(result.input_ids)
            stats.trained_tokens += int((result.labels[1:] != IGNORE_INDEX).sum())
            if result.notes:
                stats.notes.update(result.notes)
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
                conversation = to_conversation(record, file_format)
                renderer.check_content(conversation)
            except SampleError as err:
                problem(where, err)
                continue
            if checked < CHECKED_PER_FILE:
                checked += renderer.check_against_template(conversation, where)
            pending.append((where, conversation))
            if len(pending) == batch_size:
                yield from flush()
    if pending:
        yield from flush()


# ------------------------------------------------------------------------------- the cache

CHAT_CACHE_VERSION = 2  # bump when rendering or masking changes, so old caches are not reused
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
