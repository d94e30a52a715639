"""LoRA through PEFT: wrap a causal LM, count what trains, merge an adapter into its base."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

import torch

from trainers.ds_config import zero_setup
from trainers.errors import UsageError
from trainers.quantization import BNB_INSTALL, base_bits

log = logging.getLogger("trainrig.lora")


def check_lora_flags(lora_cfg, zero: tuple[int | None, str, str], from_scratch: bool = False, needs_library: bool = True) -> None:
    """The refusals of a run's LoRA and quantized-base flags, before any data or model work (and
    before planning), each naming the flag and the fix. zero: the run's (ZeRO stage or None, offload,
    the user's DS JSON or ""), trainers.ds_config.zero_setup. from_scratch: a --model_preset run, whose weights all train from
    their init. needs_library: also that bitsandbytes imports here (not when planning another machine)."""
    bits = base_bits(lora_cfg)
    if from_scratch and (lora_cfg.lora_r or bits < 16):
        flag = "--lora_r" if lora_cfg.lora_r else f"--load_in_{bits}bit"
        raise UsageError(f"{flag} adapts an existing model; from scratch (--model_preset) every weight trains in full: drop {flag}, "
                         f"or continue pretraining an existing model with --model_name_or_path")
    if lora_cfg.merge_lora and lora_cfg.lora_r == 0:
        raise UsageError("--merge_lora needs LoRA (--lora_r > 0); training every weight already writes a plain model to final/")
    if lora_cfg.quantization == "auto" and (lora_cfg.lora_r == 0 or bits < 16):
        raise UsageError("--quantization auto chooses between a 16-bit and a 4-bit LoRA base, so it needs --lora_r (16, say)" if lora_cfg.lora_r == 0
                         else f"--quantization auto and --load_in_{bits}bit: pick one (auto lets the planner decide; --load_in_{bits}bit decides)")
    for variant in ("use_dora", "use_rslora"):
        if getattr(lora_cfg, variant) and lora_cfg.lora_r == 0:
            raise UsageError(f"--{variant} is a LoRA variant; it needs --lora_r (16, say)")
    if lora_cfg.use_dora and bits == 8:
        raise UsageError("--use_dora with --load_in_8bit: PEFT's DoRA breaks bitsandbytes' 8-bit layers (their first forward fails); "
                         "use --load_in_4bit (QDoRA) or a 16-bit base")
    if lora_cfg.load_in_4bit and lora_cfg.load_in_8bit:
        raise UsageError("--load_in_4bit and --load_in_8bit: pick one (4 bits for the least memory, 8 for a base closer to 16-bit)")
    if bits == 16:
        return
    flag = f"--load_in_{bits}bit"
    if lora_cfg.lora_r == 0:
        raise UsageError(f"{flag} quantizes a frozen base, so it needs LoRA (--lora_r 16, say); a quantized weight cannot be trained")
    stage, offload, ds_json = zero
    if stage == 3:
        fix = "use a ZeRO-2 JSON (ds_configs/zero2.json)" if ds_json else "use --zero_stage 2"
        raise UsageError(f"{flag} under ZeRO-3{f' (the DS JSON {ds_json} sets it)' if ds_json else ''}: ZeRO-3 partitions parameters, "
                         f"and bitsandbytes packs them; {fix}, or DDP (--deepspeed none)")
    if offload != "none":
        fix = "use a DS JSON without offload (ds_configs/zero2.json)" if ds_json else "drop --offload (--offload none)"
        where = f"the DS JSON {ds_json}, which offloads {offload}" if ds_json else f"--offload {offload}"
        raise UsageError(f"{flag} with {where}: a quantized base trains only its adapters, whose optimizer states are small; {fix}")
    if not needs_library:
        return
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise UsageError(f"{flag} needs bitsandbytes, which does not import here ({err}); {BNB_INSTALL}") from None


def settle_lora_flags(run, lora_learning_rate: float | None = None, from_scratch: bool = False, needs_library: bool = True) -> None:
    """A stage's LoRA flags before any data or model work, and before planning (so the plan and the
    run agree): the defaults that depend on other flags, where the user left them, then
    check_lora_flags' refusals. The defaults: `lora_learning_rate`, the stage's rate with LoRA; with
    --use_dora, --lora_dropout 0 -- PEFT's DoRA reuses the base layer's output only without dropout;
    with it, each adapted layer runs its base matmul a second time on the dropped-out input and
    autograd keeps that dequantized weight for the backward: for every layer, in the compute dtype
    (14B in bf16: 26 GB), which undoes QLoRA."""
    lora = run.cfg.lora
    if lora_learning_rate is not None and lora.lora_r > 0 and not run.given("learning_rate"):
        run.cfg.optim.learning_rate = lora_learning_rate
    if lora.use_dora and not run.given("lora_dropout"):
        lora.lora_dropout = 0.0
    check_lora_flags(lora, zero_setup(run.cfg.dist), from_scratch=from_scratch, needs_library=needs_library)


def apply_lora(model, lora_cfg, seed: int, trainable_token_ids: list[int] | None = None, task_type: str = "CAUSAL_LM"):
    """The model with LoRA adapters on --lora_target_modules (all-linear: every linear layer of
    attention and MLP, never the output head); only the adapters train, plus the embedding rows
    of `trainable_token_ids` (tied to the head where the model ties them). task_type SEQ_CLS (the
    reward model) also trains its new score head in full (PEFT's modules_to_save). --use_dora adds
    DoRA's magnitude vectors, --use_rslora scales by alpha / sqrt(r)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.lora_target_modules
    config = LoraConfig(r=lora_cfg.lora_r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        use_dora=lora_cfg.use_dora, use_rslora=lora_cfg.use_rslora,
                        trainable_token_indices=trainable_token_ids or None, bias="none", task_type=task_type)
    torch.manual_seed(seed)  # lora_A's init: the same on every rank and rerun
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # PEFT names the modules it could not find
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UsageError(f"--lora_target_modules {' '.join(targets)}: {str(err).splitlines()[0]}; "
                         f"this model's linear layers are {', '.join(linear)} (or use all-linear)") from None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s r=%d alpha=%g (scale %s) dropout=%g on %s%s: %s trainable of %s parameters (%.2f%%)",
             "DoRA" if lora_cfg.use_dora else "LoRA", lora_cfg.lora_r, lora_cfg.lora_alpha,
             "alpha/sqrt(r)" if lora_cfg.use_rslora else "alpha/r", lora_cfg.lora_dropout,
             ", ".join(sorted(model.peft_config["default"].target_modules)),
             f", embedding rows of tokens {trainable_token_ids}" if trainable_token_ids else "",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if lora_cfg.use_dora and lora_cfg.lora_dropout > 0:
        log.warning("--use_dora with --lora_dropout %g: PEFT runs each adapted layer's base matmul again on the dropped-out input and keeps "
                    "that dequantized weight for the backward (%.2f GB here without --gradient_checkpointing, one layer's with it); "
                    "--lora_dropout 0 avoids both", lora_cfg.lora_dropout, dora_dropout_bytes(model) / 1e9)
    return model


def dora_dropout_bytes(model) -> int:
    """What DoRA with dropout keeps per forward: every adapted base weight, dequantized, in the
    dtype it multiplies in (the base layer's compute dtype; a 16-bit base's own)."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
            total += module.in_features * module.out_features * torch.empty((), dtype=dtype).element_size()
    return total


def lora_description(lora_cfg) -> str:
    """"full", "LoRA r=16", "QLoRA r=16 on a 4-bit nf4 base" or "DoRA r=16 (rsLoRA scale)", for the log."""
    if not lora_cfg.lora_r:
        return "full"
    kind = ("QDoRA" if lora_cfg.load_in_4bit else "DoRA") if lora_cfg.use_dora else "QLoRA" if lora_cfg.load_in_4bit else "LoRA"
    rank = f"{kind} r={lora_cfg.lora_r}" + (" (rsLoRA scale)" if lora_cfg.use_rslora else "")
    if lora_cfg.load_in_4bit:
        return f"{rank} on a 4-bit {lora_cfg.bnb_4bit_quant_type} base"
    return rank + (" on an 8-bit base" if lora_cfg.load_in_8bit else "")


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, tokenizer, trust_remote_code: bool) -> Path:
    """Base model + adapter merged into plain weights at `out_dir` (loads without PEFT). Merged in
    fp32, saved in the base model's dtype; written under a temporary name, renamed when done."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code), "dtype", None) or torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))).save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    log.info("merged the adapter into %s -> %s", base_path, out_dir)
    return out_dir
