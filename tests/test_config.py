import pytest
import yaml

from trainers.config import PretrainConfig, parse_config, redact, save_resolved_config, to_flat_dict
from trainers.errors import UsageError


def test_defaults_yaml_cli_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 0.01\nblock_size: 64\ngradient_checkpointing: true\ntrain_files: [a.txt, b.txt]\n")
    cfg = parse_config(PretrainConfig, ["--config", str(recipe), "--block_size", "128"], prog="t")
    assert cfg.optim.learning_rate == 0.01          # YAML over default
    assert cfg.data.block_size == 128               # CLI over YAML
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.train_files == ["a.txt", "b.txt"]
    assert cfg.run.seed == 42                       # default untouched


def test_boolean_flags_and_classic_aliases():
    cfg = parse_config(PretrainConfig, ["--gradient_checkpointing", "--no-save_best", "--bf16", "--local_rank=1"], prog="t")
    assert cfg.model.gradient_checkpointing is True and cfg.run.save_best is False
    assert cfg.dist.precision == "bf16"


def test_unknown_flag_names_closest(tmp_path):
    with pytest.raises(UsageError, match=r"unknown flag --learning_rat .*did you mean --learning_rate"):
        parse_config(PretrainConfig, ["--learning_rat", "1"], prog="t")


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 1\n\nbatch_sise: 4\n")
    with pytest.raises(UsageError, match=r"r\.yaml:3: unknown key 'batch_sise'"):
        parse_config(PretrainConfig, ["--config", str(recipe)], prog="t")


@pytest.mark.parametrize("text, match", [
    ("max_steps: ten\n", r"r\.yaml:1: max_steps must be an integer"),
    ("optimizer: sgd\n", r"optimizer must be one of adamw, muon"),
    ("save_best: maybe\n", r"save_best must be a boolean"),
    ("- a\n- b\n", r"flat mapping"),
    ("seed: [1\n", r"not valid YAML"),
])
def test_bad_yaml_values(tmp_path, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(UsageError, match=match):
        parse_config(PretrainConfig, ["--config", str(recipe)], prog="t")


def test_bad_cli_value():
    with pytest.raises(UsageError, match=r"--per_device_train_batch_size: per_device_train_batch_size must be an integer"):
        parse_config(PretrainConfig, ["--per_device_train_batch_size", "lots"], prog="t")


def test_every_field_has_help():
    import dataclasses
    import typing

    for section in dataclasses.fields(PretrainConfig):
        for f in dataclasses.fields(typing.get_type_hints(PretrainConfig)[section.name]):
            assert f.metadata.get("help"), f"--{f.name} has no help text"


def test_secrets_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234567890")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    cfg = parse_config(PretrainConfig, ["--run_name", "x-hf_abcdefghijklmnop", "--output_dir", str(tmp_path)], prog="t")
    path = tmp_path / "resolved_config.yaml"
    save_resolved_config(cfg, path)
    text = path.read_text()
    assert "hf_abcdefghijklmnop" not in text and "wandb-secret" not in text
    assert yaml.safe_load(text)["output_dir"] == str(tmp_path)   # the rest is kept
    assert redact({"api_key": "x", "hf_token": "y", "lr": 1}) == {"api_key": "***redacted***", "hf_token": "***redacted***", "lr": 1}
    assert set(to_flat_dict(cfg)) >= {"learning_rate", "block_size", "deepspeed"}


def test_redaction_spares_tokenizer_fields(tmp_path):
    cfg = parse_config(PretrainConfig, ["--tokenizer_name_or_path", "tok/", "--tokenize_batch_size", "7"], prog="t")
    save_resolved_config(cfg, tmp_path / "r.yaml")
    again = parse_config(PretrainConfig, ["--config", str(tmp_path / "r.yaml")], prog="t")  # a saved config runs again
    assert again.model.tokenizer_name_or_path == "tok/" and again.data.tokenize_batch_size == 7


@pytest.mark.parametrize("argv, match", [
    (["--logging_steps", "0"], r"--logging_steps: logging_steps must be at least 1, got 0"),
    (["--gradient_accumulation_steps", "0"], r"gradient_accumulation_steps must be at least 1"),
    (["--learning_rate", "-1"], r"learning_rate must be at least 0"),
])
def test_minimums(argv, match):
    with pytest.raises(UsageError, match=match):
        parse_config(PretrainConfig, argv, prog="t")


def test_blank_yaml_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path:\ntrain_files:\n")
    cfg = parse_config(PretrainConfig, ["--config", str(recipe)], prog="t")
    assert cfg.model.model_name_or_path == "" and cfg.data.train_files == []
    recipe.write_text("max_steps:\n")
    with pytest.raises(UsageError, match=r"r\.yaml:1: max_steps is empty"):
        parse_config(PretrainConfig, ["--config", str(recipe)], prog="t")
