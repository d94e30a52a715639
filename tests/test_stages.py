"""The stage registry drives the CLI, the planner, Slurm and inspect: every registered stage has
all its parts, and nothing else keeps a list of stages. The run loop's state: its names, and
trainer_state.json of trainrig <= 0.9 still loads."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from trainers.config import parse_run
from trainers.errors import UsageError
from trainers.fit import TrainState
from trainers.setup import validation_split
from trainers.stages import STAGES, plan_names, stage_of_script


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_its_module_entry_script_sbatch_and_inspect_view(name):
    stage = STAGES[name]
    assert callable(importlib.import_module(stage.module).train)
    module, function = stage.inspector.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    script = REPO / stage.entry_script
    assert script.is_file() and f'stage_main("{name}")' in script.read_text()  # the thin entry script of this stage
    sbatch = REPO / stage.sbatch
    assert sbatch.is_file() and stage.entry_script in sbatch.read_text()
    assert stage_of_script(stage.entry_script) is stage
    parse_run(stage.config, [], prog=stage.entry_script)  # its config parses with every default


def test_the_cli_help_lists_every_stage_from_the_registry():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name, stage in STAGES.items():
        assert f"trainrig {name} ..." in out and stage.help in out
    assert "inspect {" + ",".join(STAGES) + "}" in out
    assert "plan --stage {" + ",".join(plan_names()) + "}" in out


def test_planner_names_are_the_stages_and_their_from_checkpoint_variants():
    names = plan_names()
    assert list(names) == ["pretrain", "cpt", "sft", "reward", "dpo"]
    assert names["cpt"] is STAGES["pretrain"]
    pretrain = STAGES["pretrain"]
    assert [pretrain.loads_weights(n) for n in ("pretrain", "cpt")] == [False, True] and STAGES["sft"].loads_weights("sft")
    assert pretrain.plan_name(parse_run(pretrain.config, ["--model_name_or_path", "m"], "p").cfg) == "cpt"
    assert pretrain.plan_name(parse_run(pretrain.config, ["--model_preset", "tiny"], "p").cfg) == "pretrain"
    with pytest.raises(UsageError, match="one of launch/pretrain.py, launch/sft.py, launch/reward.py, launch/dpo.py"):
        stage_of_script("launch/evaluate.py")


def test_the_reliability_suite_covers_every_training_stage():
    from reliability.stages import TRAINING_STAGES

    assert tuple(TRAINING_STAGES) == tuple(STAGES)


# ------------------------------------------------------------------------------ state


def test_train_state_round_trips_with_its_layout():
    state = TrainState(step=7, epoch=1, samples_in_epoch=12, input_tokens=900, trained_tokens=300, world_size=2,
                       best_eval_loss=1.5, best_checkpoint="checkpoint-6", layout={"micro_batch": 4, "packing": True})
    record = state.to_json()
    assert record["micro_batch"] == 4 and "layout" not in record  # flat, as trainer_state.json always was
    assert TrainState.from_json(record) == state


@pytest.mark.parametrize("old, expected", [
    ({"tokens_seen": 640}, {"trained_tokens": 640, "input_tokens": 0}),  # pretraining
    ({"tokens_seen": 647, "input_tokens_seen": 2832}, {"trained_tokens": 647, "input_tokens": 2832}),  # SFT
    ({"tokens_seen": 5000, "pairs_seen": 24}, {"trained_pairs": 24, "input_tokens": 5000, "trained_tokens": 0}),  # reward
], ids=["pretrain", "sft", "reward"])
def test_trainer_state_of_0_9_loads_with_what_each_count_meant(old, expected):
    record = {"step": 6, "micro_step": 6, "epoch": 0, "samples_in_epoch": 24, "world_size": 1, "best_eval_loss": None,
              "best_checkpoint": None, "skipped_steps": 0, "bad_steps_in_a_row": 0, "micro_batch": 4, "accumulation": 1, **old}
    state = TrainState.from_json(record)
    assert {k: getattr(state, k) for k in expected} == expected
    assert state.step == 6 and state.layout == {"micro_batch": 4, "accumulation": 1}


def test_validation_split_is_seeded_sorted_and_holds_out_at_least_one():
    train, held = validation_split(100, 0.05, seed=3)
    assert len(held) == 5 and len(train) == 95 and not set(train) & set(held)
    assert list(train) == sorted(train) and list(held) == sorted(held)
    again, held_again = validation_split(100, 0.05, seed=3)
    assert np.array_equal(held, held_again) and not np.array_equal(held, validation_split(100, 0.05, seed=4)[1])
    assert len(validation_split(10, 0.01, seed=0)[1]) == 1  # at least one
    assert validation_split(1, 0.5, seed=0)[1] is None and validation_split(50, 0, seed=0)[1] is None
