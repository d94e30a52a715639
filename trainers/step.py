"""The optimizer step every stage shares, and the causal-LM objective (pretraining, SFT).

The loss of an optimizer step is the mean over every trained unit of the whole global batch (all
micro batches, all ranks): each micro batch's summed loss is divided by the global count, which is
known before the first backward because the window's batches are fetched first. So accumulation,
world size and packing change nothing but the speed. A unit is a trained token for the language
model; a stage with another objective (the reward model: pairs) passes its own loss and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trainers.data.collate import model_inputs, num_tokens, trained_tokens


def lm_loss(model, batch: dict, device, denominator: torch.Tensor, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal LM: this micro batch's summed token loss over the global trained-token count.
    mask_dtype: the shared attention mask's (trainers/attention.py mask_dtype), None under FlashAttention."""
    return model(**model_inputs(batch, device, mask_dtype), num_items_in_batch=denominator).loss


def lm_counts(batch: dict) -> tuple[int, int]:
    """(trained tokens, input tokens, padding excluded) of a micro batch."""
    return trained_tokens(batch["labels"]), num_tokens(batch)


def pair_counts(batch: dict) -> tuple[int, int]:
    """(pairs, input tokens, padding excluded) of a micro batch of preference pairs."""
    return batch["pairs"], batch["num_tokens"]


@dataclass
class StepResult:
    """What one optimizer step did, the same on every rank except `finite_here`."""

    loss: float  # global mean per trained unit (NaN/Inf when some rank's was)
    grad_norm: float | None  # pre-clip global norm; None where the engine keeps it
    units: int  # trained units of the global batch (tokens, or pairs for the reward model)
    input_tokens: int  # input tokens of the global batch, padding excluded
    applied: bool  # False: every rank skipped this update (non-finite loss or gradients)
    finite_here: bool  # this rank's micro losses were all finite


def train_step(runtime, model, optimizer, window: list[dict], max_grad_norm: float,
               loss_sum=lm_loss, counts=lm_counts) -> StepResult:
    """One optimizer step over `window` (this rank's micro batches). A unit is a trained token for
    the language model (lm_loss); the reward model passes its pairwise loss and counts pairs.

    A micro loss that is NaN/Inf is backpropagated multiplied by NaN (by 1.0 otherwise, which
    changes no bit), so its gradients are NaN whatever produced it; the gradient reduction carries
    that NaN into every rank's global norm, and every rank skips the same update
    (runtime.optimizer_step) without an extra collective."""
    per_batch = [counts(b) for b in window]
    global_units, input_tokens = runtime.all_reduce_sum([sum(c[0] for c in per_batch), sum(c[1] for c in per_batch)])
    if global_units == 0:  # the data preparation drops every sample without a trained token
        raise RuntimeError("a global batch without a single trained token reached the loss")
    scale = len(window) * runtime.world_size  # undo the engines' mean over micro steps and ranks
    loss_denominator = torch.tensor(global_units, device=runtime.device)
    step_loss = torch.zeros((), device=runtime.device)
    grad_norm, applied = None, True
    for batch in window:
        with runtime.accumulate(model):
            # only the loss is kept: holding the 16-bit logits through the backward costs 2 x vocab bytes per token
            loss = loss_sum(model, batch, runtime.device, loss_denominator)
            poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))  # no host sync
            runtime.backward(loss * scale * poison)  # loss = this micro batch's summed loss / global units
            step_loss += loss.detach().float()
            if runtime.sync_gradients:
                grad_norm = runtime.clip_grad_norm(model, max_grad_norm)
                applied = runtime.optimizer_step(optimizer, grad_norm)
            optimizer.zero_grad(set_to_none=True)
    if grad_norm is None:
        grad_norm = runtime.grad_norm_after_step()
    finite_here = math.isfinite(step_loss.item())
    (loss,) = runtime.all_reduce_sum([step_loss.item()])
    return StepResult(loss, grad_norm, int(global_units), int(input_tokens), applied, finite_here)


@torch.no_grad()
def evaluate_lm(runtime, model, dataset, batch_size: int, collate, mask_dtype: torch.dtype | None = None) -> dict:
    """Mean loss per trained token and perplexity over `dataset`, split across ranks. Every rank
    runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each)."""
    model.eval()
    parts = np.array_split(np.arange(len(dataset)), runtime.world_size)
    mine = parts[runtime.rank]
    n_batches = math.ceil(max(len(p) for p in parts) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0 if len(idx) else 0.0  # an idle rank still joins the collective forward
        batch = collate([dataset[int(i)] for i in (idx if len(idx) else [0])])
        out = model(**model_inputs(batch, runtime.device, mask_dtype), num_items_in_batch=1)  # reduction "sum" over the batch's tokens
        loss_sum += weight * out.loss.double().cpu()
        tokens += trained_tokens(batch["labels"]) if weight else 0
    model.train()
    total_loss, total_tokens = runtime.all_reduce_sum([loss_sum.item(), tokens])
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(total_tokens)}


def describe_lm_eval(figures: dict) -> str:
    """evaluate_lm's figures, for the log."""
    return f"eval_loss {figures['eval_loss']:.4f} eval_ppl {figures['eval_ppl']:.2f} over {figures['eval_tokens']} trained tokens"
