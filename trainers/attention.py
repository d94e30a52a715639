"""Which attention kernel runs, and what each needs from a batch so that no sample attends to another.

Three kernels, three batch layouts (trainers/data/collate.py builds them):

- FlashAttention-2 (`flash_attention_2`): the micro batch flattened into one row of all its samples,
  with the samples' boundaries as `cu_seq_lens_q/k` and their longest length as `max_length_q/k`
  (Python ints, so no layer reads them back from the GPU). transformers then calls the varlen
  kernel, which computes each sample's own causal attention and nothing across. Rows of shape
  [B, L] with restarting `position_ids` would not do: transformers recognises packed sequences
  from `position_ids` only when the batch has one row (`_is_packed_sequence`), and at B > 1 runs
  the dense causal kernel over each whole row, so a row's second sample sees its first.
- SDPA and eager: rows of [B, L] (packed, or one padded sample each) and one additive mask of
  shape (B, 1, L, L) in the compute dtype, built once per micro batch on the device and shared by
  every layer (attention_bias). Left to transformers, the mask is boolean and SDPA converts it to
  the compute dtype in every layer, saving each copy for the backward: 2 B L^2 bytes per layer
  in bf16 (Qwen2.5-0.5B, micro 8 x 2048: 1.5 GiB). A mask also makes transformers repeat the
  key/value heads for grouped-query attention (launch/planner/memory.py counts both).
- Blocks of pretraining need neither: a full causal block runs SDPA's `is_causal` path, no mask.

FlashAttention is chosen only after a probe: a tiny `flash_attn_func` forward and backward on
the GPU in bf16, checked against SDPA. A wheel built without kernels for the card (an RTX 5090 is
sm_120) imports fine and dies at the first forward with "no kernel image is available"; the probe
sees that first, and the run uses SDPA and says why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from trainers.devices import FLASH_INSTALL
from trainers.errors import UsageError

FLASH = "flash_attention_2"
# Row lengths are padded to a multiple of 16: SDPA's memory-efficient CUDA kernel copies (pads) a
# mask whose last dimension is not 16-aligned, in every layer; 16 is also tensor-core friendly.
ROW_MULTIPLE = 16
FLASH_PROBE_TOLERANCE = 2e-2  # bf16 outputs of O(1): flash vs SDPA differ by rounding, ~4e-3 here


def flash_attn_problem(device: torch.device) -> str:
    """"" when flash-attn imports and its kernels run on `device` (bf16 forward and backward of a
    tiny causal attention, equal to SDPA's), else why not. Cached per device: one probe per process."""
    return _flash_attn_problem(str(device))


@functools.cache
def _flash_attn_problem(device: str) -> str:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        flash_attn = importlib.import_module("flash_attn")  # a wheel built for another torch/CUDA fails here
    except Exception as err:  # ImportError, or OSError/RuntimeError from a broken binary
        return f"flash-attn does not import ({_first_line(err)})"
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 32, 2, 64, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
                   for _ in range(3))
        out = flash_attn.flash_attn_func(q, k, v, causal=True)
        out.float().sum().backward()
        reference = torch.nn.functional.scaled_dot_product_attention(
            *(t.detach().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
        error = (out.detach().float() - reference.float()).abs().max().item()
    except Exception as err:  # "no kernel image is available for execution on the device", an ABI mismatch, ...
        return f"flash-attn {getattr(flash_attn, '__version__', '?')} fails on this GPU ({_first_line(err)})"
    if not error <= FLASH_PROBE_TOLERANCE:  # also catches NaN
        return f"flash-attn {getattr(flash_attn, '__version__', '?')} gives wrong results on this GPU (max error {error:.3g} vs SDPA)"
    return ""


def _first_line(err: Exception) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [type(err).__name__])[0]


def resolve_attn_implementation(requested: str, device: torch.device, precision: str) -> tuple[str, str]:
    """(implementation, why): FlashAttention-2 when the GPU is Ampere or newer, the run is 16-bit
    (flash kernels take only bf16/fp16) and flash-attn passes the probe, else SDPA. An explicit
    `flash_attention_2` that cannot run is an error naming the fix."""
    gpu_ok = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if requested == FLASH:
        if not gpu_ok:
            raise UsageError(f"--attn_implementation flash_attention_2 needs an Ampere or newer GPU (device: {device}); use --attn_implementation sdpa")
        if precision == "fp32":
            raise UsageError("--attn_implementation flash_attention_2 needs --precision bf16 or fp16; use sdpa for fp32")
        problem = flash_attn_problem(device)
        if problem:
            raise UsageError(f"--attn_implementation flash_attention_2: {problem}; {FLASH_INSTALL}, or use --attn_implementation sdpa")
        return requested, "requested; flash-attn passed the probe on this GPU"
    if requested in ("sdpa", "eager"):
        return requested, "requested"
    if not gpu_ok:
        return "sdpa", f"FlashAttention needs an Ampere or newer CUDA GPU (device: {device}); using PyTorch SDPA"
    if precision == "fp32":
        return "sdpa", "FlashAttention takes only bf16/fp16 and this run is fp32; using PyTorch SDPA"
    problem = flash_attn_problem(device)
    if problem:
        return "sdpa", f"{problem}; using PyTorch SDPA (for FlashAttention: {FLASH_INSTALL})"
    return FLASH, "flash-attn passed the probe on this GPU (Ampere or newer) and the run is 16-bit"


def row_layout(attn_implementation: str, packed: bool) -> str:
    """How the SFT collator lays out a micro batch for this kernel: "flat" (FlashAttention: one row
    of all samples and their boundaries), "packed" (rows of several samples, position_ids restart
    per sample) or "padded" (one sample per row)."""
    if attn_implementation == FLASH:
        return "flat"
    return "packed" if packed else "padded"


def mask_dtype(attn_implementation: str, precision: str) -> torch.dtype | None:
    """The dtype of the shared additive mask SDPA/eager get (the dtype their scores are in), or
    None under FlashAttention, which takes sample boundaries (flat rows) or the 2-D padding mask."""
    if attn_implementation == FLASH:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def attention_bias(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The (B, 1, L, L) additive mask (0 where a query may attend, the dtype's minimum elsewhere):
    causal, within each sample of a packed row (its position_ids restart at 0) or over the real
    tokens of a padded row (attention_mask 1). None for rows that need only causality."""
    if attention_mask is not None:
        length = attention_mask.shape[-1]
        allowed = attention_mask.bool()[:, None, :].expand(-1, length, -1)
    elif position_ids is not None:
        sample = (position_ids == 0).cumsum(-1)  # the sample each position belongs to
        allowed = sample[:, :, None] == sample[:, None, :]
    else:
        return None
    length = allowed.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril_()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~(allowed & causal), torch.finfo(dtype).min)[:, None]
