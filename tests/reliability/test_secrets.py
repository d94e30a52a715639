"""Secrets in the environment never reach disk or the logs.

With HF_TOKEN and WANDB_API_KEY set to distinctive random values, every byte a run leaves behind
is searched for them: the output directory recursively (checkpoints, DeepSpeed ZeRO shards, in
which DeepSpeed pickles its config, resolved_config.yaml, plan.json, ds_config.json,
accelerate.yaml, metrics, final/, and the wandb/ offline run with its config, debug logs and
.wandb file), plus everything the run printed. Runs: (a) one process with --report_to wandb and a
checkpoint; (b) `trainrig launch` planning a 2-rank ZeRO-2 run (writing plan.json and
ds_config.json) and running it with a checkpoint and wandb. A --run_name that carries the token
(a job script building names from the environment) must be redacted too: in the tracker's run
name, in the command line wandb records, and in the command `trainrig launch` prints and keeps in
plan.json. The scan itself is checked: it finds a planted secret, and it does see inside the ZeRO
shards and the wandb files (the DeepSpeed config, the run config and the command line are
readable there as plain bytes).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from conftest import VENV_BIN, pretrain_args, read_losses, run_launcher
from launch.pretrain import main as pretrain_main

pytestmark = [pytest.mark.reliability]


@pytest.fixture
def env_secrets(monkeypatch) -> dict[str, str]:
    values = {"HF_TOKEN": "hf_" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y"),
              "WANDB_API_KEY": secrets.token_hex(20)}  # 40 hex characters, like a real key
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return values


def scan(roots: list[Path], texts: dict[str, str], needles: dict[str, str]) -> list[str]:
    """`place: NAME` for every file under `roots` (binary, recursive) and every captured text
    that contains a needle's value."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {name}" for name, value in needles.items() if value.encode() in data]
    for label, text in texts.items():
        found += [f"{label}: {name}" for name, value in needles.items() if value in text]
    return found


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_scan_finds_a_planted_secret(env_secrets, tmp_path):
    """The control: the scan is not blind (binary files, nested directories, captured text)."""
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "blob.pt").write_bytes(os.urandom(4096) + env_secrets["WANDB_API_KEY"].encode() + os.urandom(4096))
    (tmp_path / "clean.txt").write_text("nothing to see")
    found = scan([tmp_path], {"stdout": f"token={env_secrets['HF_TOKEN']}"}, env_secrets)
    assert found == [f"{nested / 'blob.pt'}: WANDB_API_KEY", "stdout: HF_TOKEN"]


def _assert_tracker_config_scanned(out: Path) -> None:
    """The wandb offline run exists and the run's config is in its files, where the scan looked."""
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, sorted(p.name for p in out.iterdir())
    assert scan([out / "wandb"], {}, {"config": "block_size"}), [str(p) for p in files_under(out / "wandb")]


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["plain", "with_token"])
def test_single_process_run_leaks_no_secret(run_name, env_secrets, corpus, tokenizer_dir, tmp_path, capfd, caplog):
    """with_token: a --run_name that carries the token (built from the environment by a job
    script) is redacted everywhere too, the tracker's run name included."""
    out = tmp_path / "single"
    name = f"cpt-{env_secrets['HF_TOKEN']}" if run_name == "with_token" else ""
    with caplog.at_level("INFO"):
        pretrain_main(pretrain_args(corpus, tokenizer_dir, out, max_steps=2, save_steps=2, eval_steps=2, report_to="wandb",
                                    run_name=name or None))
    captured = capfd.readouterr()
    assert sorted(read_losses(out)) == [1, 2] and (out / "checkpoint-2" / "optimizer.pt").is_file()
    _assert_tracker_config_scanned(out)
    leaks = scan([out], {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}, env_secrets)
    assert leaks == [], leaks


@pytest.mark.slow
def test_launch_zero2_two_ranks_leaks_no_secret(env_secrets, corpus, tokenizer_dir, tmp_path):
    """`trainrig launch` plans (plan.json, ds_config.json, accelerate.yaml), then runs 2 CPU ranks
    under ZeRO-2 with a checkpoint of DeepSpeed shards and a wandb run. The --run_name carries
    the token, as a job script building names from the environment would."""
    out = tmp_path / "zero2"
    args = pretrain_args(corpus, tokenizer_dir, out, max_steps=2, save_steps=2, report_to="wandb",
                         run_name=f"zero2-{env_secrets['HF_TOKEN']}")
    proc = run_launcher([str(VENV_BIN / "trainrig"), "launch", "pretrain", "--hardware", "2xcpu", "--zero_stage", "2", *args],
                        env=env_secrets)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"]["zero_stage"] == 2 and plan["world_size"] == 2, plan
    assert (out / "ds_config.json").is_file() and (out / "accelerate.yaml").is_file()
    shards = sorted((out / "checkpoint-2" / "deepspeed").glob("*.pt"))
    assert len(shards) == 3, shards  # the model states and one optimizer shard per rank
    assert sorted(read_losses(out)) == [1, 2]
    _assert_tracker_config_scanned(out)
    # DeepSpeed pickles its config into the shards as plain bytes: the scan would see a secret there
    assert set(scan([out / "checkpoint-2" / "deepspeed"], {}, {"ds": "train_micro_batch_size_per_gpu"})) >= \
        {f"{shards[0]}: ds"}
    # wandb records the command line (where --run_name carries the token) and launch prints it: both redacted
    assert scan([out / "wandb"], {}, {"argv": "--run_name"}) and "launch: " in proc.stdout
    leaks = scan([out], {"stdout": proc.stdout, "stderr": proc.stderr}, env_secrets)
    assert leaks == [], leaks


def test_trainrig_plan_files_leak_no_secret(env_secrets, corpus, tokenizer_dir, tmp_path, capsys):
    """`trainrig plan` alone: plan.json keeps the launch command, which would carry --run_name."""
    from launch.plan import main_plan

    out = tmp_path / "plan"
    args = pretrain_args(corpus, tokenizer_dir, out, run_name=f"plan-{env_secrets['HF_TOKEN']}")
    assert main_plan(["--stage", "pretrain", "--hardware", "2xcpu", "--zero_stage", "2", *args]) == 0
    captured = capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert "--run_name" in plan["command"] and (out / "ds_config.json").is_file() and (out / "accelerate.yaml").is_file()
    leaks = scan([out], {"stdout": captured.out, "stderr": captured.err}, env_secrets)
    assert leaks == [], leaks
