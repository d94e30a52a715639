"""trainrig pipeline: rounds in their own processes from the same base (checksums, and a repeated
round reproduces the first one's losses), a failing round reported while the others run, and the
summary's figures taken from each round's own outputs."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import read_losses
from launch.pipeline import load_pipeline, main as pipeline_main, weights_checksum
from trainers.errors import UsageError

pytestmark = pytest.mark.slow


def test_rounds_start_from_the_base_and_a_failure_does_not_stop_the_others(sft_model_dir, chat_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join((chat_dir / "sft.jsonl").read_text().splitlines(keepends=True)[:200]))
    spec = {"base_model": str(sft_model_dir), "output_dir": str(tmp_path / "out"),
            "datasets": [{"name": "first", "train_files": [str(train)], "eval_files": [str(chat_dir / "heldout.jsonl")]},
                         {"name": "broken", "train_files": [str(tmp_path / "missing.jsonl")], "eval_files": [str(chat_dir / "heldout.jsonl")]},
                         {"name": "again", "train_files": [str(train)], "eval_files": [str(chat_dir / "heldout.jsonl")]}],
            "sft": {"max_steps": 4, "max_seq_length": 128, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                    "logging_steps": 1, "validation_split_ratio": 0, "seed": 3},
            "evaluate": {"max_new_tokens": 8, "max_samples": 8}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert pipeline_main(["--config", str(config)]) == 1  # one round failed

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    first, broken, again = summary["rounds"]
    assert [r["status"] for r in summary["rounds"]] == ["ok", "failed", "ok"]
    assert "SFT exited 2" in broken["error"] and "missing.jsonl" in broken["error"]
    assert first["base_sha256"] == again["base_sha256"] == summary["base_sha256"] == weights_checksum(sft_model_dir)
    # the third round trains from the base, not from the first round's adapter: the same losses, step for step
    assert read_losses(tmp_path / "out" / "again" / "sft") == read_losses(tmp_path / "out" / "first" / "sft")
    report = json.loads((tmp_path / "out" / "again" / "eval" / "report.json").read_text())
    assert (again["em"], again["f1"], again["n"]) == (report["em"], report["f1"], 8) and report["adapter"].endswith("again/sft/final")
    assert again["train_loss"] == json.loads((tmp_path / "out" / "again" / "sft" / "summary.json").read_text())["loss"]
    assert again["train_seconds"] > 0 and again["eval_seconds"] > 0


def test_pipeline_file_errors(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"base_model": "b", "output_dir": "o", "datasets": [{"name": "x", "train_files": "t"}]}))
    with pytest.raises(UsageError, match=r"datasets\[0\]: needs exactly name, train_files, eval_files"):
        load_pipeline(config)
    config.write_text(yaml.safe_dump({"base_model": "b", "output_dir": "o", "datasets": [], "epochs": 3}))
    with pytest.raises(UsageError, match="unknown key.*epochs"):
        load_pipeline(config)
