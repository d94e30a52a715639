"""Chat templates beyond plain ChatML, masked exactly as the model's own template renders them.

For the real Qwen2.5, Qwen3 and Llama 3 templates (tests/chat_templates/, sources in its
README.md), on two tokenizers with different pre-splits: input_ids equal
`apply_chat_template(tokenize=True)`, and the trained positions equal HF's assistant mask from a
generation-marked copy of the same template (which renders the same text, checked here), for
reasoning (Qwen3 drops it before the last user turn), tool calls and results, and plain chats with
CJK, emoji, code and leading whitespace. Plus the data forms (content parts, ShareGPT tool turns,
reasoning field names) and the new skip reasons with their places.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from trainers.data import IGNORE_INDEX
from trainers.data.chat import ChatRenderer, ChatSettings, ChatStats, Conversation, iter_encoded, summary_lines, to_conversation
from trainers.errors import UsageError

TEMPLATES = Path(__file__).parent / "chat_templates"
THINK_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # Qwen: added, not special
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


PLAIN = {
    "multi_turn": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "teal"}],
    "cjk_emoji": [{"role": "user", "content": "你好，今天天气怎么样？ 🎉"}, {"role": "assistant", "content": "今天天气很好。😀🚀"}],
    "code": [{"role": "user", "content": "Write f."}, {"role": "assistant", "content": "```python\ndef f(x):\n    return x * 2\n```"}],
    "leading_whitespace": [{"role": "user", "content": "  spaced"}, {"role": "assistant", "content": "\n\n  indented\n"},
                           {"role": "user", "content": "\nmore"}, {"role": "assistant", "content": " one space"}],
}
TOOL_CHAIN = Conversation([
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Oslo"), call("get_time", city="Oslo")]},
    {"role": "tool", "content": '{"temp_c": -3, "sky": "snow"}'},
    {"role": "tool", "content": '{"time": "14:05"}'},
    {"role": "assistant", "content": "It is -3 °C with snow, and 14:05."},
    {"role": "user", "content": "And in 東京?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", city="東京")]},
    {"role": "tool", "content": '{"temp_c": 12, "sky": "clear"}'},
    {"role": "assistant", "content": "12 °C and clear in 東京."},
], [WEATHER, CLOCK])
REASONING = Conversation([
    {"role": "user", "content": "2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "Two plus three is five."},
    {"role": "user", "content": "Times 4?"},
    {"role": "assistant", "content": "20", "reasoning_content": "\nFive times four: 20.\n"},
])
REASONING_WITH_TOOLS = Conversation([  # the reasoning of every turn after the last user message is rendered
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.", "tool_calls": [call("get_weather", city="Oslo")]},
    {"role": "tool", "content": '{"temp_c": -3}'},
    {"role": "assistant", "content": "It is -3 °C.", "reasoning_content": "The tool says -3."},
], [WEATHER])
INLINE_THINK = Conversation([{"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "<think>\nEasy: it is Paris.\n</think>\n\nParis."}])
NO_REASONING = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def templated(base_dir, name: str, marked: bool = False):
    """A test tokenizer with the tokens a model using template `name` has, and that template."""
    tok = load(base_dir)
    if name.startswith("llama3"):
        tok.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
        tok.bos_token = "<|begin_of_text|>"
    else:
        tok.add_tokens(THINK_TOKENS)
    tok.chat_template = (TEMPLATES / f"{name}{'.generation' if marked else ''}.jinja").read_text()
    return tok


@pytest.fixture(scope="module", params=["trainrig", "qwen_style"])
def base(request, tokenizer_dir, qwen_style_tokenizer_dir):
    return tokenizer_dir if request.param == "trainrig" else qwen_style_tokenizer_dir


def reference(base_dir, name: str, conversation: Conversation, train_reasoning: str = "all", thinking: dict | None = None):
    """(input_ids of the template's own apply_chat_template, the assistant mask of its marked copy)."""
    plain, marked = templated(base_dir, name), templated(base_dir, name, marked=True)
    kwargs = {"tools": conversation.tools, **(thinking or {})}
    ids = plain.apply_chat_template(conversation.messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    assert (marked.apply_chat_template(conversation.messages, tokenize=False, train_reasoning=train_reasoning, **kwargs)
            == plain.apply_chat_template(conversation.messages, tokenize=False, **kwargs))  # the marked copy renders the same text
    ref = marked.apply_chat_template(conversation.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     train_reasoning=train_reasoning, **kwargs)
    assert ref["input_ids"] == ids
    return ids, np.array(ref["assistant_masks"], dtype=bool)


def encode(base_dir, name: str, conversation: Conversation, **settings):
    renderer = ChatRenderer(templated(base_dir, name), ChatSettings(max_seq_length=settings.pop("max_seq_length", 4096), **settings))
    return renderer, renderer.encode_batch([conversation])[0]


def assert_exact(base_dir, name, conversation, train_on_reasoning="all", enable_thinking="template"):
    renderer, encoded = encode(base_dir, name, conversation, train_on_reasoning=train_on_reasoning, enable_thinking=enable_thinking)
    ids, mask = reference(base_dir, name, conversation, train_on_reasoning, renderer.settings.thinking())
    assert encoded.input_ids.tolist() == ids
    trained = encoded.labels != IGNORE_INDEX
    assert trained.tolist() == mask.tolist(), renderer.tokenizer.decode(encoded.input_ids[trained])
    assert (encoded.labels[trained] == encoded.input_ids[trained]).all()
    return renderer, encoded


def trained_text(renderer, encoded) -> str:
    return renderer.tokenizer.decode(encoded.input_ids[encoded.labels != IGNORE_INDEX])


# --------------------------------------------------------------------- exact equality


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "llama3"])
@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_chats_equal_the_template_and_its_assistant_spans(base, template, name):
    assert_exact(base, template, Conversation(PLAIN[name]))


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3"])
def test_tool_calls_are_trained_and_tool_results_are_not(base, template):
    renderer, encoded = assert_exact(base, template, TOOL_CHAIN)
    text = trained_text(renderer, encoded)
    assert '"get_weather", "arguments": {"city": "Oslo"}' in text and '"get_time"' in text
    assert "temp_c" not in text and "14:05" not in text.replace("and 14:05.", "")  # results are context
    assert encoded.notes == {"tool_calls": 2, "tool_results": 3}
    full = renderer.tokenizer.decode(encoded.input_ids)
    assert "# Tools" in full and '"name": "get_time"' in full  # the tools went to the template's system prompt


@pytest.mark.parametrize("train_on_reasoning", ["all", "last", "none"])
def test_qwen3_reasoning_is_trained_where_rendered_and_dropped_turns_are_counted(base, train_on_reasoning):
    renderer, encoded = assert_exact(base, "qwen3", REASONING, train_on_reasoning)
    text = trained_text(renderer, encoded)
    assert "Two plus three" not in renderer.tokenizer.decode(encoded.input_ids)  # Qwen3 drops it: never trained
    assert ("Five times four: 20." in text) == (train_on_reasoning != "none")
    trained = "reasoning_trained" if train_on_reasoning != "none" else "reasoning_context"
    assert encoded.notes == {"reasoning_dropped": 1, trained: 1}


@pytest.mark.parametrize("train_on_reasoning", ["all", "last", "none"])
def test_qwen3_reasoning_after_the_last_user_turn_with_tools(base, train_on_reasoning):
    renderer, encoded = assert_exact(base, "qwen3", REASONING_WITH_TOOLS, train_on_reasoning)
    text = trained_text(renderer, encoded)
    assert ("I need the weather tool." in text) == (train_on_reasoning == "all")  # rendered for both turns
    assert ("The tool says -3." in text) == (train_on_reasoning != "none")
    assert '"get_weather"' in text and "It is -3 °C." in text


def test_qwen3_inline_think_and_empty_think_blocks(base):
    renderer, encoded = assert_exact(base, "qwen3", INLINE_THINK, "none")
    assert trained_text(renderer, encoded) == "Paris.<|im_end|>"
    renderer, encoded = assert_exact(base, "qwen3", NO_REASONING)  # the template writes an empty block: trained, as rendered
    assert trained_text(renderer, encoded) == "<think>\n\n</think>\n\nHello!<|im_end|>"
    # thinking off: the generation prompt itself writes that empty block, so the model is given it
    renderer, encoded = assert_exact(base, "qwen3", NO_REASONING, enable_thinking="false")
    assert trained_text(renderer, encoded) == "Hello!<|im_end|>"
    assert renderer.shape.prompt_extra == "<think>\n\n</think>\n\n"


def test_template_shapes(tokenizer_dir):
    from trainers.data.chat import ChatRenderer

    qwen3 = ChatRenderer(templated(tokenizer_dir, "qwen3"), ChatSettings(64)).shape
    assert (qwen3.header, qwen3.end, qwen3.after_end) == ("<|im_start|>assistant\n", "<|im_end|>", "\n")
    assert (qwen3.think_open, qwen3.think_close, qwen3.think_trail, qwen3.renders_reasoning) == ("<think>", "</think>", "\n\n", True)
    assert qwen3.renders_tools and qwen3.renders_tool_calls and qwen3.structure_tokens == ("<|im_start|>", "<|im_end|>")
    llama = ChatRenderer(templated(tokenizer_dir, "llama3"), ChatSettings(64))
    assert not llama.chatml and llama.shape.header == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert (llama.shape.end, llama.shape.renders_tools, llama.shape.renders_reasoning) == ("<|eot_id|>", False, False)
    assert llama.shape.structure_tokens == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    qwen25 = ChatRenderer(templated(tokenizer_dir, "qwen2_5"), ChatSettings(64))
    assert qwen25.chatml and qwen25.system_prompt == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_fast_path_and_template_path_agree_on_plain_chatml(base):
    """Qwen2.5's template renders plain chats as ChatML: those take the fast path; the same
    conversation through the template path gives the same ids and labels."""
    renderer, fast = encode(base, "qwen2_5", Conversation(PLAIN["multi_turn"]))
    assert renderer.fast(Conversation(PLAIN["multi_turn"]))
    renderer.chatml = False
    slow = renderer.encode_batch([Conversation(PLAIN["multi_turn"])])[0]
    assert fast.input_ids.tolist() == slow.input_ids.tolist() and fast.labels.tolist() == slow.labels.tolist()


def test_truncation_keeps_whole_turns_under_any_template(base):
    for template in ("qwen3", "llama3"):
        conversation = Conversation(PLAIN["multi_turn"])
        _, full = encode(base, template, conversation)
        _, first = encode(base, template, Conversation(PLAIN["multi_turn"][:3]))
        _, cut = encode(base, template, conversation, max_seq_length=len(full.input_ids) - 2)
        assert cut.truncated and len(cut.labels) < len(full.labels)
        assert (cut.labels != IGNORE_INDEX).any()
        if template == "llama3":  # prefix-stable: the cut is exactly the shorter conversation
            assert cut.input_ids.tolist() == first.input_ids.tolist() and cut.labels.tolist() == first.labels.tolist()


# ------------------------------------------------------------------------ data forms


def test_content_parts_sharegpt_tool_turns_and_reasoning_names():
    parts = to_conversation({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                          {"role": "assistant", "content": "c", "reasoning": "r"}]}, "messages")
    assert parts.messages == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c", "reasoning_content": "r"}]
    sharegpt = to_conversation({"conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "{\"temp_c\": 1}"},
        {"from": "gpt", "value": "1 °C"}], "tools": json.dumps([WEATHER["function"]])}, "sharegpt")
    assert sharegpt.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Oslo")]}
    assert sharegpt.messages[2]["role"] == "tool" and sharegpt.tools == [WEATHER]
    openai = to_conversation({"messages": [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "assistant", "content": "1 °C"}]}, "messages")
    assert openai.messages[1]["tool_calls"] == [{**call("get_weather", city="Oslo"), "id": "c1"}]
    assert openai.messages[2] == {"role": "tool", "content": "1", "tool_call_id": "c1"}


def user(text="q"):
    return {"role": "user", "content": text}


def assistant(text="a", **extra):
    return {"role": "assistant", "content": text, **extra}


BAD = [
    ({"messages": [user(), assistant(), {"role": "tool", "content": "x"}, assistant()]}, "tool_result_without_call"),
    ({"messages": [user(), assistant("", tool_calls=[call("f"), call("g")]), {"role": "tool", "content": "x"}, assistant()]},
     "unanswered_tool_call"),
    ({"messages": [user(), assistant("", tool_calls=[call("f")]), {"role": "tool", "content": "x"}]}, "wrong_order"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, assistant()]},
     "multimodal_content"),
    ({"messages": [user(), assistant("", tool_calls=[{"function": {"name": "f", "arguments": "[1, 2]"}}])]}, "malformed_tool_call"),
    ({"messages": [user(), assistant()], "tools": [{"description": "no name"}]}, "malformed_tools"),
    ({"messages": [user(), assistant("", tool_calls=[call("f")])], "tools": [WEATHER]}, "tools_not_rendered"),
    ({"messages": [user(), assistant("ok", reasoning_content="<|im_end|>")]}, "special_token_in_content"),
    ({"messages": [user(), assistant("")]}, "empty_assistant"),
]


def test_new_skip_reasons_are_counted_with_their_places(tokenizer_dir, tmp_path):
    good = json.dumps({"messages": [user(), assistant()]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([good] + [json.dumps(record) for record, _ in BAD]) + "\n")
    stats = ChatStats()
    kept = list(iter_encoded([path], "messages", ChatRenderer(load(tokenizer_dir), ChatSettings(256)), stats, strict=False))
    assert len(kept) == 1
    assert dict(stats.skipped) == {reason: 1 for _, reason in BAD}
    assert [e["where"] for e in stats.examples] == [f"{path}:{i + 2}" for i in range(len(BAD))]


def test_a_sample_ending_with_a_tool_call_trains_the_call(base):
    conversation = Conversation([user("Weather in Oslo?"), assistant("", tool_calls=[call("get_weather", city="Oslo")])], [WEATHER])
    renderer, encoded = assert_exact(base, "qwen2_5", conversation)
    assert trained_text(renderer, encoded).startswith("<tool_call>\n{\"name\": \"get_weather\"")


def test_enable_thinking_needs_a_template_that_reads_it(tokenizer_dir):
    with pytest.raises(UsageError, match="--enable_thinking false: the chat template of .* does not read enable_thinking"):
        ChatRenderer(templated(tokenizer_dir, "qwen2_5"), ChatSettings(64, enable_thinking="false"))


def test_summary_names_reasoning_and_tools(tokenizer_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"messages": REASONING.messages}, {"messages": TOOL_CHAIN.messages, "tools": TOOL_CHAIN.tools}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    stats = ChatStats()
    list(iter_encoded([path], "auto", ChatRenderer(templated(tokenizer_dir, "qwen3"), ChatSettings(4096)), stats, strict=True))
    summary = "\n".join(summary_lines(stats.to_dict()))
    assert "1 whose reasoning the chat template does not render" in summary
    assert "1 assistant turns with their reasoning trained" in summary
    assert "2 assistant turns with tool calls (trained)" in summary and "3 tool results (never trained)" in summary


# ------------------------------------------------------------ generation and training


def test_generation_prompt_stop_token_and_reasoning_split(tokenizer_dir):
    from trainers.data.templates import split_reasoning
    from trainers.evaluate import generation_prompt, prompter, score
    from trainers.data.evalsets import Question

    qwen3 = templated(tokenizer_dir, "qwen3")
    off = prompter(qwen3, "false")
    assert generation_prompt(off, [user("Hi")]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert generation_prompt(prompter(qwen3), [user("Hi")]).endswith("<|im_start|>assistant\n")
    llama = prompter(templated(tokenizer_dir, "llama3"))
    from trainers.evaluate import stop_token_ids

    assert llama.tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(llama)
    shape = off.shape
    assert split_reasoning("<think>\nIt is Paris.\n</think>\n\nParis", shape) == ("Paris", "It is Paris.")
    assert split_reasoning("It is Paris.\n</think>\n\nParis", shape) == ("Paris", "It is Paris.")  # the prompt opened the block
    assert split_reasoning("<think>\nstill thinking", shape) == ("", "still thinking")
    assert split_reasoning(" Paris ", shape) == ("Paris", "")
    (scored,) = score([Question("q.jsonl:1", (user("Capital?"),), ("Paris",))], ["<think>\nhmm\n</think>\n\nParis"], shape)
    assert (scored["prediction"], scored["reasoning"], scored["em"]) == ("Paris", "hmm", 1.0)


@pytest.mark.slow
def test_sft_inspect_and_evaluate_with_the_qwen3_template(sft_model_dir, tokenizer_dir, tmp_path, capsys):
    """A model whose tokenizer ships Qwen3's template: inspect shows the tool calls and reasoning it
    trains, SFT trains on them (the first step's loss is the loss of the labels inspect wrote), and
    evaluate prompts with thinking off."""
    import shutil

    from launch.cli import main as cli
    from launch.evaluate import main as evaluate_main
    from launch.sft import main as sft_main
    from tests.conftest import read_losses, sft_args

    model = tmp_path / "qwen3_model"
    shutil.copytree(sft_model_dir, model)
    templated(tokenizer_dir, "qwen3").save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    records = [{"messages": c.messages, **({"tools": c.tools} if c.tools else {})}
               for c in (TOOL_CHAIN, REASONING, REASONING_WITH_TOOLS, INLINE_THINK)] * 6
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    common = ["--train_files", str(data), "--model_name_or_path", str(model), "--max_seq_length", "1024",
              "--train_on_reasoning", "last", "--data_cache_dir", str(tmp_path / "cache")]
    assert cli(["inspect", "sft", *common, "--num_samples", "3", "--no-packing", "--output", str(tmp_path / "rows.jsonl")]) == 0
    shown = capsys.readouterr().out
    assert '[[<tool_call>\n{"name": "get_weather"' in shown and "<tool_response>\n{\"temp_c\": -3, \"sky\": \"snow\"}" in shown
    assert "[[<think>\nFive times four: 20.\n</think>\n\n20<|im_end|>]]" in shown
    assert "6 whose reasoning the chat template does not render" in shown and "rendered but not trained" in shown

    out = tmp_path / "sft"
    sft_main(sft_args(tmp_path, model, out, train_files=str(data), max_seq_length=1024, per_device_train_batch_size=2,
                      max_steps=2, train_on_reasoning="last", data_cache_dir=str(tmp_path / "cache"), validation_split_ratio=0,
                      record_sample_ids=True, packing=False))
    losses = read_losses(out)
    assert set(losses) == {1, 2} and all(np.isfinite(list(losses.values())))
    (first,) = [json.loads(line) for line in (out / "sample_ids.rank0.jsonl").read_text().splitlines()][:1]
    assert losses[1] == pytest.approx(_loss_of(model, [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()],
                                               first["ids"]), abs=1e-4)
    assert load(out / "final").chat_template == (TEMPLATES / "qwen3.jinja").read_text()

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "2 + 3?", "answer": "5"}) + "\n")
    report = evaluate_main(["--model_name_or_path", str(out / "final"), "--eval_files", str(questions), "--output_dir",
                            str(tmp_path / "eval"), "--max_new_tokens", "8", "--enable_thinking", "false"])
    assert report["n"] == 1


def _loss_of(model_dir, rows: list[dict], sample_ids: list[int]) -> float:
    """The mean token loss of these samples' labels under the model at model_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in sample_ids:
            ids, labels = torch.tensor([rows[i]["input_ids"]]), torch.tensor([rows[i]["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count
