"""A GPU machine whose torch cannot use its GPUs is refused, never trained on its CPU: with a fake
nvidia-smi on PATH listing an RTX 5090 (this CPU torch sees none), every entry script and
`trainrig doctor` exit 2 naming the torch build, the driver and the fix. And TF32 goes through
torch's fp32_precision settings, never the legacy flags."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, VENV_BIN, pretrain_args, sft_args

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA GeForce RTX 5090 (UUID: GPU-8c1e6c0a-0000-0000-0000-000000000000)" ;;
  *driver_version*) echo "550.54.15" ;;
  *memory.free*) echo "32000" ;;
  *) echo "NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4" ;;
esac
"""


@pytest.fixture
def gpu_machine_env(tmp_path) -> dict:
    """The environment of a machine with a GPU this torch cannot see (CUDA_VISIBLE_DEVICES unset)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}:{VENV_BIN}:{env.get('PATH', '')}"
    return env


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_refused(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr[-2000:]
    line = error[0]
    assert "NVIDIA GeForce RTX 5090" in line and "driver 550.54.15" in line and torch.__version__ in line
    assert "pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128" in line


@pytest.mark.slow
def test_every_entry_script_refuses_a_torch_blind_to_the_gpus(corpus, tokenizer_dir, chat_dir, sft_model_dir, tmp_path, gpu_machine_env):
    runs = {
        "pretrain": ["launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, tmp_path / "pt")],
        "pretrain-auto-batch": ["launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, tmp_path / "pt2", per_device_train_batch_size="auto")],
        "sft": ["launch/sft.py", *sft_args(chat_dir, sft_model_dir, tmp_path / "sft")],
        "reward": ["launch/reward.py", "--model_name_or_path", str(sft_model_dir), "--train_files", str(chat_dir / "sft.jsonl"),
                   "--output_dir", str(tmp_path / "rm")],
        "dpo": ["launch/dpo.py", "--model_name_or_path", str(sft_model_dir), "--train_files", str(chat_dir / "sft.jsonl"),
                "--output_dir", str(tmp_path / "dpo")],
        "evaluate": ["launch/evaluate.py", "--model_name_or_path", str(sft_model_dir), "--eval_files", str(chat_dir / "heldout.jsonl"),
                     "--output_dir", str(tmp_path / "eval")],
        "plan": ["-m", "launch.cli", "plan", "--stage", "sft", "--model_name_or_path", "qwen2.5-0.5b", "--output_dir", str(tmp_path / "plan")],
    }
    for name, argv in runs.items():
        proc = _run(argv, gpu_machine_env)
        _assert_refused(proc)
        assert not (tmp_path / name / "metrics.jsonl").exists()


def test_doctor_exits_2_on_a_torch_blind_to_the_gpus(gpu_machine_env, tmp_path):
    proc = _run(["-m", "launch.cli", "doctor", "--output_dir", str(tmp_path)], gpu_machine_env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    torch_line = next(line for line in proc.stdout.splitlines() if line.startswith("FAIL  torch"))
    assert "NVIDIA GeForce RTX 5090" in torch_line and "driver 550.54.15" in torch_line
    assert "fix: pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128" in torch_line


def test_hiding_the_gpus_on_purpose_trains_on_the_cpu(gpu_machine_env, corpus, tokenizer_dir, tmp_path):
    env = {**gpu_machine_env, "CUDA_VISIBLE_DEVICES": ""}
    proc = _run(["launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, tmp_path / "pt", max_steps=1)], env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tf32_goes_through_the_new_api_only():
    from trainers.devices import enable_tf32

    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when the legacy flags are set
            enable_tf32()
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
    sources = [p for d in ("trainers", "launch") for p in (REPO / d).rglob("*.py")]
    assert not [p for p in sources if "allow_tf32 =" in p.read_text()]  # no legacy flag set anywhere


def test_the_makefile_installs_the_gpu_torch_the_messages_name():
    from trainers.devices import GPU_TORCH_INDEX, GPU_TORCH_VERSION

    makefile = (REPO / "Makefile").read_text()
    assert f"$(if $(HAS_GPU),torch=={GPU_TORCH_VERSION}," in makefile
    assert f"$(if $(HAS_GPU),--index-url {GPU_TORCH_INDEX})" in makefile
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"dev"}  # no [flash]: flash-attn cannot build in pip's isolated environment
