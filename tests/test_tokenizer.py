import json

import pytest
from transformers import AutoTokenizer

from trainers.tokenizer import IM_END, IM_START, SPECIAL_TOKENS, main


def test_round_trip_and_special_tokens(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["Velora lives in Dastrel.", "  leading spaces\nand lines", "你好，世界", "emoji 🙂🚀", "def f(x):\n    return x"]:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    for special in SPECIAL_TOKENS:
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{special} is not one token: {ids}"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id


def test_chat_template_renders_chatml(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3 and ids.count(tok.convert_tokens_to_ids(IM_END)) == 3


def test_streams_every_format_and_reports_throughput(tmp_path, caplog):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i} about trainrig" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(texts[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[10:20]))
    pq.write_table(pa.table({"body": texts[20:30]}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": texts[30:]}).save_to_disk(str(tmp_path / "d"))
    caplog.set_level("INFO")
    stats = main(["--train_files", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet"),
                  str(tmp_path / "d"), "--text_field", "body", "--vocab_size", "300", "--min_frequency", "1",
                  "--output_dir", str(tmp_path / "tok")])
    assert stats["documents"] == 50
    assert stats["mb_per_s"] > 0
    assert "MB/s" in caplog.text
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("setup, argv_tail, message", [
    (lambda p: None, ["missing.jsonl"], r"no such file or directory"),
    (lambda p: (p / "empty.txt").write_text("\n\n"), ["empty.txt"], r"no text found"),
    (lambda p: (p / "bad.txt").write_bytes(b"fine line\n\xff\xfe broken\n"), ["bad.txt"], r"bad\.txt:2: not valid UTF-8"),
    (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n'), ["bad.jsonl"], r"bad\.jsonl:2: not valid JSON"),
    (lambda p: (p / "nofield.jsonl").write_text('{"body": "ok"}\n'), ["nofield.jsonl"], r"nofield\.jsonl:1: no 'text' field"),
])
def test_bad_input_exits_2_naming_the_file(tmp_path, monkeypatch, capsys, setup, argv_tail, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_files", *argv_tail, "--output_dir", str(tmp_path / "out"), "--vocab_size", "300"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_model_dir_tokenizes_like_the_tokenizer_it_was_trained_with(tokenizer_dir, tmp_path):
    """transformers 5 loads a tokenizer from a qwen2 model directory as Qwen2Tokenizer, rebuilding
    its pre-tokenizer; trainrig's tokenizer has that very pipeline, so final/ tokenizes the same."""
    from transformers import AutoTokenizer, Qwen2Config

    own = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = tmp_path / "final"
    Qwen2Config(vocab_size=640, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(model_dir)
    own.save_pretrained(model_dir)
    from_model = AutoTokenizer.from_pretrained(model_dir)
    assert type(from_model).__name__ == "Qwen2Tokenizer"  # what any user of final/ gets
    text = "12 plus 7 is 19.\n\n  Velora lives in Dastrel. 你好 😀 <|im_start|>user\nhi<|im_end|>"
    assert from_model(text)["input_ids"] == own(text)["input_ids"]


def test_load_tokenizer_uses_tokenizer_json_when_transformers_would_swap_it(qwen_style_tokenizer_dir, tmp_path, caplog):
    """A GPT-2-split tokenizer.json in a qwen2 model directory: AutoTokenizer would re-split it the
    Qwen2 way; trainrig loads the file as written and warns."""
    import shutil

    from transformers import AutoTokenizer, Qwen2Config

    from trainers.models import load_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(qwen_style_tokenizer_dir, model_dir)
    Qwen2Config(vocab_size=960, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(model_dir)
    text = "12 plus 7 is 19."
    written = AutoTokenizer.from_pretrained(qwen_style_tokenizer_dir)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"] != written  # the swap this guards against
    loaded = load_tokenizer(str(model_dir), False, "--model_name_or_path")
    assert loaded(text)["input_ids"] == written
    assert "using tokenizer.json as written" in caplog.text
