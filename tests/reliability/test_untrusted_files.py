"""Files from elsewhere cannot run code unless the user says so.

a. A checkpoint whose torch file holds a pickle payload (an object whose `__reduce__` calls
   os.mkdir) is refused before any of it runs, even after the attacker re-sealed the manifest
   (sizes and sha256 recomputed, so the integrity check passes): `--resume <path>` and
   `--resume auto` exit 2 naming the file and saying "refused", and the payload's marker directory
   does not exist. The same for DeepSpeed ZeRO-2 shards (2 ranks), which DeepSpeed itself would
   unpickle without restriction. A control shows each payload is live: an unrestricted
   torch.load of the same kind of file does create its marker.
b. A model directory whose config.json has `auto_map` custom code is refused without
   --trust_remote_code (exit 2 naming config.json and the flag; the code never imported), and with
   the flag it trains and its code did run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, VENV_BIN, free_port, pretrain_args, read_losses, run_launcher
from launch.pretrain import main as pretrain_main

pytestmark = [pytest.mark.reliability]

MANIFEST = "trainrig_complete.json"


class Payload:
    """Unpickling this calls os.mkdir(marker): the classic pickle code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a payload that keeps the file's usual look (a dict of tensors)."""
    torch.save({"state": {0: torch.zeros(3)}, "payload": Payload(marker)}, path)


def reseal(checkpoint: Path) -> dict:
    """What an attacker does after editing files: rewrite the manifest from the files on disk,
    `{"step": N, "files": {relative path: {"bytes": size, "sha256": hex}}}`, every file but itself."""
    files = {}
    for p in sorted(checkpoint.rglob("*")):
        if p.is_file() and p != checkpoint / MANIFEST:
            files[p.relative_to(checkpoint).as_posix()] = {"bytes": p.stat().st_size,
                                                           "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    manifest = {"step": int(checkpoint.name.split("-")[1]), "files": files}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def test_payload_is_live(tmp_path):
    """The control: the planted file does run its code under an unrestricted load."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.is_dir()


@pytest.fixture(scope="module")
def saved_run(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt_run")
    pretrain_main(pretrain_args(corpus, tokenizer_dir, out, max_steps=2, save_steps=2))
    checkpoint = out / "checkpoint-2"
    written = json.loads((checkpoint / MANIFEST).read_text())
    # reseal() writes the trainer's own manifest format: unchanged files give the same manifest
    assert reseal(checkpoint) == written, "the manifest format changed; update reseal()"
    return out


@pytest.mark.parametrize("resume", ["path", "auto"])
@pytest.mark.parametrize("victim", ["optimizer.pt", "rng_state_0.pt"])
def test_pickle_payload_in_checkpoint_is_refused(victim, resume, saved_run, corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoint-2", out / "checkpoint-2")
    marker = tmp_path / "pwned"
    plant(out / "checkpoint-2" / victim, marker)
    reseal(out / "checkpoint-2")
    from trainers.checkpoint import verify

    assert verify(out / "checkpoint-2") is None  # the re-sealed checkpoint passes the integrity check
    argv = pretrain_args(corpus, tokenizer_dir, out, max_steps=4, save_steps=2,
                         resume=str(out / "checkpoint-2") if resume == "path" else "auto")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain_main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    assert info.value.code == 2, f"exit {info.value.code}\n{err[-3000:]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert str(out / "checkpoint-2" / victim) in lines[0] and "refused" in lines[0], lines[0]
    assert not (out / "metrics.jsonl").exists() or not read_losses(out)  # no step trained on top of it


@pytest.mark.slow
def test_pickle_payload_in_deepspeed_shard_is_refused(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "zero2"
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    common = {"deepspeed": "ds_configs/zero2.json", "save_steps": 2}
    run_launcher([*launcher, *pretrain_args(corpus, tokenizer_dir, out, max_steps=2, **common)])
    checkpoint = out / "checkpoint-2"
    victim = checkpoint / "deepspeed" / "mp_rank_00_model_states.pt"
    assert victim.is_file(), sorted(p.name for p in (checkpoint / "deepspeed").iterdir())
    marker = tmp_path / "pwned"
    plant(victim, marker)
    reseal(checkpoint)
    (out / "metrics.jsonl").unlink()

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    launcher[4] = str(free_port())
    proc = subprocess.run([*launcher, *pretrain_args(corpus, tokenizer_dir, out, max_steps=4, resume="auto", **common)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert not marker.exists(), "the DeepSpeed shard's pickle payload ran"
    assert proc.returncode == 2, f"exit {proc.returncode}\n{output[-6000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(str(victim) in e and "refused" in e for e in errors), output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    assert not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------- b. remote code

CONFIG_CODE = """
import pathlib
pathlib.Path({marker!r}).joinpath("configuration_custom").touch()
from transformers import Qwen2Config


class CustomConfig(Qwen2Config):
    pass
"""

MODELING_CODE = """
import pathlib
pathlib.Path({marker!r}).joinpath("modeling_custom").touch()
from transformers import Qwen2ForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(Qwen2ForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def remote_code_model(tokenizer_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A tiny Qwen2 checkpoint whose config.json maps AutoConfig/AutoModelForCausalLM to its own
    Python files; importing either creates a file in the marker directory. Transformers' module
    cache is a private directory, and what the remote code registers is dropped afterwards."""
    import sys

    import transformers.dynamic_module_utils as dmu
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from trainers.models import load_preset, padded_vocab_size

    modules = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(modules))  # read once at import: patch the module too
    monkeypatch.setattr(sys, "path", list(sys.path))
    marker = tmp_path / "ran"
    marker.mkdir()
    model_dir = tmp_path / "custom_model"
    config = Qwen2Config(**load_preset("tiny"), vocab_size=padded_vocab_size(AutoTokenizer.from_pretrained(tokenizer_dir)))
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    (model_dir / "configuration_custom.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    (model_dir / "modeling_custom.py").write_text(MODELING_CODE.format(marker=str(marker)))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    yield model_dir, marker
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]


@pytest.mark.slow
def test_remote_code_needs_trust_remote_code(remote_code_model, corpus, tokenizer_dir, tmp_path, capsys):
    model_dir, marker = remote_code_model

    def args(out, **kw):
        return pretrain_args(corpus, tokenizer_dir, out, model_preset=None, model_name_or_path=model_dir, max_steps=2, **kw)

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain_main(args(tmp_path / "refused"))
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert str(model_dir / "config.json") in lines[0] and "--trust_remote_code" in lines[0], lines[0]
    assert list(marker.iterdir()) == [], "the model's own code ran without --trust_remote_code"
    assert not (tmp_path / "hf_modules" / "transformers_modules").exists()  # not even copied into the module cache

    out = tmp_path / "trusted"
    summary = pretrain_main(args(out, trust_remote_code=True))
    assert summary["step"] == 2 and sorted(read_losses(out)) == [1, 2]
    assert sorted(p.name for p in marker.iterdir()) == ["configuration_custom", "modeling_custom"]  # allowed, so it ran
