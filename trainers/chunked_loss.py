"""The LM head and its cross-entropy, a chunk of tokens at a time, with the gradients computed in
the forward: the (tokens x vocab) logits are never whole in memory.

The model's own path (transformers' ForCausalLMLoss) holds, at the start of the backward, the
fp32 log-softmax, the NLL's fp32 gradient and the one log-softmax's backward makes: 12 bytes per
vocabulary entry per token (launch/planner/memory.py), 30 GB for 8 x 2048 tokens of Qwen2.5's 151,936
rows. Here a chunk's logits are made, turned in place into their gradient (softmax - one-hot,
scaled by 1/denominator), multiplied into the hidden states' and the head's gradients, and
dropped; what stays until the backward is one gradient the size of the hidden states and one the
size of the head. One exp pass replaces the log-softmax's forward and backward passes, which is
also faster where the vocabulary outweighs the model: in the CPU bench (bench/RESULTS.md), the
tiny preset's median is +9% (11,225 vs 10,295 tokens/s with --no-chunked_loss), small's level, both
inside the runs' +-14% spread.

Written by hand because the fused kernels that do this (Liger's FusedLinearCrossEntropy, Apple's
Cut Cross-Entropy) are Triton, GPU-only, and would give the CPU runs, tests and the GPU runs two
different losses; this is plain PyTorch and runs wherever the model does.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

IGNORE_INDEX = -100
# Model types whose causal-LM forward is decoder -> lm_head -> ForCausalLMLoss and nothing else
# (no logit soft-capping or scaling, no auxiliary loss), so replacing the head's loss changes no result.
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# fp32 logits per chunk: small enough to stay in a CPU's L2/L3 (4-8 MiB measured best on the
# bench's 4,096-row vocabulary), large enough on a GPU that each chunk's matmuls fill it
# (512 MiB = 883 tokens of Qwen2.5's 151,936 rows).
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}
MIN_CHUNK_ROWS = 128


def chunk_rows(vocab: int, device_type: str) -> int:
    """Tokens per chunk: CHUNK_BYTES of fp32 logits, at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"]) // (4 * vocab))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the model's own head would use: autocast's (Accelerate's bf16/fp16 over
    fp32 weights), else the weight's (DeepSpeed's 16-bit engine weights, or fp32)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, label) / denominator, and its gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, rows):
        dtype = _compute_dtype(weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h, y = h_all[start:start + rows], labels[start:start + rows]
                logits = (h @ w.t()).float()
                valid = y != IGNORE_INDEX
                target = y.masked_fill(~valid, 0)[:, None]
                picked = logits.gather(1, target)
                # softmax in place (logsumexp would allocate a second chunk-sized buffer): the buffer
                # becomes exp(logits - max), then its row-normalised self
                row_max = logits.max(dim=-1, keepdim=True).values
                row_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
                total += ((row_sum.log() + row_max - picked).squeeze(1) * valid).sum()
                # d(sum CE)/d logits = softmax - one_hot, zero on ignored rows; the 1/denominator (and
                # fp16's loss scale) is applied in the backward, so the 16-bit copy holds values in
                # [-1, 1] and none underflows (p / 16k tokens would, in fp16, before the loss scale)
                grad_logits = logits.div_(row_sum)
                grad_logits.scatter_add_(1, target, -valid[:, None].float())
                grad_logits.mul_(valid[:, None])
                g = grad_logits.to(dtype)  # the same buffer in an fp32 run
                grad_hidden[start:start + rows] = g @ w
                if grad_weight is not None:
                    # from the fp32 gradient itself, not an fp32 copy of its 16-bit one: one chunk-sized
                    # buffer less (6 bytes per chunk entry at the peak in a 16-bit run, not 10), no rounding
                    grad_weight.addmm_(grad_logits.t(), h if h.dtype == torch.float32 else h.float())
                del logits, grad_logits, g  # before the next chunk's matmul, so one chunk is alive at a time
        ctx.save_for_backward(grad_hidden, grad_weight, denominator)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, denominator = ctx.saved_tensors
        scale = grad_loss.float() / denominator  # in fp32: fp16's loss scale times 1/tokens

        def scaled(grad, dtype):  # in place where fp32: the saved gradient is not needed again
            return grad.mul_(scale).to(dtype) if grad.dtype == torch.float32 else (grad.float() * scale).to(dtype)

        return (scaled(grad_hidden, grad_hidden.dtype),
                scaled(grad_weight, ctx.weight_dtype) if grad_weight is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         denominator: torch.Tensor | float | None = None, rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T against `labels` (already shifted; -100
    ignored), summed and divided by `denominator` (default: the number of labels not ignored, a
    mean). hidden: (tokens, d); weight: (vocab, d); labels: (tokens,). Equal to
    F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / denominator and
    its gradients, to float rounding."""
    if denominator is None:
        denominator = (labels != IGNORE_INDEX).sum()
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
    rows = rows or chunk_rows(weight.shape[0], hidden.device.type)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, denominator, rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # evaluation: the loss alone, chunk by chunk
    dtype = _compute_dtype(weight)
    w = weight.to(dtype)  # once, not per chunk: a cast of the whole head under autocast
    for start in range(0, hidden.shape[0], rows):
        logits = (hidden[start:start + rows].to(dtype) @ w.t()).float()
        total += F.cross_entropy(logits, labels[start:start + rows], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / denominator


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[label] per token (0 where the label is ignored), a chunk at a
    time. Unlike the cross-entropy above, the gradient of each token's log-prob is weighted by what
    the loss makes of it (a preference loss's sigmoid of the pair's margin), known only after the
    forward; so the backward recomputes each chunk's logits: one head matmul more, and still no
    (tokens x vocab) buffer beyond one chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        dtype = _compute_dtype(weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                y = labels[start:start + rows]
                valid = y != IGNORE_INDEX
                logits = (hidden[start:start + rows].to(dtype) @ w.t()).float()
                picked = logits.gather(1, y.masked_fill(~valid, 0)[:, None]).squeeze(1)
                out[start:start + rows] = (picked - torch.logsumexp(logits, dim=-1)) * valid
                del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.rows, ctx.dtype = rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        rows, dtype = ctx.rows, ctx.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
            for start in range(0, hidden.shape[0], rows):
                h, y = hidden[start:start + rows].to(dtype), labels[start:start + rows]
                valid = y != IGNORE_INDEX
                g = grad_out[start:start + rows].float() * valid
                logits = (h @ w.t()).float()
                # d logp / d logits = one_hot - softmax (zero on ignored rows), built in the logits' own buffer
                grad_logits = logits.sub_(logits.max(dim=-1, keepdim=True).values).exp_()
                grad_logits.div_(grad_logits.sum(dim=-1, keepdim=True)).neg_()
                grad_logits.scatter_add_(1, y.masked_fill(~valid, 0)[:, None], valid[:, None].float())
                grad_logits.mul_(valid[:, None])
                if grad_hidden is not None:
                    # the token's weight g is applied after the 16-bit matmul, in fp32: p x g (g small
                    # under fp16's loss scale) would underflow in the 16-bit copy, one_hot - softmax does not
                    grad_hidden[start:start + rows] = ((grad_logits.to(dtype) @ w).float() * g[:, None]).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.mul_(g[:, None]).t(), h.float())
                del logits, grad_logits
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Each token's log-prob of its label under the logits hidden @ weight.T (fp32; 0 where the
    label is -100). hidden: (tokens, d); weight: (vocab, d); labels: (tokens,). Equal to
    F.log_softmax(F.linear(hidden, weight).float(), -1).gather(label) and its gradients, to float
    rounding, without the whole logits."""
    rows = rows or chunk_rows(weight.shape[0], hidden.device.type)
    return _LinearTokenLogps.apply(hidden, weight, labels, rows)


def _head_forward(head, hidden, labels=None, denominator=None, token_logps=False):
    """The output head's forward: the logits as nn.Linear gives them, or, with `labels`, the
    chunked loss (token_logps: each label's log-prob instead). It runs as the head's own forward
    so ZeRO-3 gathers the head's weight for it."""
    if labels is None:
        return F.linear(hidden, head.weight)
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if token_logps:
        return linear_token_logps(flat_hidden, head.weight, flat_labels).view(labels.shape)
    return linear_cross_entropy(flat_hidden, head.weight, flat_labels, denominator)


@dataclass
class TokenLogpsOutput(ModelOutput):
    """What the forward returns with token_logps=True: each position's log-prob of the next
    token's label, (batch, length) fp32, 0 where the label is -100 (and at the last position)."""

    token_logps: torch.Tensor | None = None


def _causal_lm_forward(model, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                       num_items_in_batch=None, shift_labels=None, token_logps=False, **kwargs):
    """The model's forward with labels through the chunked loss (no logits returned), or with
    token_logps=True through linear_token_logps (TokenLogpsOutput); anything else, or a head PEFT
    has wrapped (trainable token rows), through the model's own forward."""
    chunked = labels is not None and kwargs.get("past_key_values") is None and not kwargs.get("output_hidden_states") \
        and getattr(model.lm_head, "_trainrig_chunked", False)
    if not chunked:
        extra = {k: v for k, v in (("num_items_in_batch", num_items_in_batch), ("shift_labels", shift_labels)) if v is not None}
        return type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, **extra, **kwargs)
    kwargs.pop("use_cache", None)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **kwargs).last_hidden_state
    if shift_labels is None:  # transformers' shift: position t predicts t + 1, the last predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if token_logps:
        return TokenLogpsOutput(token_logps=model.lm_head(hidden, shift_labels.to(hidden.device), None, True))
    loss = model.lm_head(hidden, shift_labels.to(hidden.device), num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss)


def use_chunked_loss(model, enabled: bool) -> tuple[bool, str]:
    """Route `model`'s loss through linear_cross_entropy when it can be; (in use, why). A PEFT
    model's base model is the one routed (its LoRA layers stay where they are)."""
    if not enabled:
        return False, "--no-chunked_loss: the model's own loss (full logits)"
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    model_type = getattr(model.config, "model_type", "")
    head = getattr(model, "lm_head", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "model"):
        return False, f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}: the model's own loss"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False, (f"the output head is a {type(head).__name__}, not a plain bias-free Linear (with LoRA: PEFT wraps a head tied "
                       f"to the embedding whose chat-token rows train, --lora_train_chat_tokens): the model's own loss")
    head.forward = types.MethodType(_head_forward, head)
    head._trainrig_chunked = True
    model.forward = types.MethodType(_causal_lm_forward, model)
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ds_shape: the whole head under ZeRO-3
    return True, (f"chunked LM-head cross-entropy: {chunk_rows(vocab, 'cuda')} tokens per chunk on a GPU, "
                  f"{chunk_rows(vocab, 'cpu')} on CPU; the {vocab}-entry logits are never whole")
