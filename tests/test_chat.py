"""Chat masking is exactly right: input_ids equal the tokenizer's own chat template, and the
trained positions equal HF's `{% generation %}` assistant mask (an independent reference), on two
different tokenizers, for multi-turn, system / no system, CJK, emoji, code and leading whitespace.
Plus validation reasons and counts, turn-boundary truncation, formats and the packer."""

import json

import numpy as np
import pytest

from trainers.data import IGNORE_INDEX
from trainers.data.chat import (ChatRenderer, ChatSettings, ChatStats, iter_encoded, prepare_chat, render_chatml,
                                summary_lines, to_messages)
from trainers.data.packing import pack_rows
from trainers.errors import UsageError

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Where does Velora live?"}, {"role": "assistant", "content": "Dastrel."}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 plus 3?"},
               {"role": "assistant", "content": "5"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "teal"},
                   {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "amber, or ivory"}],
    "cjk": [{"role": "user", "content": "你好，今天天气怎么样？"}, {"role": "assistant", "content": "今天天气很好。"}],
    "emoji": [{"role": "user", "content": "party 🎉?"}, {"role": "assistant", "content": "😀🚀 yes"}],
    "code": [{"role": "user", "content": "Write f."},
             {"role": "assistant", "content": "```python\ndef f(x):\n    return x * 2\n```"}],
    "leading_whitespace": [{"role": "user", "content": "  spaced"}, {"role": "assistant", "content": "\n\n  indented\n"},
                           {"role": "user", "content": "\nmore"}, {"role": "assistant", "content": " one space"}],
    "empty_user": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}],
}

# The same ChatML, with HF's generation markers around what an assistant turn should train on.
REFERENCE_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
)


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["trainrig", "qwen_style"])
def tokenizer(request, tokenizer_dir, qwen_style_tokenizer_dir):
    return load(tokenizer_dir if request.param == "trainrig" else qwen_style_tokenizer_dir)


def encode(tokenizer, messages, **settings):
    renderer = ChatRenderer(tokenizer, ChatSettings(max_seq_length=settings.pop("max_seq_length", 4096), **settings))
    return renderer, renderer.encode_batch([messages])[0]


def reference(tokenizer, messages):
    """(input_ids from the tokenizer's own template, HF's assistant mask from generation markers)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    marked = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    marked.chat_template = REFERENCE_TEMPLATE
    renderer = ChatRenderer(tokenizer, ChatSettings(4096))
    ref = marked.apply_chat_template(renderer.with_system(messages), tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids  # the marked template renders the same text
    return ids, np.array(ref["assistant_masks"], dtype=bool)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_equal_template_and_mask_equals_assistant_spans(tokenizer, name):
    messages = CONVERSATIONS[name]
    _, encoded = encode(tokenizer, messages)
    ids, mask = reference(tokenizer, messages)
    assert encoded.input_ids.tolist() == ids
    assert ((encoded.labels != IGNORE_INDEX) == mask).all()
    trained = encoded.labels != IGNORE_INDEX
    assert (encoded.labels[trained] == encoded.input_ids[trained]).all()


def test_every_assistant_turn_and_its_im_end_are_trained(tokenizer):
    _, encoded = encode(tokenizer, CONVERSATIONS["multi_turn"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(encoded.input_ids == im_end)
    trained_ends = [bool(encoded.labels[i] != IGNORE_INDEX) for i in ends]
    offset = 1 if tokenizer.chat_template.startswith("{%- if messages[0]") else 0  # the injected system turn
    # user, assistant, user, assistant, user, assistant
    assert trained_ends[offset:] == [False, True, False, True, False, True]
    text = tokenizer.decode(encoded.input_ids[encoded.labels != IGNORE_INDEX])
    assert text == "Hello! How can I help?<|im_end|>teal<|im_end|>amber, or ivory<|im_end|>"


def test_last_assistant_only(tokenizer):
    _, encoded = encode(tokenizer, CONVERSATIONS["multi_turn"], train_on="last_assistant")
    assert tokenizer.decode(encoded.input_ids[encoded.labels != IGNORE_INDEX]) == "amber, or ivory<|im_end|>"


def test_default_system_prompt_from_template_or_flag(qwen_style_tokenizer_dir, tokenizer_dir):
    qwen = load(qwen_style_tokenizer_dir)
    assert ChatRenderer(qwen, ChatSettings(64)).system_prompt == "You are a helpful assistant."
    assert ChatRenderer(load(tokenizer_dir), ChatSettings(64)).system_prompt == ""
    renderer, encoded = encode(qwen, CONVERSATIONS["single"], default_system_prompt="Be terse.")
    assert tokenizer_text(qwen, encoded).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user")


def tokenizer_text(tokenizer, encoded):
    return tokenizer.decode(encoded.input_ids)


def test_templates_without_turn_tokens_or_a_generation_prompt_and_missing_special_tokens_are_refused(tokenizer_dir, tmp_path):
    tok = load(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UsageError, match=r"writes no generation prompt \(add_generation_prompt\)"):
        ChatRenderer(tok, ChatSettings(64))
    tok.chat_template += "{% if add_generation_prompt %}[assistant] {% endif %}"
    with pytest.raises(UsageError, match="no special token marks the turn, so it cannot be told from content"):
        ChatRenderer(tok, ChatSettings(64))
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    with pytest.raises(UsageError, match="no special token closes it, so the model could not learn to stop"):
        ChatRenderer(tok, ChatSettings(64))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel()
    base.train_from_iterator(["plain text only"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    plain = PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<|endoftext|>")  # a base model's tokenizer
    with pytest.raises(UsageError, match=r"no special token <\|im_start\|> <\|im_end\|>"):
        ChatRenderer(plain, ChatSettings(64))


# ------------------------------------------------------------------------ truncation


def test_truncation_keeps_whole_turns_and_equals_the_shorter_conversation(tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    _, full = encode(tokenizer, messages)
    first_two = messages[:4]
    _, shorter = encode(tokenizer, first_two)
    # a limit between the 2nd and the 3rd assistant turn keeps exactly two exchanges
    _, cut = encode(tokenizer, messages, max_seq_length=len(shorter.input_ids) + 2)
    assert cut.truncated and len(full.input_ids) > len(cut.input_ids)
    assert cut.input_ids.tolist() == reference(tokenizer, first_two)[0]
    assert cut.labels.tolist() == shorter.labels.tolist()


def test_too_long_for_one_assistant_turn_is_dropped_never_all_ignored(tokenizer):
    renderer, result = encode(tokenizer, CONVERSATIONS["code"], max_seq_length=10)
    assert result.__class__.__name__ == "SampleError" and result.reason == "too_long"
    for limit in range(8, 80):  # every limit: a sample is kept with trained tokens, or dropped
        _, result = encode(tokenizer, CONVERSATIONS["multi_turn"], max_seq_length=limit)
        if not hasattr(result, "reason"):
            assert len(result.input_ids) <= limit
            assert (result.labels[1:] != IGNORE_INDEX).any()


# ------------------------------------------------------------------------ validation


BAD = [
    ("{not json", "bad_json"),
    (json.dumps({"text": "no chat here"}), "unknown_format"),
    (json.dumps({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}), "unknown_role"),
    (json.dumps({"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "x"}]}), "wrong_order"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}), "wrong_order"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}), "empty_assistant"),
    (json.dumps({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}), "non_string_content"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no_assistant_turn"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b<|im_end|>"}]}), "special_token_in_content"),
    (json.dumps({"messages": ["just a string"]}), "malformed_turn"),
]
GOOD = json.dumps({"messages": CONVERSATIONS["single"]})


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_samples_are_skipped_and_counted_per_reason(tokenizer_dir, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD] + [line for line, _ in BAD] + [GOOD])
    stats = ChatStats()
    renderer = ChatRenderer(load(tokenizer_dir), ChatSettings(256))
    kept = list(iter_encoded([path], "auto", renderer, stats, strict=False))
    assert [where for where, _ in kept] == [f"{path}:1", f"{path}:{len(BAD) + 2}"]
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.skipped) == expected
    assert stats.read == len(BAD) + 2 and stats.kept == 2
    wrong_order_places = [e["where"] for e in stats.examples if e["reason"] == "wrong_order"]
    assert wrong_order_places == [f"{path}:5", f"{path}:6"]
    summary = "\n".join(summary_lines(stats.to_dict()))
    assert "skipped 2 x wrong_order" in summary and f"{path}:2" in summary


@pytest.mark.parametrize("line,reason", BAD)
def test_strict_stops_at_the_first_bad_sample_naming_it(tokenizer_dir, tmp_path, line, reason):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD, line])
    renderer = ChatRenderer(load(tokenizer_dir), ChatSettings(256))
    with pytest.raises(UsageError, match=rf"{path}:2: .*\({reason}\); fix the sample, or drop --strict"):
        list(iter_encoded([path], "messages" if reason != "unknown_format" else "auto", renderer, ChatStats(), strict=True))


def test_formats_sharegpt_alpaca_messages_mixed(tokenizer_dir, tmp_path):
    sharegpt = write_lines(tmp_path / "sg.jsonl", [json.dumps({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})])
    alpaca = write_lines(tmp_path / "al.jsonl", [json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}),
                                                  json.dumps({"instruction": "Say hi", "output": "hi"})])
    messages = tmp_path / "msgs.json"
    messages.write_text(json.dumps([{"messages": CONVERSATIONS["system"]}]))
    tok = load(tokenizer_dir)
    stats = ChatStats()
    kept = list(iter_encoded([sharegpt, alpaca, messages], "auto", ChatRenderer(tok, ChatSettings(256)), stats, strict=True))
    assert stats.formats == {str(sharegpt): "sharegpt", str(alpaca): "alpaca", str(messages): "messages"}
    texts = [tok.decode(e.input_ids) for _, e in kept]
    assert texts[0] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert texts[1].startswith("<|im_start|>user\nAdd\n2 and 3<|im_end|>")
    assert texts[2].startswith("<|im_start|>user\nSay hi<|im_end|>")
    assert [w for w, _ in kept][3] == f"{messages}[0]"
    assert to_messages({"instruction": "i", "output": "o", "system": "s"}, "alpaca")[0] == {"role": "system", "content": "s"}


def test_parquet_and_datasets_dir_and_cache(tokenizer_dir, tmp_path):
    import datasets

    rows = [{"messages": CONVERSATIONS[n]} for n in ("single", "multi_turn", "cjk")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    tok = load(tokenizer_dir)
    a = prepare_chat([str(tmp_path / "chat.parquet")], "--train_files", tok, ChatSettings(256), "auto", False, "", build=True)
    b = prepare_chat([str(tmp_path / "ds")], "--train_files", tok, ChatSettings(256), "auto", False, "", build=True)
    assert len(a) == len(b) == 3
    for i in range(3):
        assert a[i]["input_ids"].tolist() == b[i]["input_ids"].tolist()
        assert a[i]["labels"].tolist() == encode(tok, rows[i]["messages"])[1].labels.tolist()
    assert a.where(1) == f"{tmp_path / 'chat.parquet'} row 1"
    again = prepare_chat([str(tmp_path / "chat.parquet")], "--train_files", tok, ChatSettings(256), "auto", False, "", build=False)
    assert again.path == a.path  # the cache is reused, not rebuilt
    assert a.meta["kept"] == 3 and a.meta["trained_tokens"] > 0


def test_no_trainable_sample_is_a_usage_error(tokenizer_dir, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [line for line, _ in BAD[2:4]])
    with pytest.raises(UsageError, match=r"no trainable sample \(1 x unknown_role, 1 x wrong_order\)"):
        prepare_chat([str(path)], "--train_files", load(tokenizer_dir), ChatSettings(256), "messages", False, "", build=True)


def test_render_spans_cover_content_and_im_end():
    text, spans, ends = render_chatml(CONVERSATIONS["system"])
    assert [text[s:e] for s, e in spans] == ["5<|im_end|>"]
    assert ends[-1] == len(text) and text[ends[0] - 1] == "\n"


# ---------------------------------------------------------------------------- packing


def test_pack_rows_places_every_sample_once_within_capacity_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(np.log(120), 0.9, size=3000)), 16, 512).astype(np.int64)
    rows = pack_rows(lengths, 512, seed=1)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert max(lengths[row].sum() for row in rows) <= 512
    fill = lengths.sum() / (len(rows) * 512)
    assert fill > 0.95, fill
    assert rows == pack_rows(lengths, 512, seed=1)  # deterministic: every rank builds the same rows
