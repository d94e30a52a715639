"""Bad inputs fail fast and say why: every case below exits with status 2 after printing exactly
one stderr line, `error: ...`, that names the file and line (or the flag, or the sample) at fault
and says how to fix it -- never a traceback, never a half-started run. Where SFT documents
skipping and counting a bad sample instead (trainers/data/chat.py: REASONS), the run goes on and
the per-reason skip counts appear in the log and in summary.json, and `--strict` turns the first
such sample into the same one-line exit 2. A missing training file and one with a line cut
mid-way are checked in every training stage (conftest.TRAINING_STAGES)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import TRAINING_STAGES, pretrain_args, reward_args, sft_args
from launch.pretrain import main as pretrain_main
from launch.reward import main as reward_main
from launch.sft import main as sft_main

pytestmark = [pytest.mark.reliability]


def exits_2(capsys, main, argv, *patterns: str) -> str:
    """Run an entry point in-process: exit status 2, one stderr line `error: ...` matching every pattern."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, f"exit {info.value.code}\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one `error:` line:\n{err}"
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------------------------- the inputs


@pytest.fixture(scope="module")
def bad(corpus, tmp_path_factory) -> Path:
    """A directory of broken inputs, each a realistic accident."""
    d = tmp_path_factory.mktemp("bad_inputs")
    good = corpus.read_text().splitlines()[:40]
    # a JSONL whose last record was cut mid-way (a copy interrupted, a disk full)
    last = good[-1]
    (d / "truncated.jsonl").write_text("\n".join(good[:-1] + [last[: len(last) // 2]]) + "\n")
    (d / "int_text.jsonl").write_text("\n".join(good[:2] + ['{"text": 5}'] + good[2:]) + "\n")
    (d / "no_field.jsonl").write_text("\n".join(good[:3] + ['{"body": "words here"}']) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "empty_dir").mkdir()
    (d / "a_file").write_text("not a model\n")
    (d / "ds_micro3.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    (d / "ds_optimizer.json").write_text(json.dumps(
        {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
         "zero_optimization": {"stage": 2}}, indent=2))
    (d / "ds_broken.json").write_text('{\n  "train_micro_batch_size_per_gpu": "auto",\n  "zero_optimization": {"stage": 2,}\n}\n')
    # a model far too large for an RTX 5090 profile: Qwen2.5-14B's config (no weights: the planner refuses first)
    big = d / "qwen14b"
    big.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "configs" / "models" / "qwen2.5-14b.json", big / "config.json")
    return d


PRETRAIN_CASES = {
    "truncated_jsonl": ({"train_files": "truncated.jsonl"},
                        [r"truncated\.jsonl:40: not valid JSON", r"fix or remove the line"]),
    "text_is_a_number": ({"train_files": "int_text.jsonl"},
                         [r"int_text\.jsonl:3: field 'text' is int, not a string", r"fix the record"]),
    "no_text_field": ({"train_files": "no_field.jsonl"},
                      [r"no_field\.jsonl:4: no 'text' field \(found \['body'\]\)", r"set --text_field"]),
    "empty_train_file": ({"train_files": "empty.jsonl"},
                         [r"--train_files .*empty\.jsonl: no text found", r"pass a non-empty corpus"]),
    "model_dir_is_empty": ({"model_preset": None, "model_name_or_path": "empty_dir"},
                           [r"--model_name_or_path .*empty_dir: not a model directory \(no config\.json\)", r"save_pretrained"]),
    "model_dir_is_a_file": ({"model_preset": None, "model_name_or_path": "a_file"},
                            [r"--model_name_or_path .*a_file: not a model directory \(no config\.json\)", r"save_pretrained"]),
    "ds_json_micro_batch": ({"deepspeed": "ds_micro3.json"},
                            [r"ds_micro3\.json: train_micro_batch_size_per_gpu=3 contradicts --per_device_train_batch_size=4",
                             r"set it to \"auto\" in the JSON or change the flag"]),
    "ds_json_optimizer": ({"deepspeed": "ds_optimizer.json"},
                          [r"ds_optimizer\.json: remove the \"optimizer\" section", r"--optimizer/--learning_rate"]),
    "ds_json_invalid": ({"deepspeed": "ds_broken.json"},
                        [r"ds_broken\.json:3: not valid JSON", r"fix the DeepSpeed config"]),
    "planner_cannot_fit": ({"model_preset": None, "model_name_or_path": "qwen14b", "hardware": "rtx5090",
                            "per_device_train_batch_size": "auto", "gradient_accumulation_steps": "auto"},
                           [r"--per_device_train_batch_size auto: nothing fits 1x .*5090", r"qwen14b",
                            r"would fit: .*more GPUs: \d+ x .*5090",
                            r"QLoRA \(--lora_r 16 --load_in_4bit\): single"]),   # continued pretraining takes LoRA
    "output_dir_below_a_file": ({"output_dir": "a_file/run"},
                                [r"--output_dir .*a_file/run: not writable \(Not a directory\)", r"choose a directory you can write to"]),
}


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretrain_bad_input_exits_2_with_one_line(case, bad, corpus, tokenizer_dir, tmp_path, capsys):
    overrides, patterns = PRETRAIN_CASES[case]
    overrides = {k: (str(bad / v) if v and k in ("train_files", "model_name_or_path", "deepspeed", "output_dir") else v)
                 for k, v in overrides.items()}
    overrides.setdefault("output_dir", tmp_path / "run")
    exits_2(capsys, pretrain_main, pretrain_args(corpus, tokenizer_dir, **overrides), *patterns)
    # nothing half-started: no run output was written
    out = Path(overrides["output_dir"])
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


# ------------------------------------------------------------------------------------------ SFT


def chat_line(messages) -> str:
    return json.dumps({"messages": messages})


U, A = {"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."}


@pytest.fixture(scope="module")
def bad_chat(chat_dir, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """The demo's chat data with one bad sample of each kind planted at known lines, and the
    last record cut mid-way. Returns the file and {reason: line of its first sample}."""
    d = tmp_path_factory.mktemp("bad_chat")
    good = (chat_dir / "sft.jsonl").read_text().splitlines()[:60]
    planted = {
        "unknown_format": json.dumps({"messages": "user: hi / assistant: hello"}),       # messages is a string
        "non_string_content": chat_line([U, {"role": "assistant", "content": ["Blue", "."]}]),  # a list
        "unknown_role": chat_line([U, {"role": "narrator", "content": "It was blue."}, A]),
        "malformed_turn": chat_line([U, "Blue."]),
    }
    lines, first = list(good[:5]), {}
    for reason, record in planted.items():
        lines.append(record)
        first[reason] = len(lines)
        lines += good[5 + 5 * len(first): 10 + 5 * len(first)]
    lines.append(chat_line([U, {"role": "assistant", "content": 42}]))  # a second non_string_content: a number
    cut = good[-1]
    lines.append(cut[: len(cut) // 2])
    first["bad_json"] = len(lines)
    path = d / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, first


@pytest.mark.slow
def test_sft_counts_skipped_samples_per_reason(bad_chat, sft_model_dir, chat_dir, tmp_path, caplog):
    path, first = bad_chat
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="trainrig"):
        summary = sft_main(sft_args(chat_dir, sft_model_dir, out, train_files=path, max_steps=1))
    expected = {"unknown_format": 1, "non_string_content": 2, "unknown_role": 1, "malformed_turn": 1, "bad_json": 1}
    assert summary["data"]["skipped"] == expected
    assert json.loads((out / "summary.json").read_text())["data"]["skipped"] == expected
    total = len(path.read_text().splitlines())
    assert summary["data"]["read"] == total and summary["data"]["kept"] == total - 6
    for reason, count in expected.items():   # the log line names the count, the reason and where it first happened
        assert re.search(rf"skipped {count} x {reason} \(.*\): first at {re.escape(str(path))}:{first[reason]}\b", caplog.text), \
            (reason, caplog.text[-3000:])


@pytest.mark.parametrize("reason", ["unknown_format", "non_string_content", "unknown_role", "malformed_turn", "bad_json"])
def test_sft_strict_stops_at_the_bad_sample(reason, bad_chat, sft_model_dir, chat_dir, tmp_path, capsys):
    """--strict: the first bad sample of each kind (alone in a file with good ones before it) is exit 2 naming file:line."""
    path, first = bad_chat
    lines = path.read_text().splitlines()
    single = tmp_path / f"{reason}.jsonl"
    single.write_text("\n".join(lines[:5] + [lines[first[reason] - 1]]) + "\n")
    exits_2(capsys, sft_main, sft_args(chat_dir, sft_model_dir, tmp_path / "run", train_files=single, strict=True),
            rf"{re.escape(str(single))}:6: .*\({reason}\); fix the sample, or drop --strict")


@pytest.fixture(scope="module")
def plain_tokenizer_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with no ChatML special tokens (<|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:300]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("plain_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(out)
    return out


SFT_CASES = {
    "empty_train_file": ({"train_files": "empty.jsonl"},
                         [r"--train_files .*empty\.jsonl: no trainable sample \(the files are empty\)", r"trainrig inspect sft"]),
    "only_bad_samples": ({"train_files": "narrator.jsonl"},
                         [r"--train_files .*narrator\.jsonl: no trainable sample \(1 x unknown_role\)", r"trainrig inspect sft"]),
    "not_a_chat_format": ({"train_files": "plain_text.jsonl"},
                          [r"plain_text\.jsonl:1: cannot tell the chat format \(fields \['text'\]\)", r"set --chat_format"]),
    "model_dir_is_empty": ({"model_name_or_path": "empty_dir"},
                           [r"--model_name_or_path .*empty_dir: not a model directory \(no config\.json\)", r"save_pretrained"]),
    "model_dir_is_a_file": ({"model_name_or_path": "a_file"},
                            [r"--model_name_or_path .*a_file: not a model directory \(no config\.json\)", r"save_pretrained"]),
    "tokenizer_without_chat_tokens": ({"tokenizer_name_or_path": "PLAIN"},
                                      [r"--tokenizer_name_or_path .*plain_tok\S*: the tokenizer has no special token <\|im_start\|> <\|im_end\|>",
                                       r"add them as special tokens"]),
    "ds_json_micro_batch": ({"deepspeed": "ds_micro3.json"},
                            [r"ds_micro3\.json: train_micro_batch_size_per_gpu=3 contradicts --per_device_train_batch_size=4"]),
    "output_dir_below_a_file": ({"output_dir": "a_file/run"},
                                [r"--output_dir .*a_file/run: not writable", r"choose a directory you can write to"]),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_bad_input_exits_2_with_one_line(case, bad, plain_tokenizer_dir, sft_model_dir, chat_dir, corpus, tmp_path, capsys):
    (bad / "narrator.jsonl").write_text(chat_line([U, {"role": "narrator", "content": "It was blue."}, A]) + "\n")
    shutil.copy(corpus, bad / "plain_text.jsonl")
    overrides, patterns = SFT_CASES[case]
    overrides = {k: (str(plain_tokenizer_dir) if v == "PLAIN" else str(bad / v)) for k, v in overrides.items()}
    overrides.setdefault("output_dir", tmp_path / "run")
    exits_2(capsys, sft_main, sft_args(chat_dir, sft_model_dir, **overrides), *patterns)
    out = Path(overrides["output_dir"])
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


# ------------------------------------------------------------------------------- every stage


def assert_nothing_started(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_training_file_with_a_line_cut_mid_way_exits_2_naming_it(stage, stage_run, tmp_path, capsys):
    """The stage's own training data, its 40th and last record cut mid-way (a copy interrupted):
    exit 2 naming file:line (SFT with --strict: by default it skips and counts the sample)."""
    run = stage_run(stage)
    good = run.train_file.read_text().splitlines()[:40]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(good[:-1] + [good[-1][: len(good[-1]) // 2]]) + "\n")
    out = tmp_path / "run"
    exits_2(capsys, run.main, run.args(out, train_files=cut, **run.fail_fast), rf"{re.escape(str(cut))}:40: not valid JSON")
    assert_nothing_started(out)


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_missing_training_file_exits_2_naming_it(stage, stage_run, tmp_path, capsys):
    run = stage_run(stage)
    missing, out = tmp_path / "nowhere" / "train.jsonl", tmp_path / "run"
    exits_2(capsys, run.main, run.args(out, train_files=missing),
            rf"--train_files {re.escape(str(missing))}: no such file or directory", r"check the path")
    assert_nothing_started(out)


# ---------------------------------------------------------------------------------- reward


P = {"prompt": "What is 2 plus 2?", "chosen": "2 plus 2 is 4, certainly right.", "rejected": "2 plus 2 is 5, surely wrong."}

REWARD_CASES = {
    "no_rejected": ([{k: v for k, v in P.items() if k != "rejected"}],
                    [r"bad\.jsonl:4: a preference pair needs 'chosen' and 'rejected' \(found \['prompt', 'chosen'\]\)"]),
    "rejected_is_a_number": ([dict(P, rejected=5)], [r"bad\.jsonl:4: 'rejected' must be a non-empty string"]),
    "no_prompt": ([{"chosen": P["chosen"], "rejected": P["rejected"]}], [r"bad\.jsonl:4: needs a non-empty 'prompt'"]),
    "unknown_role": ([dict(P, prompt=[{"role": "user", "content": "2 plus 2?"}, {"role": "narrator", "content": "Silence."}])],
                     [r"bad\.jsonl:4: turn 1 has role 'narrator'.*\(unknown_role\)"]),
    "every_pair_too_long": ("TOO_LONG", [r"--train_files .*bad\.jsonl: no usable pairs", r"raise --max_seq_length"]),
    "empty_train_file": ([], [r"--train_files .*bad\.jsonl: no usable pairs"]),
    # a context turn that is not a {"role", "content"} object
    "turn_is_not_an_object": ([dict(P, prompt=["2 plus 2?"])], [r"bad\.jsonl:4: turn 0 is a str, not an object \(malformed_turn\)"]),
    "turn_without_content": ([dict(P, prompt=[{"role": "user"}])], [r"bad\.jsonl:4: turn 0 has no role/content .*\(malformed_turn\)"]),
}


@pytest.mark.parametrize("case", list(REWARD_CASES))
def test_reward_bad_pairs_exit_2_with_one_line(case, preference_pairs, sft_model_dir, tmp_path, capsys):
    """Three good pairs, then the bad record (or the file as described): exit 2 naming file:line."""
    planted, patterns = REWARD_CASES[case]
    good = preference_pairs.read_text().splitlines()[:3]
    path = tmp_path / "bad.jsonl"
    if planted == "TOO_LONG":
        path.write_text("\n".join(good) + "\n")
        argv = reward_args(path, sft_model_dir, tmp_path / "run", max_seq_length=8)
    else:
        lines = good + [json.dumps(r) for r in planted] if planted else []
        path.write_text("".join(line + "\n" for line in lines))
        argv = reward_args(path, sft_model_dir, tmp_path / "run")
    exits_2(capsys, reward_main, argv, *patterns)
    assert_nothing_started(tmp_path / "run")


REWARD_SETTING_CASES = {
    "model_dir_is_empty": ({"model_name_or_path": "empty_dir"},
                           [r"--model_name_or_path .*empty_dir: not a model directory \(no config\.json\)", r"save_pretrained"]),
    "no_model": ({"model_name_or_path": None}, [r"--model_name_or_path is required"]),
    "merge_lora": ({"lora_r": "4", "merge_lora": True}, [r"--merge_lora is not available for the reward model"]),
    "output_dir_below_a_file": ({"output_dir": "a_file/run"},
                                [r"--output_dir .*a_file/run: not writable", r"choose a directory you can write to"]),
}


@pytest.mark.parametrize("case", list(REWARD_SETTING_CASES))
def test_reward_bad_setting_exits_2_with_one_line(case, bad, preference_pairs, sft_model_dir, tmp_path, capsys):
    overrides, patterns = REWARD_SETTING_CASES[case]
    overrides = {k: (str(bad / v) if k in ("model_name_or_path", "output_dir") and v else v) for k, v in overrides.items()}
    overrides.setdefault("output_dir", tmp_path / "run")
    exits_2(capsys, reward_main, reward_args(preference_pairs, sft_model_dir, **overrides), *patterns)
    assert_nothing_started(Path(overrides["output_dir"]))
