"""launch/evaluate.py: question-set kinds, batched greedy answers equal one-by-one answers (left
padding leaks nothing), two ranks equal one rank exactly, perplexity on text, report = the mean of
predictions, and bad inputs exit 2 naming file:line."""

from __future__ import annotations

import json

import pytest

from conftest import VENV_BIN, free_port, run_launcher
from launch.evaluate import main as evaluate_main
from trainers.data.evalsets import kind_of, read_questions
from trainers.errors import UsageError
from trainers.evaluate import batch_plan, left_padded


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_question_kinds_and_references(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "Two primes?", "answers": ["2", "3"], "system": "Be brief."},
        {"question": "SQuAD form?", "answers": {"text": ["yes", "Yes."], "answer_start": [0, 0]}},
    ])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}])
    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "plain text"}])
    (tmp_path / "notes.txt").write_text("more text\n")
    assert [kind_of(p, "text") for p in (qa, chat, text, tmp_path / "notes.txt")] == ["questions", "questions", "text", "text"]
    q = read_questions(qa, "auto")
    assert q[0].messages == ({"role": "user", "content": "Capital of France?"},) and q[0].references == ("Paris",)
    assert q[1].messages[0] == {"role": "system", "content": "Be brief."} and q[1].references == ("2", "3")
    assert q[2].references == ("yes", "Yes.")
    (c,) = read_questions(chat, "auto")
    assert [m["content"] for m in c.messages] == ["hi", "hello", "2+2?"] and c.references == ("4",)  # the last turn is the reference


def test_bad_question_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "ok"}\n{"question": "x", "answer": 3}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: the answer must be a string"):
        read_questions(bad, "auto")
    bad.write_text('{"question": "ok?", "answer": "ok"}\n{not json\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: not valid JSON"):
        read_questions(bad, "auto")
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:1: .*role 'bot'.*unknown_role"):
        read_questions(bad, "auto")


def test_left_padding_and_batch_plan():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch_plan([3, 9, 3, 1, 9], 2) == [[1, 4], [0, 2], [3]]  # longest first, ties by index


@pytest.fixture(scope="module")
def random_model_dir(tokenizer_dir, tmp_path_factory):
    """The tiny shape with random weights: its greedy answers vary with every input token, so a
    padding leak or a mixed-up batch changes them (a briefly trained model answers all alike)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from trainers.models import load_preset, padded_vocab_size

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(**{**load_preset("tiny"), "vocab_size": padded_vocab_size(tokenizer)})
    out = tmp_path_factory.mktemp("random_model")
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # (tied) zero rows score 0: greedy picks ordinary tokens, never a stop or an unused id
        embeddings = model.get_input_embeddings().weight
        embeddings[tokenizer.all_special_ids] = 0
        embeddings[len(tokenizer):] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def evaluate_args(model_dir, files, out, **extra):
    args = ["--model_name_or_path", str(model_dir), "--eval_files", *map(str, files), "--output_dir", str(out),
            "--max_new_tokens", "12", "--max_samples", "24", "--block_size", "64"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def read_predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_batched_answers_equal_one_by_one_and_report_is_their_mean(random_model_dir, chat_dir, corpus, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()[:100]))
    batched = evaluate_main(evaluate_args(random_model_dir, [chat_dir / "heldout.jsonl", text], tmp_path / "b8", batch_size=8))
    single = evaluate_main(evaluate_args(random_model_dir, [chat_dir / "heldout.jsonl"], tmp_path / "b1", batch_size=1))
    got, want = read_predictions(tmp_path / "b8"), read_predictions(tmp_path / "b1")
    assert [p["prediction"] for p in got] == [p["prediction"] for p in want]
    assert len({p["prediction"] for p in got}) > 1, "a degenerate model answers everything alike: the check would be empty"
    heldout = batched["datasets"]["heldout"]
    assert heldout["n"] == 24 and heldout["em"] == pytest.approx(sum(p["em"] for p in got) / 24)
    assert heldout["f1"] == pytest.approx(sum(p["f1"] for p in got) / 24)
    assert batched["n"] == 24 and batched["em"] == heldout["em"] and single["datasets"]["heldout"]["f1"] == heldout["f1"]
    ppl = batched["datasets"]["text"]
    assert ppl["kind"] == "text" and ppl["eval_tokens"] > 1000 and 300 < ppl["eval_ppl"] < 2000  # random weights: about uniform over ~600 tokens
    assert json.loads((tmp_path / "b8" / "report.json").read_text())["datasets"]["text"]["eval_ppl"] == ppl["eval_ppl"]


@pytest.mark.slow
def test_two_ranks_equal_one(random_model_dir, chat_dir, tmp_path):
    one = evaluate_main(evaluate_args(random_model_dir, [chat_dir / "heldout.jsonl"], tmp_path / "one", batch_size=4))
    run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/evaluate.py",
                  *evaluate_args(random_model_dir, [chat_dir / "heldout.jsonl"], tmp_path / "two", batch_size=4)])
    assert read_predictions(tmp_path / "two") == read_predictions(tmp_path / "one")
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (two["em"], two["f1"], two["n"], two["world_size"]) == (one["em"], one["f1"], one["n"], 2)


def test_usage_errors_exit_2(sft_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model_name_or_path", str(sft_model_dir), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--eval_files is required" in capsys.readouterr().err
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(SystemExit):
        evaluate_main(["--model_name_or_path", str(tmp_path), "--eval_files", str(questions), "--output_dir", str(tmp_path / "o")])
    assert "not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--model_name_or_path", str(sft_model_dir), "--adapter_path", str(tmp_path), "--eval_files", str(questions),
                       "--output_dir", str(tmp_path / "o")])
    assert "no adapter_config.json" in capsys.readouterr().err


def test_generate_streams_the_greedy_answer_evaluate_scores(random_model_dir, tmp_path):
    import io

    from launch.generate import main as generate_main

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "Where does Thiar Salelve live?", "answer": "x"}])
    evaluate_main(evaluate_args(random_model_dir, [questions], tmp_path / "eval"))
    (expected,) = [p["prediction"] for p in read_predictions(tmp_path / "eval")]
    printed = io.StringIO()
    (answer,) = generate_main(["--model_name_or_path", str(random_model_dir), "--prompt", "Where does Thiar Salelve live?",
                               "--max_new_tokens", "12"], stdout=printed)
    assert answer == expected and printed.getvalue().strip() == expected

    printed = io.StringIO()  # interactive: two turns, the second with the first in its history
    answers = generate_main(["--model_name_or_path", str(random_model_dir), "--max_new_tokens", "6"],
                            stdin=io.StringIO("Where does Thiar Salelve live?\nAnd why?\n\n"), stdout=printed)
    assert len(answers) == 2 and printed.getvalue().count("you> ") == 3 and printed.getvalue().count("model> ") == 2
