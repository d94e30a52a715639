"""Optimizers and the learning-rate schedule.

AdamW (fused kernels where the device has them), or Muon for the 2-D hidden matrices with AdamW
for embeddings, the LM head, norms and biases (torch.optim.Muon accepts only 2-D parameters).
"""

from __future__ import annotations

import math

import torch

from trainers.errors import UsageError


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Fraction of the peak learning rate used for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 already gets 1/warmup of the peak), then cosine or
    linear decay to `min_ratio` at the last step, or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {kind}")


def warmup_steps_for(optim_cfg, total_steps: int) -> int:
    if optim_cfg.warmup_steps > 0:
        return optim_cfg.warmup_steps
    return int(math.ceil(optim_cfg.warmup_ratio * total_steps))


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "embed" in name or "norm" in name


def _is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Hidden 2-D weights (attention and MLP projections), not the embedding or LM head."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on hidden matrices + AdamW on the rest, presented as one optimizer so the runtime,
    LR scheduler and checkpoints see a single object. torch has no such combination built in."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.optimizers = [muon, adamw]
        # share the group dicts, so schedulers that write group["lr"] reach both optimizers
        self.param_groups = muon.param_groups + adamw.param_groups
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def state(self):
        return {**self.optimizers[0].state, **self.optimizers[1].state}

    @torch.no_grad()
    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.optimizers[0].state_dict(), "adamw": self.optimizers[1].state_dict()}

    def load_state_dict(self, state_dict):
        self.optimizers[0].load_state_dict(state_dict["muon"])
        self.optimizers[1].load_state_dict(state_dict["adamw"])


# bitsandbytes' AdamW with both moments in 8 bits, blockwise (256) scaled: 2 B per parameter instead of
# 8 (tensors under 4,096 elements keep fp32 moments); the paged one also lets CUDA page its states to
# host memory under pressure instead of running out (on a CPU it is the plain one)
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")


def build_optimizer(model: torch.nn.Module, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """Under ZeRO offload accelerate swaps the AdamW for DeepSpeedCPUAdam over the same param groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UsageError("the model has no trainable parameters")
    adamw_kwargs = dict(lr=optim_cfg.learning_rate, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
                        eps=optim_cfg.adam_epsilon)
    # fused AdamW runs one kernel for all parameters; CPU and CUDA have it in torch >= 2.4
    fused = device.type in ("cuda", "cpu")

    def adamw_groups(params):
        decay = [p for n, p in params if not _is_no_decay(n, p)]
        no_decay = [p for n, p in params if _is_no_decay(n, p)]
        return [g for g in ({"params": decay, "weight_decay": optim_cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

    if optim_cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(adamw_groups(named), fused=fused, **adamw_kwargs)
    elif optim_cfg.optimizer in EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes as bnb

        kind = bnb.optim.PagedAdamW8bit if optim_cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        optimizer = kind(adamw_groups(named), **adamw_kwargs)
    else:
        matrices = [p for n, p in named if _is_muon_matrix(n, p)]
        rest = [(n, p) for n, p in named if not _is_muon_matrix(n, p)]
        muon = torch.optim.Muon(matrices, lr=optim_cfg.learning_rate, weight_decay=optim_cfg.weight_decay,
                                momentum=optim_cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
        optimizer = MuonWithAdamW(muon, torch.optim.AdamW(adamw_groups(rest), fused=fused, **adamw_kwargs))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the peak; set_learning_rate scales it every step
    return optimizer


def set_learning_rate(optimizer, step: int, total_steps: int, optim_cfg) -> float:
    """Set every group's lr for optimizer step `step` from its peak (`initial_lr`); returns the
    multiplier. Stateless, so a resumed run needs nothing but the step to be exact."""
    multiplier = lr_multiplier(step, total_steps, warmup_steps_for(optim_cfg, total_steps),
                               optim_cfg.lr_scheduler_type, optim_cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
    return multiplier
