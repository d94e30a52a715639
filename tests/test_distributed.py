"""Multi-rank runs on CPU (gloo) under each launcher produce, step for step, the losses of a
single-process run with the same global batch.

Tolerance 1e-5 on losses around 6: the runs see the same samples with the same init in fp32, so
they differ only in the order of floating-point sums (the gradient all-reduce adds the two ranks'
halves; ZeRO reduces flattened buckets), ~1e-7 relative per step, carried a few steps by Adam.
A wrong gradient (an unsynced rank, a missing 1/world) moves the losses by 1e-3 or more.
"""

import shutil

import pytest

from conftest import VENV_BIN, assert_same_losses, free_port, pretrain_args, read_losses, run_launcher
from launch.pretrain import main as pretrain_main

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5
STEPS = 6


@pytest.fixture(scope="module")
def single_run(corpus, tokenizer_dir, tmp_path_factory):
    """The reference: one process, micro batch 8 = 2 ranks x micro 4."""
    out = tmp_path_factory.mktemp("single")
    pretrain_main(pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size=8, max_steps=STEPS))
    return read_losses(out)



def script_args(corpus, tokenizer_dir, out, **kw):
    return ["launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, per_device_train_batch_size=4,
                                                 max_steps=STEPS, **kw)]


def test_ddp_torchrun(single_run, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "ddp"
    run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                  *script_args(corpus, tokenizer_dir, out)])
    assert_same_losses(single_run, out)
    assert '"name": "ddp"' in (out / "plan.json").read_text()


def test_zero2_deepspeed_launcher_compiled_and_resume(single_run, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "zero2"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    # compiled decoder layers (--torch_compile) under the engine: the eager single run's losses
    run_launcher([*cmd, *script_args(corpus, tokenizer_dir, out, deepspeed="ds_configs/zero2.json", save_steps=3, torch_compile=True)])
    assert_same_losses(single_run, out)
    assert (out / "ds_config.json").is_file() and (out / "checkpoint-3" / "deepspeed").is_dir()
    assert '"compiled_layers": 4' in (out / "plan.json").read_text()

    # resume DeepSpeed's sharded state from step 3, eager: steps 4..6 must repeat exactly
    resumed = tmp_path / "zero2_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    run_launcher([*cmd, *script_args(corpus, tokenizer_dir, resumed, deepspeed="ds_configs/zero2.json", resume="auto")])
    again = read_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert max(abs(again[s] - single_run[s]) for s in again) < TOLERANCE


def test_zero3_accelerate_launch(single_run, corpus, tokenizer_dir, tmp_path):
    """`accelerate launch --use_deepspeed --zero_stage 3`; final/ is gathered whole from the shards."""
    out = tmp_path / "zero3"
    run_launcher([str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "--use_deepspeed", "--zero_stage", "3", *script_args(corpus, tokenizer_dir, out)])
    assert_same_losses(single_run, out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(p.numel() > 0 for p in model.parameters())
    plan = (out / "plan.json").read_text()
    assert '"zero_stage": 3' in plan and '"chunked_loss": true' in plan  # the chunked loss under ZeRO-3's gathering

    # continued pretraining from that final/ under ZeRO-3: the checkpoint loads sharded (zero.Init)
    cpt = tmp_path / "zero3_cpt"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                  *pretrain_args(corpus, tokenizer_dir, cpt, model_preset=None, tokenizer_name_or_path=None,
                                 model_name_or_path=out / "final", zero_stage=3, max_steps=2)])
    assert read_losses(cpt)[1] < single_run[1] - 0.1   # starts from the trained weights, not a fresh init


@pytest.mark.parametrize("stage", [1])  # ZeRO-2/3 resume is tested above and in test_sft_distributed (fp32)
def test_bf16_zero_accumulates_in_fp32_and_resumes_exactly(corpus, tokenizer_dir, tmp_path, stage):
    """bf16 under ZeRO accumulates the micro batches' gradients in fp32 (ZeRO-1 through DeepSpeed's
    BF16 optimizer, a different engine path from fp32 runs), and its checkpoint resumes bit for bit."""
    import json
    import sys

    flags = dict(precision="bf16", zero_stage=str(stage), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                 max_steps=3, save_steps=2)
    out = tmp_path / "run"
    run_launcher([sys.executable, "launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, **flags)])
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["zero_optimization"]["stage"] == stage
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_launcher([sys.executable, "launch/pretrain.py", *pretrain_args(corpus, tokenizer_dir, resumed, **{**flags, "resume": "auto"})])
    assert read_losses(resumed) == {3: read_losses(out)[3]}
