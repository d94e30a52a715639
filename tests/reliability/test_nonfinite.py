"""A NaN loss on one rank at step k: every rank skips that same update, the weights and the
optimizer state stay those of step k-1 (checkpoint-k equals checkpoint-(k-1) tensor for tensor),
the step counter and the schedule go on, training continues with finite losses, and the skip is
logged and counted in metrics.jsonl (a skip record naming the rank, `skipped_steps` in every later
record). More than --max_bad_steps such steps in a row stop the run with exit status 1 and a
message naming the steps, the rank and what to do.

The NaN is injected by tests/reliability/faults.py (the model's loss times NaN in the forward
passes of the chosen step, on the chosen rank only), under DDP and DeepSpeed ZeRO-2 for
pretraining; in one process for every training stage (conftest.TRAINING_STAGES), the reward
model's scores times NaN (its loss is made from them).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, TRAINING_STAGES, VENV_BIN, free_port, pretrain_args, run_launcher
from faults import poison_loss

from trainers.checkpoint import load_plain
from trainers.runtime import _deepspeed_safe_globals
from trainers.tracking import read_metrics

pytestmark = [pytest.mark.reliability]
FAULTS = str(REPO / "tests" / "reliability" / "faults.py")


def tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's weights and optimizer state, by a flat name."""
    found = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        walk("model", load_file(str(checkpoint / "model.safetensors")))
        walk("optimizer", load_plain(checkpoint / "optimizer.pt"))
    for path in sorted((checkpoint / "deepspeed").glob("*.pt")):
        walk(path.name, load_plain(path, allowed=_deepspeed_safe_globals()))
    return found


def assert_update_skipped(out, step: int) -> None:
    before, after, earlier = tensors(out / f"checkpoint-{step - 1}"), tensors(out / f"checkpoint-{step}"), tensors(out / f"checkpoint-{step - 2}")
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped step changed the weights or optimizer state"
    assert any(not torch.equal(earlier[k], before[k]) for k in before), "an applied step must change them (the check could not fail)"
    for name in ("trainer_state.json",):
        state = json.loads((out / f"checkpoint-{step}" / name).read_text())
        assert state["step"] == step and state["skipped_steps"] == 1 and state["bad_steps_in_a_row"] == 1


def assert_logged(out, step: int, rank: int, steps: int) -> None:
    records = read_metrics(out / "metrics.jsonl")
    (skip,) = [r for r in records if r.get("skipped_update")]
    assert skip["step"] == step and skip["nonfinite_loss_ranks"] == [rank] and skip["bad"] and skip["skipped_steps"] == 1
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses[step] is None  # a skipped step's loss stays out of the window mean (logging every step)
    assert all(math.isfinite(losses[s]) for s in losses if s != step)
    assert all(r["skipped_steps"] == (1 if r["step"] >= step else 0) for r in records if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_nan_on_one_rank_skips_the_same_update_everywhere(engine, corpus, tokenizer_dir, tmp_path):
    out, steps, bad_step = tmp_path / engine, 6, 4
    extra = {"deepspeed": "ds_configs/zero2.json"} if engine == "zero2" else {}
    argv = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), FAULTS, "launch/pretrain.py",
            *pretrain_args(corpus, tokenizer_dir, out, max_steps=steps, save_steps=1, gradient_accumulation_steps=2, **extra)]
    proc = run_launcher(argv, env={"TRAINRIG_FAULT": json.dumps({"kind": "nan_loss", "rank": 1, "steps": [bad_step], "accumulation": 2})})
    assert f"step {bad_step}: non-finite loss or gradient norm" in proc.stdout and "rank 1 (sample ids" in proc.stdout
    assert_update_skipped(out, bad_step)
    assert_logged(out, bad_step, rank=1, steps=steps)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_more_bad_steps_in_a_row_than_allowed_stop_the_run(stage, stage_run, tmp_path, monkeypatch, capsys):
    run = stage_run(stage)
    poison_loss(lambda call: float("inf"), monkeypatch.setattr)  # an Inf loss (finite gradients would follow from it unpoisoned)
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit) as exit_info:
        run.main(run.args(out, max_steps=10, save_steps=0, max_bad_steps=2))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: steps 1-3: 3 updates in a row skipped") and "--max_bad_steps 2" in error
    assert "the weights are those of step 0" in error and "--learning_rate" in error
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("skipped_update")]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["skipped_steps"] == 3
    assert not (out / "final").exists()


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_one_bad_step_is_skipped_in_a_single_process(stage, stage_run, tmp_path, monkeypatch):
    """The same guarantee without a launcher (fast), in every stage: a NaN loss at step 3 only (for
    the reward model NaN scores, which its pairwise loss is made from)."""
    run = stage_run(stage)
    poison_loss(lambda call: float("nan") if call == 3 else None, monkeypatch.setattr)
    out = tmp_path / "single"
    summary = run.main(run.args(out, max_steps=5, save_steps=1))
    assert summary["step"] == 5 and math.isfinite(summary["loss"])
    assert_update_skipped(out, 3)
    assert_logged(out, 3, rank=0, steps=5)
    assert (out / "final" / "config.json").is_file()
