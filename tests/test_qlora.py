"""QLoRA: a frozen base in 4 bits (bitsandbytes NF4, its CPU backend) under LoRA, end to end --
the loss falls, final/ holds the adapter, which loads onto a 4-bit and a 16-bit base, and
final/merged/ is a plain model equal to the 16-bit base with the adapter; the refusals; the memory
model's 4-bit base against a real quantized model's bytes; the planner's choices with it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import pretrain_args, read_losses, reward_args, sft_args
from launch.pretrain import main as pretrain_main
from launch.reward import main as reward_main
from launch.sft import main as sft_main
from trainers.errors import UsageError

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_run(chat_dir, sft_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    summary = sft_main(sft_args(chat_dir, sft_model_dir, out, lora_r=8, load_in_4bit=True, merge_lora=True, max_steps=12,
                                learning_rate=3e-3, eval_steps=6, lora_train_chat_tokens=False))
    return out, summary


def test_qlora_sft_trains_and_saves_an_adapter_that_merges_into_a_plain_model(qlora_run, sft_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out, summary = qlora_run
    losses = read_losses(out)
    assert summary["step"] == 12 and sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.3
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base_bits"] == 4 and plan["lora_r"] == 8
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5]])
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", dtype=torch.float32)
    assert merged.config.to_dict().get("quantization_config") is None
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())  # plain nn.Linear layers
    base16 = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    adapted16 = PeftModel.from_pretrained(base16, str(final))
    with torch.no_grad():
        merged_logits, adapted_logits = merged(ids).logits, adapted16(ids).logits
    # merging is exact up to fp32 rounding: the adapter was trained against the 4-bit base, and merged into the 16-bit one
    assert (merged_logits - adapted_logits).abs().max().item() < 1e-5  # measured 1e-6
    base4 = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                                        bnb_4bit_compute_dtype=torch.float32))
    adapted4 = PeftModel.from_pretrained(base4, str(final))
    with torch.no_grad():
        quantized_logits = adapted4(ids).logits
    # the 4-bit base differs from the 16-bit one by NF4's rounding: measured a mean |logit gap| of 0.009 against a
    # logit spread (std) of 1.08 for this tiny model
    gap = (quantized_logits - merged_logits).abs().mean().item()
    assert 0 < gap < 0.05 * merged_logits.std().item(), gap


def test_qlora_continued_pretraining_trains_an_adapter_and_merges(corpus, tokenizer_dir, sft_model_dir, tmp_path):
    """Continued pretraining on raw text with a 4-bit base: the loss falls, final/ is an adapter
    (no chat-token rows: pretraining text has no turns), final/merged/ a plain model equal to the
    16-bit base with it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cpt"
    summary = pretrain_main(pretrain_args(corpus, tokenizer_dir, out, model_preset=None, model_name_or_path=str(sft_model_dir),
                                          block_size=64, lora_r=8, load_in_4bit=True, merge_lora=True, max_steps=12,
                                          learning_rate=3e-3))
    losses = read_losses(out)
    assert summary["step"] == 12 and sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.05
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base_bits"] == 4 and plan["lora_r"] == 8 and plan["chunked_loss"]
    from transformers import AutoConfig

    from launch.planner.memory import shape_from_config

    shape = shape_from_config(AutoConfig.from_pretrained(sft_model_dir), "tiny")
    # the planner's counts; the 4-bit weights counted as the weights they pack, not their uint8 bytes
    assert summary["trainable_parameters"] == shape.lora_parameters(8) and summary["parameters"] == shape.parameters + shape.lora_parameters(8)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert not adapter.get("trainable_token_indices") and not (out / "final" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "final")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5]])
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("flag", ["lora_r", "load_in_4bit"])
def test_lora_from_scratch_is_refused(flag, corpus, tokenizer_dir, tmp_path, capsys):
    value = {"lora_r": "8", "load_in_4bit": True}[flag]
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(pretrain_args(corpus, tokenizer_dir, tmp_path / "run", **{flag: value}))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--{flag} adapts an existing model; from scratch (--model_preset)" in err, err


def test_qlora_reward_model_trains(preference_pairs, sft_model_dir, tmp_path):
    out = tmp_path / "reward"
    summary = reward_main(reward_args(preference_pairs, sft_model_dir, out, lora_r=8, load_in_4bit=True, max_steps=10,
                                      learning_rate=3e-3, validation_split_ratio=0.1))
    losses = read_losses(out)
    assert losses[10] < losses[1] and summary["eval_accuracy"] >= 0.9
    assert json.loads((out / "plan.json").read_text())["base_bits"] == 4


def test_qdora_with_rslora_trains_merges_and_defaults_to_no_dropout(chat_dir, sft_model_dir, tmp_path, caplog):
    """DoRA on a 4-bit base with the rsLoRA scale: the loss falls; the adapter records both; loaded
    onto the 16-bit base it carries DoRA's magnitude vectors and scales by alpha / sqrt(r); its
    merge equals base + adapter. --lora_dropout was left out, so it is 0 (and the plan planned 0)."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qdora"
    summary = sft_main(sft_args(chat_dir, sft_model_dir, out, lora_r=8, lora_alpha=16, load_in_4bit=True, use_dora=True,
                                use_rslora=True, merge_lora=True, max_steps=12, learning_rate=3e-3, lora_train_chat_tokens=False))
    losses = read_losses(out)
    assert summary["step"] == 12 and sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.3
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["lora_dropout"] == 0.0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["use_rslora"] and adapter["lora_dropout"] == 0.0
    assert "--use_dora with --lora_dropout" not in caplog.text

    base = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "final")).eval()
    q_proj = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(16 / 8 ** 0.5) and "default" in q_proj.lora_magnitude_vector
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5]])
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max().item() < 1e-5


def test_dora_with_dropout_says_what_it_keeps(chat_dir, sft_model_dir, tmp_path, caplog):
    sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "run", lora_r=4, use_dora=True, lora_dropout=0.05, max_steps=1,
                      lora_train_chat_tokens=False))
    assert re.search(r"--use_dora with --lora_dropout 0.05: .* keeps that dequantized weight for the backward \(0\.\d+ GB here", caplog.text)


@pytest.mark.parametrize("flags, message", [
    ({"load_in_4bit": True}, r"--load_in_4bit quantizes a frozen base, so it needs LoRA \(--lora_r 16"),
    ({"use_dora": True}, r"--use_dora is a LoRA variant; it needs --lora_r"),
    ({"use_dora": True, "lora_r": 8, "load_in_8bit": True}, r"--use_dora with --load_in_8bit: .* use --load_in_4bit \(QDoRA\)"),
    ({"load_in_8bit": True, "lora_r": 8, "zero_stage": 3}, r"--load_in_8bit under ZeRO-3: .* use --zero_stage 2, or DDP"),
    ({"load_in_4bit": True, "lora_r": 8, "zero_stage": 2, "offload": "optimizer"}, r"--load_in_4bit with --offload optimizer: .* drop --offload"),
    ({"load_in_4bit": True, "load_in_8bit": True, "lora_r": 8}, r"--load_in_4bit and --load_in_8bit: pick one"),
], ids=["no-lora", "dora-no-lora", "dora-8bit", "zero3", "offload", "both"])
def test_refusals_exit_2_naming_the_flag(flags, message, chat_dir, sft_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "run", **flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ the planner


QUANTIZED_SHAPES = [(128, 384, 4, 4, 2), (320, 896, 3, 5, 1)]  # (hidden, intermediate, layers, heads, kv heads)


@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (8, False)], ids=["nf4-double-quant", "nf4", "int8"])
@pytest.mark.parametrize("dims", QUANTIZED_SHAPES, ids=["h128", "h320"])
def test_the_quantized_base_term_is_a_real_quantized_models_bytes(dims, bits, double_quant, tmp_path):
    """lora_base_bytes without its dequantization workspace against the bytes of every tensor of
    the model loaded quantized, at two shapes: 4-bit packed weights, block scales (and their own
    scales); 8-bit weights and their per-row scales (SCB); the unquantized rest."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

    from launch.planner.memory import Setup, lora_base_bytes, shape_from_config

    hidden, intermediate, layers, heads, kv = dims
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=1000)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                       bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, device_map={"": "cpu"}, quantization_config=quantization)
    real, quantized_tensors = 0, 0
    for p in model.parameters():
        real += p.numel() * p.element_size()
        state, row_scales = getattr(p, "quant_state", None), getattr(p, "SCB", None)
        if state is not None:
            quantized_tensors += 1
            real += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                real += state.state2.absmax.numel() * state.state2.absmax.element_size()
        if row_scales is not None:
            quantized_tensors += 1
            real += row_scales.numel() * row_scales.element_size()
    assert quantized_tensors == 7 * layers
    shape = shape_from_config(config, "t")
    setup = Setup(precision="fp32", lora_parameters=1, base_bits=bits, double_quant=double_quant, on_gpu=False)
    predicted = lora_base_bytes(shape, setup) - 4 * shape.hidden * shape.intermediate
    if bits == 4:  # exact but for the per-tensor rounding of the block counts (a tensor's last block, its last 256-block group)
        assert abs(predicted - real) <= 8 * quantized_tensors, (predicted, real)
    else:  # a scale per output row, counted as 4 / hidden per weight: at most that, measured 0.1-0.2% over
        assert 0 <= predicted - real < 0.01 * real, (predicted, real)
    sixteen = lora_base_bytes(shape, Setup(precision="fp32", lora_parameters=1, on_gpu=False))
    assert sixteen == 4 * shape.parameters and predicted < sixteen


def test_the_planner_fits_14b_qlora_on_one_5090_without_deepspeed_and_names_qlora_when_nothing_fits():
    from launch.planner import hardware, memory
    from launch.planner.search import Request, plan

    shape = memory.load_shape("qwen2.5-14b")
    qlora = plan(Request(stage="sft", shape=shape, seq_len=2048, hardware=hardware.resolve("rtx5090", local_only=False),
                         global_batch=64, lora_rank=16, base_bits=4))
    assert qlora.fits and not qlora.setup.deepspeed and qlora.setup.micro_batch >= 4
    assert all(c.setup.zero_stage < 3 and c.setup.offload == "none" for c in qlora.candidates)
    sixteen = plan(Request(stage="sft", shape=shape, seq_len=2048, hardware=hardware.resolve("4x4090", local_only=False),
                           global_batch=64, lora_rank=16, deepspeed="none"))
    assert not sixteen.fits
    assert any(n.startswith("QLoRA (--lora_r 16 --load_in_4bit): ddp") for n in sixteen.notes), sixteen.notes
    with pytest.raises(UsageError, match=r"--load_in_4bit \(runs without ZeRO-3 and offload\)"):
        plan(Request(stage="sft", shape=shape, seq_len=2048, hardware=hardware.resolve("rtx5090", local_only=False),
                     lora_rank=16, base_bits=4, zero_stage="3"))


def test_doctor_reports_bitsandbytes():
    from launch.doctor import check_bitsandbytes
    from trainers.quantization import bnb_problem

    assert bnb_problem(torch.device("cpu")) == ""  # a real NF4 layer on this CPU
    assert check_bitsandbytes("0.50.2", "", "", "the CPU").status == "pass"
    failed = check_bitsandbytes("0.50.2", "", "RuntimeError: no kernel image", "RTX 5090")
    assert failed.status == "fail" and "no kernel image" in failed.detail and "pip install" in failed.fix
    assert check_bitsandbytes(None, "ImportError: libcudart", "", "RTX 5090").status == "fail"


@pytest.mark.slow
def test_ddp_and_zero2_with_a_4bit_base_equal_one_process(chat_dir, sft_model_dir, tmp_path):
    """Each of 2 gloo ranks quantizes its own copy of the base onto its device; their losses under
    DDP and under ZeRO-2 are one process's with the same global batch (micro 2 x 2 ranks = micro 2 x
    accumulation 2), to 1e-5 as in test_sft_distributed.py."""
    from conftest import VENV_BIN, free_port, run_launcher

    common = dict(lora_r=8, load_in_4bit=True, lora_dropout=0, lora_train_chat_tokens=False, max_steps=5, per_device_train_batch_size=2)
    single = tmp_path / "single"
    sft_main(sft_args(chat_dir, sft_model_dir, single, gradient_accumulation_steps=2, **common))
    ddp = tmp_path / "ddp"
    run_launcher([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                  "launch/sft.py", *sft_args(chat_dir, sft_model_dir, ddp, **common)])
    reference, got = read_losses(single), read_losses(ddp)
    assert sorted(got) == sorted(reference) == list(range(1, 6))
    assert max(abs(got[s] - reference[s]) for s in reference) < 1e-5, (reference, got)
    assert json.loads((ddp / "plan.json").read_text())["strategy"]["name"] == "ddp"

    # ZeRO-2 through the deepspeed launcher: the engine leaves bitsandbytes' packed uint8 weights as they are
    # (it casts floating parameters only) and shards the adapters' gradients and optimizer states
    zero2 = tmp_path / "zero2"
    run_launcher([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  "launch/sft.py", *sft_args(chat_dir, sft_model_dir, zero2, zero_stage=2, **common)])
    got = read_losses(zero2)
    assert max(abs(got[s] - reference[s]) for s in reference) < 1e-5, (reference, got)
    assert (zero2 / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_with_a_4bit_base_equals_the_uninterrupted_run(optimizer, chat_dir, sft_model_dir, tmp_path):
    """Saved at step 3 (the adapter and the optimizer's state; the base is quantized again from the
    same checkpoint, deterministically), resumed to step 6: the losses of steps 4-6 equal the
    uninterrupted run's to 1e-6 -- the same fp32 CPU computation on the same samples."""
    common = dict(lora_r=8, load_in_4bit=True, optimizer=optimizer, max_steps=6, save_steps=3, validation_split_ratio=0)
    full = tmp_path / "full"
    sft_main(sft_args(chat_dir, sft_model_dir, full, **common))
    saved = sorted(p.name for p in (full / "checkpoint-3").iterdir())
    assert "model.safetensors" in saved and "optimizer.pt" in saved
    resumed = tmp_path / "resumed"
    sft_main(sft_args(chat_dir, sft_model_dir, resumed, **common, resume=str(full / "checkpoint-3")))
    expected, got = read_losses(full), read_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-6, (expected, got)


def test_8bit_optimizer_states_are_the_memory_models_and_resume_through_the_checkpoint_loader(tmp_path):
    """optimizer_state_bytes for bitsandbytes' AdamW8bit against the bytes of its state after a step;
    its state saved as checkpoints save it loads with the restricted unpickler and steps on exactly.
    (The tiny test models' adapters are under bitsandbytes' 4,096-element threshold for 8-bit states.)"""
    import bitsandbytes as bnb

    from launch.planner.memory import optimizer_state_bytes
    from trainers.checkpoint import load_plain

    weight = torch.nn.Parameter(torch.randn(256, 512))
    optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    real = sum(v.numel() * v.element_size() for k, v in optimizer.state[weight].items() if torch.is_tensor(v) and not k.startswith("qmap"))
    assert optimizer_state_bytes("adamw8bit", weight.numel()) == real  # 2 B + two fp32 scales per 256 (the qmaps: 2 KB per optimizer)
    assert optimizer_state_bytes("adamw", weight.numel()) == 8 * weight.numel()

    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    twin = torch.nn.Parameter(weight.detach().clone())
    restored = bnb.optim.AdamW8bit([twin], lr=1e-3)
    restored.load_state_dict(load_plain(tmp_path / "optimizer.pt"))
    grad = torch.randn_like(weight)
    for p, o in ((weight, optimizer), (twin, restored)):
        p.grad = grad.clone()
        o.step()
    assert torch.equal(weight, twin) and optimizer.state[weight]["state1"].dtype == torch.uint8


def test_trainrig_plan_refuses_what_the_trainer_refuses(capsys):
    from launch.plan import main_plan

    with pytest.raises(SystemExit) as exit_info:
        main_plan(["--stage", "sft", "--hardware", "rtx5090", "--model_name_or_path", "qwen2.5-7b", "--load_in_4bit"])
    assert exit_info.value.code == 2
    assert "--load_in_4bit quantizes a frozen base, so it needs LoRA" in capsys.readouterr().err


def test_trainrig_plan_counts_dora_and_its_dropout(tmp_path, capsys):
    """14B QDoRA on a 5090: DoRA's magnitudes in the trained parameters; with --use_dora alone the
    dropout is 0 (as the trainer will run it); an explicit --lora_dropout 0.05 plans every layer's
    dequantized weight kept for the backward (26 GiB without checkpointing), so it needs it."""
    from launch.plan import main_plan
    from launch.planner import memory

    shape = memory.load_shape("qwen2.5-14b")
    plans = {}
    for name, extra in (("qlora", []), ("qdora", ["--use_dora"]), ("qdora_dropout", ["--use_dora", "--lora_dropout", "0.05"])):
        out = tmp_path / name
        main_plan(["--stage", "sft", "--hardware", "rtx5090", "--model_name_or_path", "qwen2.5-14b", "--lora_r", "16",
                   "--load_in_4bit", "--max_seq_length", "2048", "--output_dir", str(out), *extra])
        plans[name] = json.loads((out / "plan.json").read_text())
    assert plans["qdora"]["lora_parameters"] == shape.lora_parameters(16, dora=True) == shape.lora_parameters(16) + 48 * (3 * 5120 + 2 * 13824 + 2 * 1024)
    assert all(p["fits"] and p["strategy"]["name"] == "single+ckpt" for p in plans.values())
    micro = {name: p["micro_batch_size"] for name, p in plans.items()}
    assert micro["qlora"] >= micro["qdora"] > micro["qdora_dropout"] >= 1, micro
    without_ckpt = {name: next(c for c in p["candidates"] if c["strategy"] == "single")["total_gb"] for name, p in plans.items()}
    assert without_ckpt["qdora_dropout"] - without_ckpt["qdora"] > 24, without_ckpt  # 13.2e9 weights x 2 B = 24.6 GiB


def test_the_planner_plans_qlora_continued_pretraining_and_suggests_it(tmp_path, capsys):
    """--stage cpt (pretraining's entry script from a checkpoint) takes LoRA and a 4-bit base:
    14B on a 5090 fits; in full it does not, and the error names QLoRA with its micro batch. From
    scratch, --lora_r is the trainer's refusal."""
    from launch.plan import main_plan

    common = ["--hardware", "rtx5090", "--model_name_or_path", "qwen2.5-14b", "--block_size", "2048"]
    main_plan(["--stage", "cpt", *common, "--lora_r", "16", "--load_in_4bit", "--output_dir", str(tmp_path / "qlora")])
    plan = json.loads((tmp_path / "qlora" / "plan.json").read_text())
    assert plan["stage"] == "cpt" and plan["fits"] and plan["base_bits"] == 4 and not plan["strategy"]["deepspeed"]
    with pytest.raises(SystemExit):
        main_plan(["--stage", "cpt", *common, "--deepspeed", "none", "--output_dir", str(tmp_path / "full")])
    assert re.search(r"would fit: .*QLoRA \(--lora_r 16 --load_in_4bit\): single\+ckpt, micro batch \d+", capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main_plan(["--stage", "pretrain", "--hardware", "rtx5090", "--model_preset", "0.5b", "--lora_r", "16"])
    assert exit_info.value.code == 2 and "--lora_r adapts an existing model" in capsys.readouterr().err


# ------------------------------------------------------------------------ --quantization auto


def test_quantization_auto_takes_16_bits_where_they_fit_on_the_device_and_4_where_not(tmp_path):
    """7B LoRA on a 5090: 16 bits fit on the card. 14B: 16 bits fit only with every weight offloaded
    to host RAM, under --deepspeed none not at all, and on 4x4090 only sharded by ZeRO-3: 4 bits, and
    the launch command pins the choice, so the run does not choose again."""
    from launch.plan import main_plan

    def planned(model, *extra, hardware="rtx5090"):
        out = tmp_path / f"{model}{len(extra)}{hardware}"
        main_plan(["--stage", "sft", "--hardware", hardware, "--model_name_or_path", model, "--lora_r", "16",
                   "--quantization", "auto", "--max_seq_length", "2048", "--output_dir", str(out), *extra])
        return json.loads((out / "plan.json").read_text())

    seven = planned("qwen2.5-7b")
    assert seven["base_bits"] == 16 and seven["notes"][0].startswith("--quantization auto: the 16-bit base fits (single+ckpt")
    assert seven["command"].endswith("--quantization none --no-load_in_4bit")
    cases = (((), "rtx5090", "fits only sharded or offloaded (zero3+offload-all+ckpt)", "single+ckpt"),
             (("--deepspeed", "none"), "rtx5090", "does not fit", "single+ckpt"),
             ((), "4x4090", "fits only sharded or offloaded (zero3", "ddp+ckpt"))
    for extra, hardware, why, strategy in cases:
        fourteen = planned("qwen2.5-14b", *extra, hardware=hardware)
        assert fourteen["base_bits"] == 4 and fourteen["fits"] and fourteen["strategy"]["name"] == strategy, fourteen["strategy"]
        assert f"--quantization auto: a 16-bit base {why}" in fourteen["notes"][0], fourteen["notes"]
        assert fourteen["command"].endswith("--quantization none --load_in_4bit")


def test_quantization_auto_in_the_entry_script_loads_the_base_in_4_bits_where_16_do_not_fit(chat_dir, sft_model_dir, tmp_path, monkeypatch):
    """On a machine whose memory lies between the 16-bit and the 4-bit plan's estimate (this CPU,
    told so), the run itself chooses 4 bits, trains QLoRA and says why in plan.json; the resolved
    config records what ran."""
    import dataclasses

    import yaml

    from launch import plan as planning
    from launch.planner import hardware
    from launch.planner.search import SAFETY_MARGIN, plan
    from trainers.config import SFTConfig, parse_run

    args = sft_args(chat_dir, sft_model_dir, tmp_path / "run", lora_r=8, quantization="auto", lora_train_chat_tokens=False)
    local = hardware.resolve("auto", local_only=True)
    request = planning.request_for(parse_run(SFTConfig, args, "t"), "sft", local, False, [])
    totals = {bits: plan(dataclasses.replace(request, quantization_auto=False, base_bits=bits)).chosen.memory.total for bits in (16, 4)}
    assert totals[4] < totals[16]
    device = (totals[4] + totals[16]) / 2 / (1 - SAFETY_MARGIN)
    tight = dataclasses.replace(local, devices_per_node=1, cpu_ram_bytes=int(device) + hardware.CPU_RESERVED_BYTES)
    monkeypatch.setattr(planning.hardware, "resolve", lambda name, local_only: tight)

    summary = sft_main(args)
    out = tmp_path / "run"
    written = json.loads((out / "plan.json").read_text())
    assert written["base_bits"] == 4 and summary["step"] == 6
    assert any(n.startswith("--quantization auto: a 16-bit base does not fit") for n in written["plan_notes"]), written["plan_notes"]
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["load_in_4bit"] is True and resolved["quantization"] == "none"


@pytest.mark.parametrize("flags, message", [
    ({"quantization": "auto"}, r"--quantization auto chooses between a 16-bit and a 4-bit LoRA base, so it needs --lora_r"),
    ({"quantization": "auto", "lora_r": 8, "load_in_8bit": True}, r"--quantization auto and --load_in_8bit: pick one"),
], ids=["no-lora", "with-8bit"])
def test_quantization_auto_refusals(flags, message, chat_dir, sft_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "run", **flags))
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_ds_json_that_shards_or_offloads_is_named_and_auto_plans_16_bits_under_it(chat_dir, sft_model_dir, tmp_path, capsys):
    """A user's ZeRO-3 JSON with a 4-bit base: the refusal names the file (--zero_stage would not
    override it). Under it, --quantization auto plans the 16-bit base: 4 bits cannot run there.
    An offload section whose device is "none" offloads nothing, as DeepSpeed reads it."""
    from launch.plan import main_plan
    from trainers.ds_config import DS_CONFIG_DIR, ds_offload

    zero3 = DS_CONFIG_DIR / "zero3.json"
    with pytest.raises(SystemExit) as exit_info:
        sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "run", lora_r=8, load_in_4bit=True, deepspeed=str(zero3)))
    assert exit_info.value.code == 2
    assert f"--load_in_4bit under ZeRO-3 (the DS JSON {zero3} sets it): " in capsys.readouterr().err
    out = tmp_path / "auto"
    main_plan(["--stage", "sft", "--hardware", "4x4090", "--model_name_or_path", "qwen2.5-14b", "--lora_r", "16", "--quantization", "auto",
               "--deepspeed", str(zero3), "--max_seq_length", "2048", "--output_dir", str(out)])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base_bits"] == 16 and plan["strategy"]["zero_stage"] == 3 and plan["command"].endswith("--no-load_in_4bit")
    assert ds_offload({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}) == "none"
    assert ds_offload({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}) == "all"
