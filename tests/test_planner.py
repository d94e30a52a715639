"""Hardware profiles, golden plans, and the files a plan writes, checked by DeepSpeed's and
Accelerate's own loaders."""

from __future__ import annotations

import dataclasses
import json

import pytest

from launch.planner import files, hardware, memory
from launch.planner.search import Request, accumulation_for, largest_micro_batch, plan
from trainers.errors import UsageError
from trainers.ds_config import DeepSpeedSettings, fill_ds_config

CU124_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.fixture(scope="module")
def qwen7b():
    return memory.load_shape("qwen2.5-7b")


@pytest.fixture(scope="module")
def qwen15b():
    return memory.load_shape("qwen2.5-1.5b")


@pytest.fixture(scope="module")
def qwen05b():
    return memory.load_shape("qwen2.5-0.5b")


# ------------------------------------------------------------------------------- hardware


def test_profiles():
    five = hardware.profile("rtx5090")
    assert (five.gpu.capability, five.world_size, five.gpu.memory_bytes > 31 * 2**30) == ((12, 0), 1, True)
    box = hardware.profile("4x4090")
    assert (box.world_size, box.peer_access, box.intra_node_link) == (4, False, "host")
    cluster = hardware.profile("8xa100-80gx2")
    assert (cluster.devices_per_node, cluster.nodes, cluster.world_size, cluster.slowest_link) == (8, 2, 16, "network")
    assert hardware.profile("h100").world_size == 1 and hardware.profile("2xcpu").gpu is None
    with pytest.raises(UsageError, match="unknown profile"):
        hardware.profile("3xv100")


def test_h100_pcie_is_not_planned_as_the_sxm_board():
    pcie, sxm = hardware._known_spec("NVIDIA H100 PCIe"), hardware._known_spec("NVIDIA H100 80GB HBM3")
    assert (pcie.bf16_tflops, pcie.nvlink, sxm.bf16_tflops, sxm.nvlink) == (756.0, False, 989.0, True)
    assert hardware.profile("4xh100-pcie").intra_node_link == "pcie" and hardware.profile("4xh100").intra_node_link == "nvlink"


def test_kernel_support_names_the_cuda_build_to_install():
    message = hardware.kernel_support((12, 0), CU124_ARCHS, "12.4", "NVIDIA GeForce RTX 5090")
    assert "sm_120" in message and "cu128" in message
    assert hardware.kernel_support((12, 0), CU124_ARCHS + ["sm_120"], "12.8", "RTX 5090") == ""
    assert hardware.kernel_support((12, 0), CU124_ARCHS + ["compute_90"], "12.4", "RTX 5090") == ""  # PTX JIT
    assert hardware.kernel_support((9, 0), CU124_ARCHS, "12.4", "H100") == ""
    assert hardware.kernel_support((8, 9), ["sm_80", "sm_86"], "12.1", "RTX 4090") == ""  # same major, newer minor
    assert hardware.kernel_support((9, 0), ["sm_90a"], "12.4", "H100") == ""
    assert "sm_89" in hardware.kernel_support((8, 9), ["sm_90a"], "12.4", "RTX 4090")


def test_slurm_allocation_from_the_environment():
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64",
           "SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert hardware.slurm_allocation(env) == hardware.Slurm("77", 2, 8, 64, "gpu[01-02]")
    assert hardware.slurm_allocation({**env, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}).gpus_per_node == 4
    assert hardware.slurm_allocation({}) is None


# ---------------------------------------------------------------------------- golden plans


def test_7b_lora_sft_fits_one_5090(qwen7b):
    result = plan(Request("sft", qwen7b, 2048, hardware.profile("rtx5090"), global_batch=64, lora_rank=16))
    assert result.fits and result.setup.micro_batch >= 1 and result.setup.offload == "none"
    assert result.chosen.memory.total <= result.budget
    assert result.setup.micro_batch * result.chosen.accumulation == 64


def test_without_a_global_batch_the_plan_is_the_fastest_per_sequence(qwen7b):
    """plan.py's own example: ranked by step time, a small micro batch's short step won (at first
    zero3+offload-all at micro 1, 2.37 s a sequence, over checkpointing at micro 12, 1.18 s)."""
    result = plan(Request("sft", qwen7b, 2048, hardware.profile("rtx5090"), lora_rank=16))
    fitting = [c for c in result.candidates if c.fits]
    assert result.chosen.seconds_per_sequence == min(c.seconds_per_sequence for c in fitting)
    assert result.setup.offload == "none" and result.setup.micro_batch >= 8
    shortest_step = min(fitting, key=lambda c: c.step_seconds)  # what the planner used to choose
    assert shortest_step.setup.micro_batch < result.setup.micro_batch
    assert shortest_step.seconds_per_sequence >= result.chosen.seconds_per_sequence


def test_7b_full_sft_on_4x4090_needs_offload_and_says_so(qwen7b):
    result = plan(Request("sft", qwen7b, 2048, hardware.profile("4x4090"), global_batch=64))
    assert not any(c.fits for c in result.candidates if c.setup.offload == "none")
    assert not result.fits  # offload would fit the GPUs, but not a 128 GB host
    notes = " ".join(result.notes)
    assert "offload" in notes and "GiB of RAM per node" in notes and "LoRA (--lora_r 16)" in notes
    roomy = dataclasses.replace(hardware.profile("4x4090"), cpu_ram_bytes=512 * 10**9)
    offloaded = plan(Request("sft", qwen7b, 2048, roomy, global_batch=64))
    assert offloaded.fits and offloaded.setup.offload != "none" and offloaded.env == {"NCCL_P2P_DISABLE": "1"}


def test_05b_pretraining_on_4x4090_avoids_zero3_and_disables_p2p(qwen05b):
    result = plan(Request("pretrain", qwen05b, 2048, hardware.profile("4x4090"), global_batch=256))
    assert result.fits and result.setup.zero_stage in (0, 1, 2) and result.setup.offload == "none"
    assert result.env == {"NCCL_P2P_DISABLE": "1"} and result.global_batch == 256
    assert not result.setup.gradient_checkpointing


def test_7b_full_sft_on_two_a100_nodes_fits_without_offload(qwen7b):
    result = plan(Request("sft", qwen7b, 2048, hardware.profile("8xa100-80gx2"), global_batch=128))
    assert result.fits and result.setup.offload == "none" and result.setup.world == 16 and result.env == {}


def test_flags_constrain_the_plan(qwen05b):
    hw = hardware.profile("4x4090")
    assert plan(Request("pretrain", qwen05b, 2048, hw, zero_stage="3")).setup.zero_stage == 3
    assert not plan(Request("pretrain", qwen05b, 2048, hw, deepspeed="none")).setup.deepspeed
    assert not plan(Request("pretrain", qwen05b, 2048, hw, optimizer="muon")).setup.deepspeed  # Muon needs whole matrices
    assert plan(Request("pretrain", qwen05b, 2048, hw, gradient_checkpointing=True)).setup.gradient_checkpointing
    too_big = plan(Request("pretrain", qwen05b, 2048, hw, micro_batch=64, gradient_checkpointing=False, accumulation=1))
    assert not too_big.fits and any(n.startswith("a smaller micro batch") for n in too_big.notes)


def test_planned_micro_batch_is_the_largest_that_fits(qwen05b):
    hw = hardware.profile("4090")
    result = plan(Request("pretrain", qwen05b, 1024, hw, deepspeed="none", gradient_checkpointing=False))
    s = result.setup
    assert memory.estimate(qwen05b, s).total <= result.budget
    assert memory.estimate(qwen05b, dataclasses.replace(s, micro_batch=s.micro_batch + 1)).total > result.budget
    assert largest_micro_batch(qwen05b, s, result.budget, 64) == s.micro_batch


def test_accumulation_reaches_the_global_batch():
    assert accumulation_for(64, 8, 4, None) == (8, 2)
    assert accumulation_for(60, 8, 4, None) == (5, 3)  # exact with micro 5 (>= half of 8)
    assert accumulation_for(52, 8, 4, None) == (8, 2)  # 52 = 4 x 13: no micro 4..8 divides it, 64 is the nearest above
    assert accumulation_for(0, 8, 4, None) == (8, 1) and accumulation_for(64, 8, 4, 3) == (8, 3)


def test_reward_pairs_count_two_sequences(qwen05b):
    hw = hardware.profile("4090")
    sft = plan(Request("sft", qwen05b, 1024, hw, deepspeed="none", gradient_checkpointing=False))
    reward = plan(Request("reward", qwen05b, 1024, hw, deepspeed="none", gradient_checkpointing=False))
    # a pair's two sequences: the activations of micro m pairs are those of 2m sequences; a scalar head has no logits
    pairs = dataclasses.replace(sft.setup, micro_batch=2 * reward.setup.micro_batch)
    assert reward.chosen.memory.activations == memory.estimate(qwen05b, pairs).activations
    assert reward.chosen.memory.logits == 0 < sft.chosen.memory.logits


def test_dpo_pairs_are_two_sequences_with_a_vocabulary_head_and_no_resident_reference(qwen05b):
    hw = hardware.profile("4090")
    sft = plan(Request("sft", qwen05b, 1024, hw, deepspeed="none", gradient_checkpointing=False))
    dpo = plan(Request("dpo", qwen05b, 1024, hw, deepspeed="none", gradient_checkpointing=False))
    # micro m pairs cost what 2m SFT rows cost, logits (the chunked head's buffers) included; the
    # precomputed reference adds nothing: the weights are the policy's alone
    rows = dataclasses.replace(sft.setup, micro_batch=2 * dpo.setup.micro_batch)
    assert dpo.chosen.memory == memory.estimate(qwen05b, rows)
    assert dpo.chosen.memory.parameters == sft.chosen.memory.parameters
    assert 2 * dpo.setup.micro_batch <= sft.setup.micro_batch and "dpo: a micro batch of N pairs runs 2N sequences" in dpo.notes


# --------------------------------------------------------------------------- config files


class _DataParallel:
    """The one question DeepSpeedConfig asks of an mpu."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


@pytest.mark.parametrize("stage,offload", [(1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "all")])
def test_ds_config_passes_deepspeeds_loader_and_the_runs_own_check(qwen15b, stage, offload, monkeypatch):
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda: 0)  # no process group here: rank 0 of an 8-rank mpu

    hw = dataclasses.replace(hardware.profile("8xh100"), cpu_ram_bytes=4 * 10**12)
    result = plan(Request("sft", qwen15b, 2048, hw, global_batch=64, zero_stage=str(stage), offload=offload))
    assert result.fits
    ds = files.deepspeed_config(result, max_grad_norm=1.0)
    loaded = DeepSpeedConfig(ds, mpu=_DataParallel(8))
    assert (loaded.zero_optimization_stage, loaded.train_batch_size, loaded.bfloat16_config.enabled) == (stage, 64, True)
    assert loaded.zero_config.reduce_bucket_size == qwen15b.hidden ** 2
    assert (loaded.zero_config.offload_optimizer is not None) == (offload != "none")
    # the run the launch command starts re-reads the file with the same flags: no contradiction
    settings = DeepSpeedSettings(micro_batch=result.setup.micro_batch, accumulation=result.chosen.accumulation, world_size=8,
                                 max_grad_norm=1.0, precision="bf16", zero_stage="auto", offload=offload, sources={},
                                 hidden_size=qwen15b.hidden)
    assert fill_ds_config(ds, settings, "ds_config.json")["zero_optimization"]["stage"] == stage


def test_accelerate_yaml_loads_with_accelerates_loader(qwen05b, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    for profile, kind in (("4x4090", "DEEPSPEED"), ("4090", "NO"), ("8xh100x2", None)):
        result = plan(Request("pretrain", qwen05b, 2048, hardware.profile(profile), global_batch=256))
        out = tmp_path / profile
        ds_path, acc_path = files.write_files(result, out, 1.0)
        loaded = load_config_from_file(str(acc_path))
        assert loaded.num_processes == result.setup.world and loaded.num_machines == result.request.hardware.nodes
        if kind:
            assert loaded.distributed_type.value == kind
        if ds_path:
            assert loaded.deepspeed_config["deepspeed_config_file"] == str(ds_path.resolve())
            assert json.loads(ds_path.read_text())["train_batch_size"] == result.global_batch


def test_multi_node_launch_command(qwen7b):
    result = plan(Request("sft", qwen7b, 2048, hardware.profile("8xa100-80gx2"), global_batch=128))
    command = files.launch_command(result, "sft", ["--config", "x.yaml"], None, rdzv_seed="job-42")
    line = " ".join(command)
    assert "--nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8" in line
    assert f"--rdzv_endpoint $MASTER_ADDR:{files.rendezvous_port('job-42')}" in line
    assert line.endswith("--precision bf16") and "--config x.yaml" in line
    assert 20000 <= files.rendezvous_port("job-42") < 30000


def test_a_busy_gpu_is_named_in_the_notes(qwen05b):
    hw = dataclasses.replace(hardware.profile("2x4090"), free_bytes=(24 * 2**30, 10 * 2**30))
    notes = plan(Request("sft", qwen05b, 1024, hw, lora_rank=8)).notes
    assert any(n.startswith("GPU 1 has 10.0 GiB free") for n in notes) and not any(n.startswith("GPU 0") for n in notes)


def test_launcher_topology_inside_a_rank():
    assert hardware.launcher_topology(8, None, {}) == (8, 1)  # the launcher process: one rank per GPU
    assert hardware.launcher_topology(1, None, {"WORLD_SIZE": "2", "LOCAL_SIZE": "2"}) == (2, 1)  # deepspeed
    assert hardware.launcher_topology(8, None, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == (8, 2)  # torchrun
    slurm = hardware.Slurm("1", 4, 8, 64, "n[1-4]")
    assert hardware.launcher_topology(8, slurm, {"WORLD_SIZE": "32"}) == (8, 4)


def test_the_command_states_each_pinned_flag_once():
    argv = ["--config", "x.yaml", "--per_device_train_batch_size", "auto", "--gradient_checkpointing", "--bf16",
            "--global_batch_size=64", "--train_files", "a.jsonl", "b.jsonl", "--lora_r", "16"]
    kept = files.without_flags(argv, {"--per_device_train_batch_size", "--global_batch_size", "--no-gradient_checkpointing", "--precision"})
    assert kept == ["--config", "x.yaml", "--train_files", "a.jsonl", "b.jsonl", "--lora_r", "16"]
