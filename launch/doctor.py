"""`trainrig doctor [--output_dir DIR] [--json]`: the environment problems users otherwise find one
crash at a time -- a torch build without kernels for the GPU (RTX 5090 on a cu124 wheel), no bf16,
a broken flash-attn wheel, DeepSpeed's CPU Adam that cannot be JIT-built for --offload, GeForce
GPUs without peer access that hang NCCL, too little RAM or disk -- each with the command that fixes it.

Every check is a small function of the facts (so tests feed fake ones); thin gatherers collect the
facts on this machine. A missing or broken library is a result, never a crash. Exit 1 when any check
failed, else 0 (warnings allowed); 2 when torch cannot use the GPUs nvidia-smi lists, the check every entry
script stops at too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launch.planner.hardware import host_ram_bytes, available_ram_bytes, kernel_support
from trainers.devices import FLASH_INSTALL, GPU_TORCH_INSTALL, blind_torch_problem, driver_version, nvidia_smi_gpus
from trainers.errors import USAGE_EXIT_CODE
from trainers.quantization import BNB_INSTALL
from trainers.extensions import extension_build_dir, stale_build_locks

GB = 10**9
MIN_FREE_DISK_BYTES = 20 * GB  # one 7B checkpoint with optimizer states is ~100 GB; 20 GB holds a ~1B one
MIN_AVAILABLE_RAM_BYTES = 16 * GB  # --offload keeps ~16-18 bytes per parameter in host RAM: a 1B model ~17 GB
CUDA_TORCH_FIX = GPU_TORCH_INSTALL
FLASH_FALLBACK = "trainrig falls back to PyTorch SDPA (memory-efficient kernel); expect roughly 10-20% lower throughput at long sequences"
LIBRARIES = ("accelerate", "transformers", "peft", "datasets", "tokenizers")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""  # the exact command or action that fixes a warn/fail; empty on pass

    def line(self) -> str:
        return f"{self.status.upper():<5} {self.name:<14} {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    bf16: bool


# ------------------------------------------------------------------------------------ checks


def check_python(version: tuple[int, int, int]) -> Check:
    text = ".".join(map(str, version))
    if version[:2] >= (3, 10):
        return Check("python", "pass", text)
    return Check("python", "fail", f"{text}; trainrig needs 3.10+", "python3.11 -m venv .venv && .venv/bin/pip install -e .")


def check_torch(version: str, cuda_build: str | None, gpu_count: int, blind: tuple[str, str]) -> Check:
    """blind: trainers.devices.blind_torch_problem's (problem, fix); ("", "") when torch sees the GPUs there are."""
    if blind[0]:
        return Check("torch", "fail", *blind)
    seen = f"{gpu_count} CUDA GPU(s)" if gpu_count else "no GPU visible"
    return Check("torch", "pass", f"{version}, CUDA build {cuda_build or 'none'}, {seen}")


def check_cuda_arch(device_name: str, capability: tuple[int, int], arch_list: list[str], cuda_version: str | None) -> Check:
    problem = kernel_support(capability, arch_list, cuda_version, device_name)
    if not problem:
        return Check("cuda arch", "pass", f"{device_name} is sm_{capability[0]}{capability[1]}; this torch build (CUDA {cuda_version}) runs it")
    command = problem.find("pip install")  # kernel_support's message ends with the command that fixes it
    if command < 0:
        return Check("cuda arch", "fail", problem, problem)
    return Check("cuda arch", "fail", problem[:command].rstrip(": "), problem[command:])


def check_precision(gpu: GPU) -> Check:
    tf32 = "TF32 matmuls" if gpu.capability >= (8, 0) else "no TF32 (needs sm_80+)"
    if gpu.bf16:
        return Check("bf16/tf32", "pass", f"{gpu.name}: bf16, {tf32}")
    return Check("bf16/tf32", "warn", f"{gpu.name}: no bf16 (needs Ampere, sm_80+), {tf32}; fp16 needs loss scaling",
                 "train with --precision fp16")


def check_flash_attn(gpus: list[GPU], installed: bool, problem: str) -> Check:
    """problem: trainers.attention.flash_attn_problem on the first GPU ("" when flash-attn runs there)."""
    if not gpus:
        return Check("flash-attn", "skip", "flash-attn needs a CUDA GPU; PyTorch SDPA is used")
    weakest = min(gpus, key=lambda g: g.capability)
    if weakest.capability < (8, 0) or not weakest.bf16:
        return Check("flash-attn", "skip", f"flash-attn needs an Ampere or newer GPU; {weakest.name} is not: PyTorch SDPA is used")
    if not installed:
        return Check("flash-attn", "warn", f"not installed; {FLASH_FALLBACK}", FLASH_INSTALL)
    if problem:  # imports but does not run here (a wheel without kernels for this card), or does not import
        return Check("flash-attn", "fail", f"{problem}; {FLASH_FALLBACK}",
                     f"pip uninstall -y flash-attn && {FLASH_INSTALL.replace('pip install flash-attn', 'pip install flash-attn --no-cache-dir', 1)}")
    return Check("flash-attn", "pass", f"runs on {gpus[0].name} (bf16 forward and backward equal to SDPA); used for bf16/fp16 runs")


def check_library(name: str, version: str | None, import_error: str) -> Check:
    if version is None:
        return Check(name, "fail", f"does not import ({import_error})", "pip install -e .")
    return Check(name, "pass", version)


def check_bitsandbytes(version: str | None, import_error: str, problem: str, device: str) -> Check:
    """--load_in_4bit/--load_in_8bit's library: it imports, and a tiny NF4 layer runs on this device."""
    if version is None:
        return Check("bitsandbytes", "fail", f"does not import ({import_error}); --load_in_4bit/--load_in_8bit need it", BNB_INSTALL)
    if problem:
        return Check("bitsandbytes", "fail", f"{version}: its 4-bit layer does not run on {device} ({problem})",
                     f"{BNB_INSTALL} (a build with kernels for this device)")
    return Check("bitsandbytes", "pass", f"{version}: a 4-bit NF4 layer runs on {device} (QLoRA: --load_in_4bit)")


def check_deepspeed(version: str | None, import_error: str, cpu_adam_compatible: bool, compiler: str | None, ninja: bool) -> list[Check]:
    if version is None:
        return [check_library("deepspeed", None, import_error), Check("cpu adam", "skip", "needs DeepSpeed")]
    fixes = [fix for missing, fix in ((not compiler, "apt-get install build-essential"), (not ninja, "pip install ninja")) if missing]
    offload = "DeepSpeedCPUAdam (--offload optimizer|all)"
    if not cpu_adam_compatible:
        adam = Check("cpu adam", "warn", f"DeepSpeed reports {offload} incompatible with this machine", "run ds_report for the reason")
    elif fixes:
        adam = Check("cpu adam", "warn", f"{offload} cannot be JIT-built: needs a C++ compiler and ninja", " && ".join(fixes))
    else:  # built on first use, once per torch version (~110 s on 2 cores), then cached in TORCH_EXTENSIONS_DIR
        adam = Check("cpu adam", "pass", f"{offload} can be JIT-built here ({compiler}, ninja); the first offload run compiles it, ~2 min")
    return [check_library("deepspeed", version, ""), adam]


def check_nccl(available: bool, gpu_count: int) -> Check:
    if not gpu_count:
        return Check("nccl", "skip", "no CUDA GPU; multi-process CPU runs use gloo")
    if available:
        return Check("nccl", "pass", "available in this torch build")
    return Check("nccl", "fail" if gpu_count > 1 else "warn", "this torch build has no NCCL: no multi-GPU training", CUDA_TORCH_FIX)


def check_peer_access(access: list[list[bool]], p2p_disabled: bool) -> Check:
    """access[i][j]: GPU i can read GPU j's memory directly."""
    if len(access) < 2:
        return Check("peer access", "skip", "fewer than 2 GPUs")
    pairs = [(i, j) for i in range(len(access)) for j in range(i + 1, len(access)) if not (access[i][j] and access[j][i])]
    if not pairs:
        return Check("peer access", "pass", f"all {len(access)} GPUs reach each other peer-to-peer")
    i, j = pairs[0]
    if p2p_disabled:
        return Check("peer access", "pass", f"GPUs {i} and {j} have no peer-to-peer access; NCCL_P2P_DISABLE=1 routes through host RAM")
    # NCCL otherwise tries its P2P transport on such cards and can hang at the first all-reduce
    return Check("peer access", "warn", f"GPUs {i} and {j} have no peer-to-peer access (GeForce cards); NCCL must be told",
                 "export NCCL_P2P_DISABLE=1 (trainrig launch sets it)")


def check_ram(total_bytes: int, available_bytes: int) -> Check:
    if not available_bytes:
        return Check("ram", "skip", f"{total_bytes / GB:.1f} GB total; available unknown (no /proc/meminfo)")
    detail = f"{available_bytes / GB:.1f} GB available of {total_bytes / GB:.1f} GB"
    if available_bytes >= MIN_AVAILABLE_RAM_BYTES:
        return Check("ram", "pass", detail)
    return Check("ram", "warn", f"{detail}; --offload needs ~16-18 bytes of host RAM per parameter (a 1B model ~17 GB)",
                 "close other processes, train without --offload, or use a machine with more RAM")


def check_disk(path: Path, free_bytes: int) -> Check:
    detail = f"{free_bytes / GB:.1f} GB free at {path}"
    if free_bytes >= MIN_FREE_DISK_BYTES:
        return Check("disk", "pass", detail)
    # bf16 weights 2 + fp32 master weights 4 + Adam moments 8 = 14 bytes/param: 7B -> ~100 GB per checkpoint
    return Check("disk", "warn", f"{detail}; a 7B model's checkpoint with optimizer states is ~100 GB",
                 "free space, or pass --output_dir on a larger disk")


def check_build_locks(stale: list[Path]) -> Check:
    """torch JIT-extension locks left by killed builds or loads: DeepSpeed's next load waits on them forever."""
    if not stale:
        return Check("build locks", "pass", "no interrupted JIT extension build")
    return Check("build locks", "fail", f"{len(stale)} left by an interrupted JIT extension load or build ({', '.join(map(str, stale))}): "
                 "every DeepSpeed run would hang loading that op", "rm " + " ".join(map(str, stale)))


# ---------------------------------------------------------------------------------- gathering


def _import(name: str):
    """(module, "") or (None, why). A broken binary raises OSError/RuntimeError, a version clash
    AttributeError or the like: all mean "not usable", none may crash the doctor."""
    try:
        return importlib.import_module(name), ""
    except Exception as err:
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


def _cuda_facts(torch) -> tuple[list[GPU], list[list[bool]]]:
    """The visible GPUs and their peer-access matrix (empty on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return [], []
    count = torch.cuda.device_count()
    gpus = [GPU(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i),
                torch.cuda.is_bf16_supported(including_emulation=False)) for i in range(count)]
    access = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(count)] for i in range(count)]
    return gpus, access


def torch_checks() -> list[Check]:
    torch, error = _import("torch")
    if torch is None:
        return [check_library("torch", None, error)]
    try:
        gpus, access = _cuda_facts(torch)
    except RuntimeError as err:  # a driver/runtime mismatch surfaces here rather than at import
        return [Check("torch", "fail", f"{torch.__version__}: CUDA fails to initialise ({err})", CUDA_TORCH_FIX)]
    blind = ("", "") if gpus else blind_torch_problem(nvidia_smi_gpus(), False, torch.__version__, torch.version.cuda, driver_version(),
                                                os.environ.get("CUDA_VISIBLE_DEVICES"))
    checks = [check_torch(torch.__version__, torch.version.cuda, len(gpus), blind)]
    models = list({(g.name, g.capability): g for g in gpus}.values())  # one line per GPU model, not eight for 8 H100s
    if models:
        checks += [check_cuda_arch(g.name, g.capability, torch.cuda.get_arch_list(), torch.version.cuda) for g in models]
        checks += [check_precision(g) for g in models]
    else:
        checks += [Check("cuda arch", "skip", "no CUDA GPU"), Check("bf16/tf32", "skip", "no CUDA GPU")]
    from trainers.attention import flash_attn_problem
    from trainers.quantization import bnb_problem

    installed = importlib.util.find_spec("flash_attn") is not None
    problem = flash_attn_problem(torch.device("cuda", 0)) if gpus and installed else ""
    checks.append(check_flash_attn(gpus, installed, problem))
    bnb, bnb_error = _import("bitsandbytes")
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    checks.append(check_bitsandbytes(getattr(bnb, "__version__", "?") if bnb else None, bnb_error,
                                     bnb_problem(device) if bnb else "", gpus[0].name if gpus else "the CPU"))
    checks.append(check_nccl(torch.distributed.is_available() and torch.distributed.is_nccl_available(), len(gpus)))
    checks.append(check_peer_access(access, os.environ.get("NCCL_P2P_DISABLE") == "1"))
    return checks


def _not_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed announces "Setting accelerator to CPU" on import; the torch and cuda checks say it better."""
    return "Setting accelerator to CPU" not in record.getMessage()


def deepspeed_checks() -> list[Check]:
    ds_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed configures on import; it keeps filters
    ds_logger.addFilter(_not_cpu_fallback_notice)
    try:
        deepspeed, error = _import("deepspeed")
    finally:
        ds_logger.removeFilter(_not_cpu_fallback_notice)
    if deepspeed is None:
        return check_deepspeed(None, error, False, None, False)
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        compatible = bool(CPUAdamBuilder().is_compatible(verbose=False))
    except Exception:  # an accelerator without a CPU Adam builder: get_op_builder returns None
        compatible = False
    compiler = shutil.which("c++") or shutil.which("g++")
    ninja = bool(importlib.util.find_spec("ninja") or shutil.which("ninja"))
    return check_deepspeed(deepspeed.__version__, "", compatible, compiler, ninja)


def existing_parent(path: Path) -> Path:
    """The directory itself, or its nearest existing ancestor (the run creates the rest there)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def run_checks(output_dir: str) -> list[Check]:
    checks = [check_python(tuple(sys.version_info[:3]))] + torch_checks() + deepspeed_checks()
    try:
        checks.append(check_build_locks(stale_build_locks(extension_build_dir(), time.time())))
    except Exception as error:  # torch missing or broken: the torch check above already says so
        checks.append(Check("build locks", "skip", f"needs torch ({error.__class__.__name__})"))
    checks.append(check_ram(host_ram_bytes(), available_ram_bytes()))
    disk = existing_parent(Path(output_dir))
    checks.append(check_disk(disk, shutil.disk_usage(disk).free))
    for name in LIBRARIES:
        module, error = _import(name)
        checks.append(check_library(name, getattr(module, "__version__", "?") if module else None, error))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainrig doctor", description="Check this machine for training; each problem comes with its fix.")
    parser.add_argument("--output_dir", default=".", help="Directory whose free disk is checked (default: the current one).")
    parser.add_argument("--json", action="store_true", help="Print the results as a JSON list.")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # libraries print while importing; stdout stays the report
        checks = run_checks(args.output_dir)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print("\n".join(c.line() for c in checks))
        counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "fail", "skip")}
        print("doctor: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if any(c.name == "torch" and c.status == "fail" for c in checks):
        return USAGE_EXIT_CODE  # what every entry script refuses with (trainers.devices): the torch install must change first
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
