"""DPO on 2 CPU ranks (gloo) gives, step for step, the losses of one process with the same global
batch: DDP (torchrun), DeepSpeed ZeRO-2 with LoRA and ZeRO-3 in full. The reference log-probs are
computed by the ranks themselves (each run has its own cache directory), half the pairs each, and
the loss is normalised by the global pair count. Tolerance: conftest.assert_same_losses' 1e-5."""

import pytest

from conftest import VENV_BIN, assert_same_losses, dpo_args, free_port, read_losses, run_launcher
from launch.dpo import main as dpo_main

pytestmark = pytest.mark.slow
STEPS = 5


def args(pairs, model_dir, out, **kw):
    return dpo_args(pairs, model_dir, out, max_steps=STEPS, lora_dropout=0, **kw)


@pytest.fixture(scope="module")
def single(preference_pairs, sft_model_dir, tmp_path_factory):
    """The references: one process, micro 4 pairs = 2 ranks x micro 2; full and LoRA."""
    refs = {}
    for name, extra in (("full", {}), ("lora", {"lora_r": 4})):
        out = tmp_path_factory.mktemp(f"single_{name}") / "out"
        dpo_main(args(preference_pairs, sft_model_dir, out, per_device_train_batch_size=4, **extra))
        refs[name] = read_losses(out)
    return refs



def script(pairs, model_dir, out, **kw):
    return ["launch/dpo.py", *args(pairs, model_dir, out, per_device_train_batch_size=2, **kw)]


def test_ddp_full(single, preference_pairs, sft_model_dir, tmp_path):
    out = tmp_path / "ddp"
    run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                  *script(preference_pairs, sft_model_dir, out)])
    assert_same_losses(single["full"], out)


def test_zero2_lora(single, preference_pairs, sft_model_dir, tmp_path):
    out = tmp_path / "zero2_lora"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  *script(preference_pairs, sft_model_dir, out, lora_r=4, zero_stage=2)])
    assert_same_losses(single["lora"], out)
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_zero3_full(single, preference_pairs, sft_model_dir, tmp_path):
    """ZeRO-3 gathers the output head for the chunked log-probs' backward, which recomputes its logits."""
    out = tmp_path / "zero3"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  *script(preference_pairs, sft_model_dir, out, zero_stage=3)])
    assert_same_losses(single["full"], out)
    assert (out / "final" / "model.safetensors").is_file()
