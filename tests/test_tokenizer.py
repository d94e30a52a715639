import json

import pytest
from transformers import AutoTokenizer

from tokenizer.train import IM_END, IM_START, SPECIAL_TOKENS, main


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
