"""The embedded demo end to end at a reduced size: every stage runs and the report holds what
the demo promises (the full-size figures are measured by `make demo` and recorded in the README)."""

from __future__ import annotations

import json

import pytest

from launch.demo import DemoArgs, run_demo
from trainers.data.synthetic import make_chat, make_preference_pairs, make_world

pytestmark = pytest.mark.slow


def test_heldout_people_never_appear_in_the_training_data(tmp_path):
    make_chat(tmp_path, seed=5, n_train=500)
    make_preference_pairs(tmp_path, seed=5, n_train=300, n_heldout=50)
    people = make_world(5)
    heldout = {json.loads(line)["messages"][0]["content"] for line in (tmp_path / "heldout.jsonl").read_text().splitlines()}
    names = {p["name"] for p in people if any(p["name"] in q for q in heldout)}
    assert len(names) == 30
    train_text = "".join((tmp_path / f).read_text() for f in ("sft.jsonl", "pairs.jsonl", "pairs_heldout.jsonl"))
    assert not any(name in train_text for name in names)
    trained = {line for line in (tmp_path / "pairs.jsonl").read_text().splitlines()}
    held = [json.loads(line) for line in (tmp_path / "pairs_heldout.jsonl").read_text().splitlines()]
    assert len(held) == 50 and not any((p["chosen"], p["rejected"]) in {(json.loads(t)["chosen"], json.loads(t)["rejected"]) for t in trained}
                                      for p in held)
    assert all(p["chosen"] != p["rejected"] for p in held)


def test_demo_at_reduced_size(tmp_path):
    report = run_demo(DemoArgs(output_dir=str(tmp_path), max_steps=20, sft_steps=10, reward_steps=5, dpo_steps=4))
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("em_before_sft", "em_after_sft", "f1_before_sft", "f1_after_sft"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == report[key]
    after = json.loads((tmp_path / "eval_after_sft" / "report.json").read_text())
    assert saved["em_after_sft"] == after["em"] and saved["n"] == after["n"] == report["chat_data"]["held_out"]
    assert saved["reward"]["step"] == 5 and 0.0 <= saved["reward"]["eval_accuracy"] <= 1.0
    dpo = saved["dpo"]
    assert dpo["step"] == 4 and dpo["eval_pairs"] == saved["reward"]["eval_pairs"] > 0 and all(0.0 <= dpo[k] <= 1.0 for k in ("pair_accuracy_before", "pair_accuracy_after", "em_after"))
    assert dpo["em_after"] == json.loads((tmp_path / "eval_after_dpo" / "report.json").read_text())["em"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert f"{saved['em_after_sft']:.3f}" in summary and "![losses](loss.png)" in summary
    assert (tmp_path / "sft" / "final" / "merged" / "model.safetensors").is_file()
