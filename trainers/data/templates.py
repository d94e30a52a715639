"""Any chat template a tokenizer ships, rendered by the template itself and masked exactly.

trainrig does not re-implement a model's template. A conversation is rendered once, whole, by
`apply_chat_template(tokenize=False)`, and what to train is found in that text from the
template's shape, read once per tokenizer by rendering four small probe conversations:

  header        what the template writes before an assistant turn, and what its generation
                prompt starts with: `<|im_start|>assistant\\n` (Qwen),
                `<|start_header_id|>assistant<|end_header_id|>\\n\\n` (Llama 3), `<｜Assistant｜>`;
  end           the first special token after an assistant's text (`<|im_end|>`, `<|eot_id|>`) and
                what follows it (`\\n`): a truncated sample is cut after both;
  reasoning     the markers the template puts around `reasoning_content` (Qwen3: `<think>\\n` and
                `\\n</think>\\n\\n`), or `<think>`/`</think>` written in the content when it renders none;
  prompt_extra  what the generation prompt writes past the header for the chosen
                --enable_thinking (Qwen3 with thinking off: `<think>\\n\\n</think>\\n\\n`). The model
                is given it at inference, so it is not trained where a turn starts with it.

In the rendered text an assistant turn starts after each header and ends with the first end token
after it. The header holds a special token and a sample whose content holds one is skipped, so
every header found is the template's own; their number must equal the assistant turns'. The turn's
characters, less the reasoning blocks --train_on_reasoning leaves out, are trained, and so is every
token overlapping them: the rule HF applies to `{% generation %}` spans.

Why not render prefixes (messages[:i]) and diff them: Qwen3's template renders a turn's reasoning
only when no user message follows it, so a prefix's rendering is not a prefix of the whole one.
One rendering of the whole conversation is exactly what the model is trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainers.errors import UsageError

# Probe texts: short, and unlike anything a template writes itself.
PROBE_USER, PROBE_ANSWER, PROBE_REASONING = "Qz7", "Az7", "Rz7"
PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_z7", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}
PROBE_CALL = {"type": "function", "function": {"name": "probe_call_z7", "arguments": {}}}
DEFAULT_THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class TemplateShape:
    """What a chat template writes around an assistant turn (see the module docstring)."""

    header: str
    end: str
    after_end: str
    prompt_extra: str
    think_open: str
    think_close: str
    think_trail: str  # whitespace the template writes after the closing marker
    renders_reasoning: bool  # reasoning_content appears in the rendering
    renders_tools: bool  # a record's `tools` appear in it
    renders_tool_calls: bool  # an assistant's `tool_calls` appear in it
    structure_tokens: tuple  # the special tokens of the header and the end, e.g. for LoRA's trainable rows


@dataclass
class Rendered:
    """One conversation as the template renders it, with character offsets into `text`."""

    text: str
    spans: list  # (start, end) per assistant turn: what it writes after the header, through its end token
    cuts: list  # where each assistant turn's rendering ends (after `after_end`): truncation points
    reasoning: list  # per assistant turn: (start, end, has_text) of its reasoning block at the span's start, or None


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _named(tokenizer, flag: str) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return f"{flag} {name}" if name else flag


def template_shape(tokenizer, specials: re.Pattern, thinking: dict, flag: str = "--model_name_or_path") -> TemplateShape:
    """Read the shape from the template's own renderings; `thinking` is {} or {"enable_thinking": bool}.
    A template trainrig cannot find assistant turns in exits 2 naming what is missing."""
    where = f"{_named(tokenizer, flag)}: its chat template"
    user = [{"role": "user", "content": PROBE_USER}]
    answer = {"role": "assistant", "content": PROBE_ANSWER}
    try:
        before = _render(tokenizer, user)
        whole = _render(tokenizer, user + [answer])
        prompt = _render(tokenizer, user, add_generation_prompt=True)
        prompt_now = _render(tokenizer, user, add_generation_prompt=True, **thinking)
    except Exception as err:  # a template raising on user -> assistant cannot train a chat model
        raise UsageError(f"{where} fails on a plain user/assistant exchange ({type(err).__name__}: {err}); "
                         f"fix chat_template in its tokenizer_config.json (or chat_template.jinja)") from None
    if not whole.startswith(before) or not prompt.startswith(before) or not prompt_now.startswith(before):
        raise UsageError(f"{where} renders the user turn differently once an answer follows ({before!r} vs {whole!r}); "
                         f"trainrig needs the assistant turn appended after it")
    turn, generation = whole[len(before):], prompt[len(before):]
    if not generation:
        raise UsageError(f"{where} writes no generation prompt (add_generation_prompt): trainrig finds the assistant turns "
                         f"by it, and generation needs it; add one to the template")
    answer_at = turn.find(PROBE_ANSWER)
    header = _common_prefix(generation, turn[:answer_at])
    if not header or not specials.search(header):
        raise UsageError(f"{where} starts an assistant turn with {turn[:answer_at]!r} and its generation prompt is "
                         f"{generation!r}: no special token marks the turn, so it cannot be told from content; "
                         f"use a template whose role headers are special tokens (e.g. ChatML's <|im_start|>)")
    tail = turn[answer_at + len(PROBE_ANSWER):]
    end = specials.search(tail)
    if not end:
        raise UsageError(f"{where} ends an assistant turn with {tail!r}: no special token closes it, so the model could "
                         f"not learn to stop; use a template that closes turns with one (e.g. <|im_end|>, <|eot_id|>)")
    now = prompt_now[len(before):]
    if not now.startswith(header):
        raise UsageError(f"{where}: with {thinking} the generation prompt is {now!r}, not starting with the header {header!r}")
    reasoning = _reasoning_markers(tokenizer, user, header, where)
    structure = tuple(dict.fromkeys(specials.findall(header) + [end.group()]))
    return TemplateShape(header=header, end=end.group(), after_end=tail[end.end():], prompt_extra=now[len(header):],
                         think_open=reasoning[0], think_close=reasoning[1], think_trail=reasoning[2],
                         renders_reasoning=reasoning[3],
                         renders_tools=_renders(tokenizer, user + [answer], "probe_tool_z7", tools=[PROBE_TOOL]),
                         renders_tool_calls=_renders(tokenizer, user + [{"role": "assistant", "content": "",
                                                                          "tool_calls": [PROBE_CALL]}], "probe_call_z7"),
                         structure_tokens=structure)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _renders(tokenizer, messages, needle: str, **kwargs) -> bool:
    try:
        return needle in _render(tokenizer, messages, **kwargs)
    except Exception:  # a template that raises on tools does not render them
        return False


def _reasoning_markers(tokenizer, user, header: str, where: str) -> tuple[str, str, str, bool]:
    """(opening marker, closing marker, whitespace after it, rendered?) from a turn with reasoning_content."""
    turn = {"role": "assistant", "content": PROBE_ANSWER, "reasoning_content": PROBE_REASONING}
    try:
        text = _render(tokenizer, user + [turn])
    except Exception:
        text = ""
    if PROBE_REASONING not in text:
        return (*DEFAULT_THINK, "", False)
    text = text[text.index(header) + len(header):]
    at = text.index(PROBE_REASONING)
    opening, closing = text[:at], text[at + len(PROBE_REASONING):text.index(PROBE_ANSWER)]
    if not opening.strip() or not closing.strip():
        raise UsageError(f"{where} renders reasoning_content without markers around it ({text!r}), so reasoning cannot "
                         f"be told from the answer; use a template that wraps it (e.g. <think>...</think>)")
    return opening.strip(), closing.strip(), closing[len(closing.rstrip()):], True


def render_conversation(tokenizer, shape: TemplateShape, messages: list[dict], tools, thinking: dict,
                        where: str = "this sample") -> Rendered:
    """The template's rendering of one validated conversation, with its assistant turns found.
    A template that renders an assistant turn without the header or the end token exits 2."""
    kwargs = {"tools": tools} if tools else {}
    text = _render(tokenizer, messages, **kwargs, **thinking)
    starts = [m.end() for m in re.finditer(re.escape(shape.header), text)]
    assistants = sum(m["role"] == "assistant" for m in messages)
    if len(starts) != assistants:
        raise UsageError(f"{where}: the chat template writes the assistant header {shape.header!r} {len(starts)} time(s) for "
                         f"{assistants} assistant turn(s) in {text[:160]!r}...; trainrig cannot tell which text is the "
                         f"model's. Fix the template, or report it with this sample")
    spans, cuts, reasoning = [], [], []
    for k, start in enumerate(starts):
        limit = starts[k + 1] if k + 1 < len(starts) else len(text)
        if shape.prompt_extra and text.startswith(shape.prompt_extra, start):
            start += len(shape.prompt_extra)  # the generation prompt writes it: the model is given it
        end = text.find(shape.end, start, limit)
        if end < 0:
            raise UsageError(f"{where}: the chat template ends an assistant turn without {shape.end!r}: {text[start:limit][:160]!r}")
        end += len(shape.end)
        spans.append((start, end))
        cuts.append(end + len(shape.after_end) if text.startswith(shape.after_end, end) else end)
        reasoning.append(_reasoning_block(text, shape, start, end))
    return Rendered(text, spans, cuts, reasoning)


def _reasoning_block(text: str, shape: TemplateShape, start: int, end: int) -> tuple[int, int, bool] | None:
    if not text.startswith(shape.think_open, start):
        return None
    close = text.find(shape.think_close, start + len(shape.think_open), end)
    if close < 0:
        return None
    block_end = close + len(shape.think_close)
    if shape.think_trail and text.startswith(shape.think_trail, block_end):
        block_end += len(shape.think_trail)
    return start, block_end, bool(text[start + len(shape.think_open):close].strip())


def split_reasoning(text: str, shape: TemplateShape) -> tuple[str, str]:
    """(answer, reasoning) of a generated turn. The reasoning is what the model wrote up to the
    closing marker (the opening one may be in the prompt, as DeepSeek-R1's writes it); a turn that
    ran out of tokens inside its reasoning has no answer. EM/F1 score the answer alone."""
    if shape.think_close in text:
        reasoning, answer = text.split(shape.think_close, 1)
        return answer.strip(), reasoning.replace(shape.think_open, "", 1).strip()
    if text.lstrip().startswith(shape.think_open):
        return "", text.lstrip()[len(shape.think_open):].strip()
    return text.strip(), ""
