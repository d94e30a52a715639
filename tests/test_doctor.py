"""`trainrig doctor`: each check on fake facts (GPUs this CPU box does not have), then one real run."""

from __future__ import annotations

import json

from launch.doctor import (GB, GPU, check_build_locks, check_cuda_arch, check_deepspeed, check_disk, check_flash_attn, check_peer_access,
                           check_precision, check_ram, check_torch, main)

CU124_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
RTX5090 = GPU("NVIDIA GeForce RTX 5090", (12, 0), True)
T4 = GPU("Tesla T4", (7, 5), False)


def test_rtx5090_on_a_cu124_build_fails_with_the_cu128_fix():
    check = check_cuda_arch(RTX5090.name, RTX5090.capability, CU124_ARCHS, "12.4")
    assert check.status == "fail"
    assert "sm_120" in check.detail
    assert check.fix == "pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"


def test_cuda_arch_passes_when_the_build_has_the_kernels():
    assert check_cuda_arch(RTX5090.name, (12, 0), CU124_ARCHS + ["sm_100", "sm_120"], "12.8").status == "pass"
    h100 = check_cuda_arch("NVIDIA H100 80GB HBM3", (9, 0), CU124_ARCHS, "12.4")
    assert (h100.status, h100.fix) == ("pass", "")


def test_torch_that_cannot_see_the_listed_gpus_fails_naming_build_driver_and_fix():
    from trainers.devices import blind_torch_problem

    smi = ["GPU 0: NVIDIA GeForce RTX 5090 (UUID: GPU-1234)"]
    blind = blind_torch_problem(smi, False, "2.13.0+cu130", "13.0", "570.133.07", None)
    check = check_torch("2.13.0+cu130", "13.0", 0, blind)
    assert check.status == "fail" and "2.13.0+cu130" in check.detail and "driver 570.133.07" in check.detail
    assert "needs driver >= 580" in check.detail
    assert check.fix == "pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
    assert check_torch("2.13.0+cpu", None, 0, ("", "")).status == "pass"  # no GPU, or hidden on purpose: nothing to say


def test_blind_torch_messages():
    from trainers.devices import blind_torch_problem, min_driver_for

    smi = ["GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)", "GPU 1: NVIDIA GeForce RTX 4090 (UUID: GPU-2)"]
    cpu_build, fix = blind_torch_problem(smi, False, "2.13.0+cpu", None, "550.54.15", None)
    assert cpu_build.startswith("nvidia-smi lists 2 GPU(s) (NVIDIA GeForce RTX 4090; driver 550.54.15) but torch 2.13.0+cpu is a CPU-only build")
    assert fix == "pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
    assert "needs driver >= 570" in blind_torch_problem(smi, False, "2.11.0+cu128", "12.8", "560.35.03", None)[0]
    assert "CUDA_VISIBLE_DEVICES='7'" in blind_torch_problem(smi, False, "2.11.0+cu128", "12.8", "570.1", "7")[0]
    assert "driver is loaded" in blind_torch_problem(smi, False, "2.11.0+cu128", "12.8", "", None)[0]
    for quiet in (blind_torch_problem(smi, True, "2.11.0+cu128", "12.8", "570.1", None),  # torch sees them
                  blind_torch_problem([], False, "2.13.0+cpu", None, "", None),  # no GPU
                  blind_torch_problem(smi, False, "2.13.0+cpu", None, "550.1", ""),  # hidden on purpose
                  blind_torch_problem(smi, False, "2.13.0+cpu", None, "550.1", "-1")):
        assert quiet == ("", "")
    assert (min_driver_for("13.0"), min_driver_for("12.8"), min_driver_for("12.9"), min_driver_for("13.2")) == (580, 570, 570, 580)


def test_pre_ampere_gpu_warns_to_use_fp16():
    check = check_precision(T4)
    assert check.status == "warn" and check.fix == "train with --precision fp16"
    assert check_precision(RTX5090).status == "pass"


def test_flash_attn_skips_on_cpu_warns_when_missing_and_fails_when_it_cannot_run():
    cpu = check_flash_attn([], False, "")
    assert cpu.status == "skip" and "SDPA" in cpu.detail
    missing = check_flash_attn([RTX5090], False, "")
    assert missing.status == "warn" and "SDPA" in missing.detail
    assert missing.fix.startswith("pip install flash-attn --no-build-isolation")
    no_kernels = check_flash_attn([RTX5090], True, "flash-attn 2.8.3 fails on this GPU (RuntimeError: CUDA error: no kernel image "
                                                   "is available for execution on the device)")
    assert no_kernels.status == "fail" and "no kernel image" in no_kernels.detail and "falls back to PyTorch SDPA" in no_kernels.detail
    assert no_kernels.fix.startswith("pip uninstall -y flash-attn && pip install flash-attn --no-cache-dir --no-build-isolation")
    assert check_flash_attn([RTX5090, T4], True, "").status == "skip"  # the T4 cannot run it
    assert check_flash_attn([RTX5090], True, "").status == "pass"


def test_cpu_adam_needs_a_compiler_and_ninja():
    checks = {c.name: c for c in check_deepspeed("0.19.8", "", True, None, False)}
    assert checks["deepspeed"].status == "pass"
    assert checks["cpu adam"].status == "warn"
    assert checks["cpu adam"].fix == "apt-get install build-essential && pip install ninja"
    assert check_deepspeed("0.19.8", "", True, "/usr/bin/c++", True)[1].status == "pass"
    assert check_deepspeed(None, "ModuleNotFoundError: No module named 'deepspeed'", False, None, False)[0].status == "fail"


def test_geforce_without_peer_access_warns_until_nccl_is_told():
    no_p2p = [[True, False], [False, True]]
    check = check_peer_access(no_p2p, p2p_disabled=False)
    assert check.status == "warn" and "GPUs 0 and 1" in check.detail
    assert check.fix.startswith("export NCCL_P2P_DISABLE=1")
    assert check_peer_access(no_p2p, p2p_disabled=True).status == "pass"
    assert check_peer_access([[True] * 2] * 2, p2p_disabled=False).status == "pass"
    assert check_peer_access([[True]], p2p_disabled=False).status == "skip"


def test_ram_and_disk_thresholds(tmp_path):
    low_ram = check_ram(32 * GB, 12 * GB)
    assert low_ram.status == "warn" and "12.0 GB available of 32.0 GB" in low_ram.detail
    assert check_ram(64 * GB, 40 * GB).status == "pass"
    low_disk = check_disk(tmp_path, int(19.5 * GB))
    assert low_disk.status == "warn" and "19.5 GB free" in low_disk.detail and "~100 GB" in low_disk.detail
    assert check_disk(tmp_path, 200 * GB).status == "pass"


def test_main_json_on_this_machine(tmp_path, capsys):
    status = main(["--json", "--output_dir", str(tmp_path / "not" / "yet" / "made")])
    checks = json.loads(capsys.readouterr().out)
    assert status in (0, 1)
    assert status == int(any(c["status"] == "fail" for c in checks))
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert {c["status"] for c in checks} <= {"pass", "warn", "fail", "skip"}
    by_name = {c["name"]: c for c in checks}
    assert by_name["torch"]["status"] == "pass"
    assert {"python", "cuda arch", "flash-attn", "deepspeed", "cpu adam", "build locks", "ram", "disk", "transformers"} <= set(by_name)


def test_stale_build_locks_are_the_old_ones(tmp_path):
    """torch takes <op>/lock on every load of an op, built before or not: a young lock is a load in
    progress; an old one was left by a killed process, whether or not the op's .so is there."""
    import os
    import time

    from trainers.extensions import stale_build_locks

    now = time.time()
    for op, age, built in (("killed_building", 1200, False), ("loading", 60, True), ("killed_loading", 1200, True), ("clean", None, True)):
        (tmp_path / op).mkdir()
        if built:
            (tmp_path / op / f"{op}.so").write_bytes(b"")
        if age is not None:
            (tmp_path / op / "lock").touch()
            os.utime(tmp_path / op / "lock", (now - age, now - age))
    assert stale_build_locks(tmp_path, now) == [tmp_path / "killed_building" / "lock", tmp_path / "killed_loading" / "lock"]
    failing = check_build_locks([tmp_path / "killed_building" / "lock"])
    assert failing.status == "fail" and failing.fix == f"rm {tmp_path / 'killed_building' / 'lock'}"
    assert check_build_locks([]).status == "pass"


def test_extension_build_dir_is_torchs(monkeypatch):
    """The folder torch itself builds in, with and without TORCH_EXTENSIONS_DIR."""
    import os
    from pathlib import Path

    from torch.utils import cpp_extension

    from trainers.extensions import extension_build_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    probe = cpp_extension._get_build_directory("trainrig_doctor_probe", False)  # torch makes the op's folder
    os.rmdir(probe)
    assert extension_build_dir() / "trainrig_doctor_probe" == Path(probe)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/ext")
    assert str(extension_build_dir()) == "/somewhere/ext"


def test_the_venvs_ninja_goes_first_on_path(monkeypatch, tmp_path):
    """An unactivated venv's DeepSpeed builds with the venv's ninja, not the system's (or none)."""
    import os
    import sys

    from trainers.extensions import put_this_pythons_ninja_first

    venv_bin, system_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for folder in (venv_bin, system_bin):
        folder.mkdir(parents=True)
        (folder / "ninja").write_text("#!/bin/sh\n")
        (folder / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(system_bin))
    put_this_pythons_ninja_first()
    assert os.environ["PATH"] == f"{venv_bin}{os.pathsep}{system_bin}"
    put_this_pythons_ninja_first()  # already first: PATH unchanged
    assert os.environ["PATH"] == f"{venv_bin}{os.pathsep}{system_bin}"
    (venv_bin / "ninja").unlink()  # a python without ninja beside it: PATH stays the user's
    monkeypatch.setenv("PATH", str(system_bin))
    put_this_pythons_ninja_first()
    assert os.environ["PATH"] == str(system_bin)


def test_deepspeed_run_with_a_stale_build_lock_exits_2_naming_it(corpus, tokenizer_dir, tmp_path):
    """Instead of hanging in DeepSpeed's comm-op build forever (seen here after a first run was killed mid-build)."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO, pretrain_args

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600,) * 2)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, tmp_path / "run", zero_stage=2)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rm {lock}" in proc.stderr and "interrupted load or build of the deepspeed_shm_comm extension" in proc.stderr
