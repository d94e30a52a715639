"""Tokenizer and model loading: from-scratch Qwen2 presets and existing checkpoints (continued pretraining)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from trainers.attention import resolve_attn_implementation
from trainers.errors import UsageError
from trainers.quantization import bnb_config, keep_training_layout

log = logging.getLogger("trainrig.models")

MODEL_SHAPES_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64: tensor-core friendly matmuls for the head


def preset_names() -> list[str]:
    return sorted(p.stem for p in MODEL_SHAPES_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = MODEL_SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"--model_preset {name}: unknown preset; choose one of {', '.join(preset_names())} (shapes in {MODEL_SHAPES_DIR})")
    return json.loads(path.read_text())


def _check_model_dir(path: str, trust_remote_code: bool, flag: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        config = local / "config.json"
        if not config.is_file() and (local / "adapter_config.json").is_file():
            raise UsageError(f"{flag} {path}: a LoRA adapter, not a whole model; pass the run's final/merged (written with --merge_lora), "
                             f"or merge the adapter into its base first")
        if not config.is_file():
            raise UsageError(f"{flag} {path}: not a model directory (no config.json); pass a directory written by save_pretrained, e.g. <output_dir>/final")
        try:
            auto_map = json.loads(config.read_text()).get("auto_map")
        except json.JSONDecodeError as err:
            raise UsageError(f"{config}: not valid JSON ({err.msg}, line {err.lineno}); fix or re-save the model") from None
        if auto_map and not trust_remote_code:
            raise UsageError(f"{config}: the model ships its own Python code (auto_map); pass --trust_remote_code only if you trust {path}")


def tokenizer_for(model_cfg):
    """(tokenizer, the flag that named it): --tokenizer_name_or_path, else the model directory's."""
    flag = "--model_name_or_path" if model_cfg.model_name_or_path and not model_cfg.tokenizer_name_or_path else "--tokenizer_name_or_path"
    path = model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
    return load_tokenizer(path, model_cfg.trust_remote_code, flag), flag


def load_tokenizer(path: str, trust_remote_code: bool, flag: str):
    from transformers import AutoTokenizer

    if not path:
        raise UsageError(f"{flag} is required: a tokenizer directory (train one with tokenizer/train.py)")
    local = Path(path).expanduser()
    if local.exists() and not (local / "tokenizer.json").is_file() and not (local / "tokenizer_config.json").is_file():
        raise UsageError(f"{flag} {path}: no tokenizer.json or tokenizer_config.json; pass a tokenizer directory (tokenizer/train.py writes one)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {path}: cannot load a tokenizer ({str(err).splitlines()[0]}); pass a local tokenizer directory") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{flag} {path}: a slow (Python) tokenizer; trainrig needs a fast one (tokenizer.json)")
    return _as_written(tokenizer, local, path)


def _as_written(tokenizer, local: Path, path: str):
    """transformers 5 swaps a generic tokenizer for the model type's class (a model directory with
    model_type qwen2 gets Qwen2Tokenizer, which rebuilds its own pre-tokenizer) even when the
    directory's tokenizer.json, the tokenization the model was trained with, says otherwise.
    Where the two differ, use tokenizer.json as written, and say so."""
    from transformers import PreTrainedTokenizerFast

    file = local / "tokenizer.json"
    if not file.is_file():
        return tokenizer
    written, loaded = json.loads(file.read_text(encoding="utf-8")), json.loads(tokenizer.backend_tokenizer.to_str())
    differs = [k for k in ("normalizer", "pre_tokenizer", "decoder") if written.get(k) != loaded.get(k)]
    if not differs:
        return tokenizer
    log.warning("%s: AutoTokenizer returns %s, whose %s differs from tokenizer.json; using tokenizer.json as written "
                "(the tokenization the model was trained with)", path, type(tokenizer).__name__, " and ".join(differs))
    return PreTrainedTokenizerFast.from_pretrained(str(local))


def resolve_model_config(model_cfg, block_size: int, length_flag: str = "--block_size"):
    """The HF config of the model to train, checked against --block_size (--max_seq_length) before any data work.
    A preset's vocab size is set later, from the tokenizer."""
    from transformers import AutoConfig, Qwen2Config

    if getattr(model_cfg, "model_preset", ""):
        config = Qwen2Config(**load_preset(model_cfg.model_preset))
        what = f"--model_preset {model_cfg.model_preset}"
    else:
        path = model_cfg.model_name_or_path
        _check_model_dir(path, model_cfg.trust_remote_code, "--model_name_or_path")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UsageError(f"--model_name_or_path {path}: cannot load ({str(err).splitlines()[0]}); pass a local model directory (hub ids need network)") from None
        what = f"--model_name_or_path {path}"
    _check_block_size(block_size, config, what, length_flag)
    return config


def build_model(model_cfg, config, tokenizer, attn_implementation: str, seed: int, dtype: str = "fp32",
                quantization=None, device: torch.device | None = None):
    """A Qwen2 preset initialised from `seed`, or the checkpoint at --model_name_or_path, its weights
    in `dtype` (fp32 master weights for training them; bf16/fp16 for a frozen LoRA base). With
    `quantization` (trainers/quantization.py's BitsAndBytesConfig) its linear layers load quantized,
    straight onto `device`."""
    from transformers import AutoModelForCausalLM

    if getattr(model_cfg, "model_preset", ""):
        config.vocab_size = padded_vocab_size(tokenizer)
        config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
        torch.manual_seed(seed)  # identical init on every rank and every rerun
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    else:
        path = model_cfg.model_name_or_path
        model = load_pretrained(AutoModelForCausalLM, path, dtype, attn_implementation, model_cfg.trust_remote_code,
                                quantization, device, config=config)
        weight = model.get_input_embeddings().weight
        rows = getattr(weight, "ds_shape", weight.shape)[0]  # ds_shape: the full size under ZeRO-3
        if len(tokenizer) > rows:
            raise UsageError(f"--tokenizer_name_or_path: {len(tokenizer)} tokens but the model embeds only {rows}; "
                             f"use the model's own tokenizer")
    enable_checkpointing(model, model_cfg.gradient_checkpointing)
    return model


def base_loading(lora_cfg, precision: str, device: torch.device) -> dict:
    """build_model's weight arguments: fp32 master weights for a model that trains in full; a
    frozen LoRA base needs no fp32 copy, so it loads in the training precision (7B: 15 GB, not 30),
    its linear layers quantized with --load_in_4bit/--load_in_8bit straight onto `device`."""
    if not lora_cfg.lora_r:
        return {"dtype": "fp32"}
    return {"dtype": precision, "quantization": bnb_config(lora_cfg, precision), "device": device}


def load_pretrained(auto_class, path: str, dtype: str, attn_implementation: str, trust_remote_code: bool,
                    quantization=None, device: torch.device | None = None, **kwargs):
    """`auto_class.from_pretrained(path)` for training, its weights in `dtype`. With `quantization`
    (a BitsAndBytesConfig) every weight goes straight onto this rank's device (bitsandbytes quantizes
    as it places them; accelerate then refuses a model on another device than the rank's), in the
    layout training needs (keep_training_layout)."""
    quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
    model = auto_class.from_pretrained(path, dtype=TORCH_DTYPES[dtype], attn_implementation=attn_implementation,
                                       trust_remote_code=trust_remote_code, **quantized, **kwargs)
    if quantization is not None:
        keep_training_layout(model, device)
    return model


def enable_checkpointing(model, enabled: bool) -> None:
    """Gradient checkpointing of the decoder layers when `enabled`, and no KV cache: training
    never reuses one, and with checkpointing it must be off."""
    if enabled:
        # non-reentrant: works with frozen inputs (LoRA) and ZeRO-3; transformers 5.x renamed the method
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_torch_compile(enabled: bool, device: torch.device, zero_stage: int | None) -> None:
    """Refuse --torch_compile where it cannot work, before any data is read or model built.

    Under ZeRO-3 its parameter-gathering hooks run inside each layer, and dynamo traces them,
    breaks the graph at each and recompiles per layer until its limit of 8, after which the layers
    run eager: compile time for nothing (measured with DeepSpeed 0.19.8). Inductor builds CPU
    kernels with a C++ compiler (its default: $CXX, else clang++ on macOS and g++ elsewhere) and
    GPU kernels with triton."""
    if not enabled:
        return
    if zero_stage == 3:
        raise UsageError("--torch_compile does not work under ZeRO-3 (its parameter hooks inside each layer make torch.compile "
                         "recompile per layer and fall back to eager); drop --torch_compile, or use --zero_stage 2")
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler) is None:
            raise UsageError(f"--torch_compile on CPU: inductor builds its kernels with a C++ compiler and {compiler!r} is not on PATH; "
                             f"install one (g++, or set CXX), or drop --torch_compile")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UsageError("--torch_compile on a GPU needs triton (it ships with torch's CUDA wheels); reinstall torch from the CUDA index, "
                         "or drop --torch_compile")


def compile_decoder_layers(model, enabled: bool) -> tuple[int, str]:
    """(layers compiled, why): with `enabled`, torch.compile each decoder layer in place
    (`module.compile()`), the regional compilation of PyTorch's recipe. All layers share one
    compiled graph (their parameters are graph inputs), so the compile time does not grow with
    depth; inductor fuses the norms, rotary, SwiGLU and residual element-wise ops around the matmuls.

    In place rather than accelerate's `compile_regions`: that also compiles the non-repeated
    leaves, among them the head whose forward trainers/chunked_loss.py replaces, and returns a
    shallow copy of the model; here the module tree, its state dict and the head stay as they are.
    The decoder layer classes are the model's `_no_split_modules` (transformers' own list of its
    repeated blocks), found through a PEFT wrapper too. check_torch_compile has run first."""
    if not enabled:
        return 0, "not compiled (--torch_compile to compile the decoder layers)"
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not layers:
        raise UsageError(f"--torch_compile: {type(model).__name__} names no repeated decoder layer class (_no_split_modules); "
                         f"drop --torch_compile for this model")
    for layer in layers:
        layer.compile()
    return len(layers), f"{len(layers)} {type(layers[0]).__name__} compiled in place (one shared graph, built on the first step)"


def padded_vocab_size(tokenizer) -> int:
    """Embedding rows of a from-scratch model: the tokenizer's size rounded up to VOCAB_MULTIPLE."""
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _check_block_size(block_size: int, config, what: str, flag: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise UsageError(f"{flag} {block_size} exceeds the {limit} positions of {what}; use {flag} {limit} or less")


def count_parameters(model) -> int:
    """The model's parameters: under ZeRO-3 each one's full size (ds_numel), a 4-bit weight as the
    weights it packs (its uint8 storage holds two per byte; bitsandbytes keeps the shape in quant_state)."""
    def numel(p) -> int:
        state = getattr(p, "quant_state", None)
        return state.shape.numel() if state is not None else getattr(p, "ds_numel", p.numel())

    return sum(numel(p) for p in model.parameters())


def load_for_inference(model_cfg, device: torch.device, dtype: torch.dtype, precision: str):
    """(model in eval mode on `device`, tokenizer) for generation and scoring: --model_name_or_path,
    with the LoRA adapter at --adapter_path applied when given. The tokenizer comes from
    --tokenizer_name_or_path, else the adapter directory (an SFT run saves it there), else the model's."""
    from transformers import AutoModelForCausalLM

    path = model_cfg.model_name_or_path
    if not path:
        raise UsageError("--model_name_or_path is required: a model directory (e.g. <output_dir>/final)")
    _check_model_dir(path, model_cfg.trust_remote_code, "--model_name_or_path")
    adapter = Path(model_cfg.adapter_path) if model_cfg.adapter_path else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"--adapter_path {adapter}: no adapter_config.json; pass the final/ of an SFT run with --lora_r > 0")
    if model_cfg.tokenizer_name_or_path:
        tokenizer = load_tokenizer(model_cfg.tokenizer_name_or_path, model_cfg.trust_remote_code, "--tokenizer_name_or_path")
    elif adapter is not None and (adapter / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(str(adapter), model_cfg.trust_remote_code, "--adapter_path")
    else:
        tokenizer = load_tokenizer(path, model_cfg.trust_remote_code, "--model_name_or_path")
    attn, why = resolve_attn_implementation(model_cfg.attn_implementation, device, precision)
    log.info("attention: %s (%s)", attn, why)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; use the model's own tokenizer")
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer
