"""A quantized frozen base for LoRA (QLoRA): bitsandbytes' 4-bit (NF4/FP4) or 8-bit (LLM.int8)
linear layers, loaded by transformers' BitsAndBytesConfig.

What is quantized: every nn.Linear of the decoder layers. transformers keeps the output head (and
anything tied to it) and the embeddings unquantized, in the run's precision; they stay frozen.
PEFT's prepare_model_for_kbit_training would also cast them and the norms to fp32: for Qwen2.5-14B
that is 2 x 151,936 x 5,120 x 4 B = 6.2 GB of fp32 embedding and head, a fifth of a 32 GB card,
for weights that do not train. trainrig, like LLaMA-Factory and unsloth, keeps them in the compute
dtype (bf16 on a GPU): frozen weights lose nothing to it, and the adapters and their optimizer
states are fp32 as in LoRA.

Runs under DDP (every rank loads its own quantized copy onto its own GPU: device_map {"": rank's
device}), DeepSpeed ZeRO-1/2 (the engine casts floating parameters only, so the packed uint8
weights stay as they are, and it shards only what trains) or one process. ZeRO-3 partitions
parameters that bitsandbytes packs, so it is refused, and so is offload (the adapters' optimizer
states are small).
"""

from __future__ import annotations

BNB_INSTALL = "pip install 'bitsandbytes>=0.47'"


def base_bits(lora_cfg) -> int:
    """Bits per weight of the frozen base's linear layers: 4, 8, or 16 (not quantized)."""
    return 4 if lora_cfg.load_in_4bit else 8 if lora_cfg.load_in_8bit else 16


def bnb_config(lora_cfg, precision: str):
    """transformers' BitsAndBytesConfig for the run, or None without quantization. The compute
    dtype (what the dequantized weights multiply in) is the run's precision."""
    bits = base_bits(lora_cfg)
    if bits == 16:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora_cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=lora_cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=torch.uint8)


def bnb_problem(device) -> str:
    """What stops bitsandbytes' 4-bit layers on `device` ("" when a tiny NF4 Linear4bit's forward
    equals a matmul with its own dequantized weight): `trainrig doctor`'s check."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch

        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(4, 64, device=device, dtype=dtype)
        expected = x @ bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype).t()
        error = (layer(x).float() - expected.float()).abs().max().item()
    except Exception as err:  # an import, a missing kernel for this device, a driver: all mean "cannot quantize here"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return "" if error < 0.05 else f"its 4-bit matmul differs from the dequantized weight's by {error:.3g}"


def keep_training_layout(model, device) -> None:
    """bitsandbytes 0.50 on an avx512-bf16 CPU repacks a 4-bit layer's weight into a CPU-inference
    layout at its first forward in eval mode, and never back: the next training forward (after an
    evaluation) then fails in its in-place bias add ("a view of a leaf Variable that requires grad").
    A run that trains keeps the training layout; GPUs never repack."""
    if device.type != "cpu":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
