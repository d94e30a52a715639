"""LoRA through PEFT: wrap a causal LM, count what trains, merge an adapter into its base."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from trainers.errors import UsageError

log = logging.getLogger("trainrig.lora")


def apply_lora(model, lora_cfg, seed: int, trainable_token_ids: list[int] | None = None, task_type: str = "CAUSAL_LM"):
    """The model with LoRA adapters on --lora_target_modules (all-linear: every linear layer of
    attention and MLP, never the output head); only the adapters train, plus the embedding rows
    of `trainable_token_ids` (tied to the head where the model ties them). task_type SEQ_CLS (the
    reward model) also trains its new score head in full (PEFT's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.lora_target_modules
    config = LoraConfig(r=lora_cfg.lora_r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        trainable_token_indices=trainable_token_ids or None, bias="none", task_type=task_type)
    torch.manual_seed(seed)  # lora_A's init: the same on every rank and rerun
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # PEFT names the modules it could not find
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UsageError(f"--lora_target_modules {' '.join(targets)}: {str(err).splitlines()[0]}; "
                         f"this model's linear layers are {', '.join(linear)} (or use all-linear)") from None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g dropout=%g on %s%s: %s trainable of %s parameters (%.2f%%)", lora_cfg.lora_r,
             lora_cfg.lora_alpha, lora_cfg.lora_dropout, ", ".join(sorted(model.peft_config["default"].target_modules)),
             f", embedding rows of tokens {trainable_token_ids}" if trainable_token_ids else "",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def lora_description(lora_cfg) -> str:
    """"full", "LoRA r=16", or "QLoRA r=16 on a 4-bit nf4 base", for the log."""
    if not lora_cfg.lora_r:
        return "full"
    if lora_cfg.load_in_4bit:
        return f"QLoRA r={lora_cfg.lora_r} on a 4-bit {lora_cfg.bnb_4bit_quant_type} base"
    return f"LoRA r={lora_cfg.lora_r}" + (" on an 8-bit base" if lora_cfg.load_in_8bit else "")


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
