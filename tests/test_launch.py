"""The planner driving real runs on CPU: `trainrig plan`, `trainrig launch`, and `auto` batch flags
in the entry scripts."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import VENV_BIN, read_losses, run_launcher, sft_args, pretrain_args


def _trainrig(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "trainrig"), *args], capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainrig {args[0]} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_plan_prints_the_table_and_writes_the_files(tmp_path):
    out = tmp_path / "plan"
    proc = _trainrig("plan", "--stage", "sft", "--hardware", "4x4090", "--model_name_or_path", "qwen2.5-1.5b",
                     "--max_seq_length", "2048", "--global_batch_size", "64", "--output_dir", str(out))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"] and plan["env"] == {"NCCL_P2P_DISABLE": "1"} and plan["global_batch_size"] == 64
    assert set(plan["memory_gb"]) >= {"parameters", "gradients", "optimizer_states", "activations", "logits", "overhead", "total", "available"}
    assert plan["memory_gb"]["total"] <= plan["memory_gb"]["available"]
    assert "<- chosen" in proc.stdout and "NCCL_P2P_DISABLE=1" in plan["command"] and "--nproc_per_node 4" in plan["command"]
    assert (out / "accelerate.yaml").is_file() and (plan["strategy"]["deepspeed"] == (out / "ds_config.json").is_file())


def test_plan_that_cannot_fit_says_what_would(tmp_path):
    proc = _trainrig("plan", "--stage", "sft", "--hardware", "3090", "--model_name_or_path", "qwen2.5-3b", "--max_seq_length", "2048",
                     "--output_dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: trainrig plan: nothing fits") and "LoRA (--lora_r 16)" in message and "host RAM" in message


def test_launch_sft_on_cpu_sizes_the_batch_and_runs(chat_dir, sft_model_dir, tmp_path):
    out = tmp_path / "run"
    args = sft_args(chat_dir, sft_model_dir, out, per_device_train_batch_size="auto", gradient_accumulation_steps="auto",
                    global_batch_size="8", max_steps="3")
    proc = _trainrig("launch", "sft", "--hardware", "cpu", *args)
    plan = json.loads((out / "plan.json").read_text())  # rewritten by the run itself
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["global_batch_size"]) == (8, 1, 8)
    assert plan["fits"] and plan["memory_gb"]["total"] > 0 and plan["strategy"]["name"] == "single"
    assert sorted(read_losses(out)) == [1, 2, 3] and (out / "final" / "model.safetensors").is_file()
    assert "chosen: single, micro batch 8 x accumulation 1" in proc.stdout


def test_auto_batch_flags_in_the_entry_script(corpus, tokenizer_dir, tmp_path):
    """`launch/pretrain.py --per_device_train_batch_size auto` under a plain `python`: the plan is
    made in-process, the micro batch capped by the global batch, and written to plan.json."""
    out = tmp_path / "auto"
    args = pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size="auto", gradient_accumulation_steps="auto",
                         global_batch_size="6", max_steps="2")
    run_launcher([str(VENV_BIN / "python"), "launch/pretrain.py", *args])
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["micro_batch_size"] * plan["gradient_accumulation_steps"], plan["fits"]) == (6, True)
    assert "memory_gb" in plan and plan["planned_for"].endswith("(detected)")


@pytest.mark.slow
def test_launch_two_cpu_ranks_with_torchrun(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "ddp"
    args = pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size="auto", global_batch_size="8",
                         gradient_accumulation_steps="auto", max_steps="2")
    proc = _trainrig("launch", "pretrain", "--hardware", "2xcpu", *args)
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["world_size"], plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * 2) == (2, 8)
    assert plan["strategy"]["name"] == "ddp" and "torch.distributed.run --standalone --nproc_per_node 2" in proc.stdout


def test_probe_steps_down_until_every_rank_ran():
    from launch.plan import probe_micro_batch

    runs = []

    def attempt(micro):  # out of memory above 6 (on some rank: the job's exit status says so)
        runs.append(micro)
        return micro <= 6, micro > 6, "torch.OutOfMemoryError: CUDA out of memory" if micro > 6 else ""

    micro, tried = probe_micro_batch(12, attempt)
    assert (micro, runs) == (6, [12, 11, 10, 9, 8, 7, 6]) and tried[-1] == "micro batch 6: ran"


def test_probe_stops_on_a_failure_that_is_not_memory():
    from launch.plan import probe_micro_batch
    from trainers.errors import UsageError

    with pytest.raises(UsageError, match="another reason than memory.*KeyError: 'x'"):
        probe_micro_batch(8, lambda micro: (False, False, "Traceback ...\nKeyError: 'x'\n"))
    with pytest.raises(UsageError, match="even micro batch 1 runs out of memory"):
        probe_micro_batch(3, lambda micro: (False, True, "CUDA out of memory"))


@pytest.mark.slow
def test_launch_probe_runs_real_trial_steps_on_two_cpu_ranks(corpus, tokenizer_dir, tmp_path):
    """The trial runs the real entry script under torchrun with both ranks; nothing is left behind."""
    out = tmp_path / "probed"
    args = pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size="auto", global_batch_size="8",
                         gradient_accumulation_steps="auto", max_steps="2")
    proc = _trainrig("launch", "pretrain", "--probe", "--hardware", "2xcpu", *args)
    assert "probe: micro batch 4: ran -> micro batch 4 x accumulation 1" in proc.stdout
    assert not (out / "probe").exists() and (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "plan.json").read_text())["micro_batch_size"] == 4


@pytest.mark.slow
def test_auto_batch_under_the_deepspeed_launcher(corpus, tokenizer_dir, tmp_path):
    """`deepspeed launch/pretrain.py --zero_stage 2 --per_device_train_batch_size auto`: each rank
    plans in-process, the ranks agree, and the DS config the run fills carries the planned batch."""
    from conftest import free_port

    out = tmp_path / "ds_auto"
    args = pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size="auto", gradient_accumulation_steps="auto",
                         global_batch_size="8", zero_stage="2", max_steps="2")
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", *args])
    plan = json.loads((out / "plan.json").read_text())
    ds = json.loads((out / "ds_config.json").read_text())
    assert plan["strategy"]["zero_stage"] == 2 and plan["world_size"] == 2 and plan["fits"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (plan["micro_batch_size"], plan["gradient_accumulation_steps"], 8)


def test_cli_edges(tmp_path):
    """--help works (argparse formats help with %), conflicting flags and profiles for another
    machine are one-line errors, and a plan that does not fit exits 2 but still writes plan.json."""
    for args in (("plan", "--help"), ("plan", "--stage", "sft", "--help"), ("launch", "pretrain", "--help")):
        proc = _trainrig(*args)
        assert "usage" in proc.stdout.lower() or "trainrig plan" in proc.stdout
    conflict = _trainrig("plan", "--stage", "sft", "--hardware", "rtx5090", "--model_name_or_path", "qwen2.5-0.5b",
                         "--optimizer", "muon", "--zero_stage", "2", "--output_dir", str(tmp_path / "c"), check=False)
    assert conflict.returncode == 2 and "--zero_stage 2, --optimizer muon (runs without ZeRO)" in conflict.stderr
    elsewhere = _trainrig("launch", "sft", "--hardware", "4x4090", "--model_name_or_path", "qwen2.5-0.5b",
                          "--output_dir", str(tmp_path / "e"), check=False)
    assert elsewhere.returncode == 2 and "trainrig launch runs on this machine" in elsewhere.stderr
    typo = _trainrig("plan", "--stage", "sft", "--model_name_or_path", "qwen2.5-70b", "--output_dir", str(tmp_path / "t"), check=False)
    assert typo.returncode == 2 and "not a shipped shape (qwen2.5-0.5b" in typo.stderr
    no_fit = _trainrig("plan", "--stage", "sft", "--hardware", "3090", "--model_name_or_path", "qwen2.5-14b",
                       "--output_dir", str(tmp_path / "n"), check=False)
    assert no_fit.returncode == 2 and json.loads((tmp_path / "n" / "plan.json").read_text())["fits"] is False
