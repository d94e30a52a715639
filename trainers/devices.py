"""The GPUs the machine has against the GPUs torch can use, and the CUDA math settings.

A torch wheel built for a newer CUDA than the driver supports (today's default PyPI wheel is a
CUDA 13 build, which needs driver >= 580) imports fine and reports `torch.cuda.is_available()`
False; so does a CPU-only wheel. Nothing fails after that: training silently runs on the CPU,
hundreds of times slower, on a machine whose `nvidia-smi -L` lists GPUs. Every entry script
(through the runtimes and hardware detection) and `trainrig doctor` refuse that instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from trainers.errors import UsageError

# The GPU install trainrig pins (Makefile): the newest torch release built for CUDA 12.8, whose
# kernels cover sm_80 through the RTX 5090's sm_120 and which runs on drivers >= 570. Releases
# 2.12+ ship CUDA 12.6 (no sm_120) and CUDA 13 (driver >= 580) builds only.
GPU_TORCH_VERSION = "2.11.0"
GPU_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
GPU_TORCH_INSTALL = f"pip install --force-reinstall torch=={GPU_TORCH_VERSION} --index-url {GPU_TORCH_INDEX}"
# flash-attn's setup.py imports torch, so it cannot build in pip's isolated build environment
# (which is why trainrig has no `[flash]` extra); prebuilt wheels are named by torch, CUDA and Python.
FLASH_INSTALL = ("pip install flash-attn --no-build-isolation (it compiles against the installed torch: needs nvcc and "
                 "~10-60 min; a prebuilt wheel from the flash-attention releases page that names your torch, CUDA and "
                 "Python versions installs in seconds)")
# The oldest Linux driver each CUDA runtime of torch's wheels needs (NVIDIA's CUDA release notes,
# table 3: toolkit and minimum driver versions), by (major, minor) of the build.
MIN_DRIVER = {(13, 0): 580, (12, 8): 570, (12, 6): 560, (12, 4): 550, (12, 1): 530, (11, 8): 520}


def nvidia_smi_gpus() -> list[str]:
    """`nvidia-smi -L` lines ("GPU 0: NVIDIA GeForce RTX 5090 (UUID: ...)"); [] without nvidia-smi or GPUs."""
    return [line for line in _nvidia_smi("-L").splitlines() if line.startswith("GPU ")]


def driver_version() -> str:
    """The NVIDIA driver's version ("550.54.15"), "" where nvidia-smi cannot say."""
    lines = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader").split()
    return lines[0] if lines else ""


def _nvidia_smi(*args: str) -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return ""


def min_driver_for(cuda: str) -> int:
    """The oldest driver a torch build for CUDA `cuda` ("12.8", "13.0") runs on."""
    major, minor = (int(x) for x in cuda.split(".")[:2])
    known = [(version, driver) for version, driver in MIN_DRIVER.items() if version <= (major, minor)]
    return max(known)[1] if known else 0


def blind_torch_problem(gpus: list[str], cuda_available: bool, torch_version: str, torch_cuda: str | None,
                        driver: str, visible_devices: str | None) -> tuple[str, str]:
    """(why torch sees none of the GPUs nvidia-smi lists, the command or change that fixes it);
    ("", "") when there is nothing to say: torch sees GPUs, there are none, or CUDA_VISIBLE_DEVICES
    hides them on purpose ("" or -1, as this project's tests and CPU-only runs on GPU boxes do)."""
    if cuda_available or not gpus or visible_devices in ("", "-1"):
        return "", ""
    names = sorted({line.split(":", 1)[1].split("(UUID")[0].strip() for line in gpus if ":" in line})
    have = f"nvidia-smi lists {len(gpus)} GPU(s) ({', '.join(names)}; driver {driver or 'unknown'})"
    cpu = "so training would run on the CPU (to do that on purpose, set CUDA_VISIBLE_DEVICES='')"
    if torch_cuda is None:
        return f"{have} but torch {torch_version} is a CPU-only build, {cpu}", GPU_TORCH_INSTALL
    if visible_devices is not None:
        return (f"{have} but torch {torch_version} (CUDA {torch_cuda}) sees none with CUDA_VISIBLE_DEVICES={visible_devices!r}",
                f"name GPUs that exist (0..{len(gpus) - 1}) in CUDA_VISIBLE_DEVICES, or unset it")
    needed = min_driver_for(torch_cuda)
    try:
        driver_major = int(driver.split(".")[0])
    except ValueError:
        driver_major = 0
    if driver_major and driver_major < needed:
        return (f"{have} but torch {torch_version} is a CUDA {torch_cuda} build, which needs driver >= {needed}, so it sees no GPU "
                f"and {cpu.removeprefix('so ')}; install the CUDA 12.8 build trainrig pins (drivers >= 570), or update the driver "
                f"to >= {needed}", GPU_TORCH_INSTALL)
    return (f"{have} but torch {torch_version} (CUDA {torch_cuda}) sees none, {cpu}; check that the driver is loaded "
            f"(nvidia-smi runs, /dev/nvidia* exist, the container was started with GPUs), or reinstall torch", GPU_TORCH_INSTALL)


def require_torch_sees_gpus() -> None:
    """Stop (exit 2) where nvidia-smi lists GPUs that torch cannot use; costs nothing where torch
    sees its GPUs or the machine has none (nvidia-smi is asked only when torch sees no GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    problem, fix = blind_torch_problem(nvidia_smi_gpus(), False, torch.__version__, torch.version.cuda, driver_version(),
                                       os.environ.get("CUDA_VISIBLE_DEVICES"))
    if problem:
        raise UsageError(f"{problem}; fix: {fix}")


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on Ampere and newer (the fp32 master-weight math,
    the chunked loss's head gradient) through torch's fp32_precision settings; the legacy
    allow_tf32 flags are deprecated, and inductor rejects a mix of the two."""
    import torch

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def resolve_precision(requested: str, gpu: bool, bf16: bool) -> str:
    """The training precision for `requested` (auto, fp32, bf16, fp16) on a device: a GPU (`gpu`)
    with or without bf16 (pre-Ampere), or a CPU. The runtime passes what torch sees; the planner
    the hardware profile it plans for, so both decide alike."""
    if requested == "fp16" and not gpu:
        raise UsageError("--precision fp16 needs a CUDA GPU (CPU autocast has no fp16); use --precision fp32 or bf16")
    if requested == "bf16" and gpu and not bf16:
        raise UsageError("--precision bf16: this GPU has no bf16 (pre-Ampere); use --precision fp16")
    if requested != "auto":
        return requested
    if gpu:
        return "bf16" if bf16 else "fp16"
    return "fp32"  # CPU: bf16 autocast is slower than fp32 on most CPUs and changes results
