"""SFT under every engine on 2 CPU ranks (gloo) gives, step for step, the losses of one process
with the same global batch: DDP (torchrun), DeepSpeed ZeRO-2 and ZeRO-3, full, LoRA and DoRA. The
loss is normalised by the global trained-token count, so ranks holding rows with different
numbers of assistant tokens still add up to the single-process gradient. LoRA dropout is 0
here: dropout masks depend on how a batch is split, which is not what these tests compare.
Tolerance as in test_distributed.py (1e-5; a missing 1/world or an unsynced rank moves 1e-3+)."""

import shutil

import pytest

from conftest import VENV_BIN, assert_same_losses, free_port, read_losses, run_launcher, sft_args
from launch.sft import main as sft_main

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5
STEPS = 5


def args(chat_dir, model_dir, out, **kw):
    return sft_args(chat_dir, model_dir, out, max_steps=STEPS, lora_dropout=0, **kw)


@pytest.fixture(scope="module")
def single(chat_dir, sft_model_dir, tmp_path_factory):
    """The references: one process, micro 4 rows = 2 ranks x micro 2; full, LoRA (with and
    without the chat-token rows, which PEFT trains under ZeRO-3 only on CUDA) and DoRA."""
    refs = {}
    for name, extra in (("full", {}), ("lora", {"lora_r": 4}), ("lora_no_tokens", {"lora_r": 4, "lora_train_chat_tokens": False}),
                        ("dora", {"lora_r": 4, "use_dora": True, "lora_train_chat_tokens": False})):
        out = tmp_path_factory.mktemp(f"single_{name}")
        sft_main(args(chat_dir, sft_model_dir, out, per_device_train_batch_size=4, **extra))
        refs[name] = read_losses(out)
    return refs



def script(chat_dir, model_dir, out, **kw):
    return ["launch/sft.py", *args(chat_dir, model_dir, out, per_device_train_batch_size=2, **kw)]


def test_ddp_full(single, chat_dir, sft_model_dir, tmp_path):
    out = tmp_path / "ddp"
    run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                  *script(chat_dir, sft_model_dir, out)])
    assert_same_losses(single["full"], out)


def test_zero2_lora_deepspeed_launcher_and_resume(single, chat_dir, sft_model_dir, tmp_path):
    out = tmp_path / "zero2_lora"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    run_launcher([*cmd, *script(chat_dir, sft_model_dir, out, lora_r=4, zero_stage=2, save_steps=3)])
    assert_same_losses(single["lora"], out)
    assert (out / "final" / "adapter_model.safetensors").is_file()

    # the engine's checkpoint holds only the trainable weights; resuming rebuilds the frozen base
    resumed = tmp_path / "zero2_lora_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    run_launcher([*cmd, *script(chat_dir, sft_model_dir, resumed, lora_r=4, zero_stage=2, resume="auto")])
    again = read_losses(resumed)
    assert sorted(again) == [4, 5]
    assert max(abs(again[s] - single["lora"][s]) for s in again) < TOLERANCE


def test_zero3_lora_accelerate_saves_a_loadable_adapter(single, chat_dir, sft_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3_lora"
    run_launcher([str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "--use_deepspeed", "--zero_stage", "3",
                  *script(chat_dir, sft_model_dir, out, lora_r=4, merge_lora=True, save_steps=STEPS)])
    assert_same_losses(single["lora_no_tokens"], out)  # CPU: trained without the chat-token rows (logged)
    base = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "final")).eval()
    assert all(p.numel() > 0 for n, p in adapted.named_parameters() if "lora_" in n)  # gathered, not empty shards
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2, 0, 1, 43]])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_zero3_full_deepspeed_launcher(single, chat_dir, sft_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3_full"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  *script(chat_dir, sft_model_dir, out, zero_stage=3)])
    assert_same_losses(single["full"], out)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(p.numel() > 0 for p in model.parameters())


def test_zero3_dora(single, chat_dir, sft_model_dir, tmp_path):
    """DoRA reads each base weight again after the base layer's forward (for its norm); ZeRO-3
    (DeepSpeed 0.19) gathers a parameter read inside another module's forward and registers it as
    that module's external parameter, so the losses are one process's."""
    out = tmp_path / "zero3_dora"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  *script(chat_dir, sft_model_dir, out, lora_r=4, use_dora=True, lora_train_chat_tokens=False, zero_stage=3)])
    assert_same_losses(single["dora"], out)
