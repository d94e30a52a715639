"""Preference optimisation's objective: per-sequence log-probs of the scored answers, the losses
of DPO and its relatives as small pure functions of them, the implicit rewards they log, and the
reference log-probs computed once.

Notation: for a pair, `chosen`/`rejected` are the summed log-probs log pi(y|x) of each answer's
scored tokens (its content and closing <|im_end|>), `*_tokens` their counts, `ref_*` the same
under the reference model (the starting point). The DPO-family margin is
    delta = (chosen - ref_chosen) - (rejected - ref_rejected).
Every loss returns one value per pair; the stage sums them and divides by the global pair count
(trainers/step.py), so accumulation and world size change nothing but the speed.

  sigmoid  DPO (Rafailov et al. 2023, eq. 7), with label smoothing eps: conservative DPO,
           -(1 - eps) log s(beta delta) - eps log s(-beta delta)
  ipo      IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL and the authors use it:
           (delta_c / n_c - delta_r / n_r - 1 / (2 beta))^2
  hinge    SLiC's hinge (Zhao et al. 2023): relu(1 - beta delta)
  simpo    SimPO (Meng et al. 2024, eq. 6), reference-free, on average log-probs a = logp / n:
           -(1 - eps) log s(beta (a_c - a_r) - gamma) - eps log s(-(beta (a_c - a_r) - gamma))
  orpo     ORPO (Hong et al. 2024, eq. 6-7), reference-free: the chosen answer's mean token NLL
           plus lambda (--beta) times -log s(log odds(a_c) - log odds(a_r)), odds(p) = p / (1 - p)
           on the average log-probs. The NLL is each pair's mean over its tokens, then the mean
           over pairs (the paper's expectation); TRL's ORPOTrainer takes one mean over the batch's
           tokens and counts the prompt's tokens too, so the two agree only for a single pair
           scored on its answer alone.
Implicit rewards (logged as rewards/chosen, rewards/rejected; accuracy = share of pairs with
chosen > rejected, margin = their mean difference): beta x log-ratio for sigmoid and hinge (as TRL
logs them), beta x per-token log-ratio for ipo (the quantity its loss compares), beta x average
log-prob for simpo and orpo (as TRL's CPO/ORPO trainers log them).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainers.data import IGNORE_INDEX
from trainers.data.collate import model_inputs
from trainers.errors import UsageError

REFERENCE_FREE = ("simpo", "orpo")
SMOOTHABLE = ("sigmoid", "simpo")  # the losses label smoothing is defined for
REFERENCE_CACHE_VERSION = 1  # bump when the log-prob computation changes, so old caches are not reused


# ------------------------------------------------------------------------------ the losses


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def ipo_loss(delta_chosen: torch.Tensor, delta_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    margin = delta_chosen / chosen_tokens.clamp(min=1) - delta_rejected / rejected_tokens.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * delta)


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    logits = beta * (avg_chosen - avg_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


LOG1MEXP_MAX = -1e-6  # an average log-prob of 0 (p = 1 in fp32: a memorised answer) would make log(1 - p) -inf


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation at either end (Maechler 2012). x is capped at
    LOG1MEXP_MAX, and each branch is evaluated only on its own side of -log 2 (the other side gets
    a harmless -1), so neither the unused branch's infinite derivative nor x = 0 puts a NaN in the
    gradient."""
    x = x.clamp(max=LOG1MEXP_MAX)
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))), torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, weight: float) -> torch.Tensor:
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    return -avg_chosen - weight * F.logsigmoid(log_odds)


@dataclass
class PairLogps:
    """Per-pair log-probs of a batch (each a (pairs,) fp32 tensor)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class Objective:
    """The loss settings (PreferenceLossConfig's, checked)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


def objective_from(cfg) -> Objective:
    """The checked Objective of a PreferenceLossConfig."""
    if cfg.label_smoothing and cfg.loss_type not in SMOOTHABLE:
        raise UsageError(f"--label_smoothing {cfg.label_smoothing} is defined for --loss_type {' or '.join(SMOOTHABLE)}, "
                         f"not {cfg.loss_type}; drop it")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise UsageError(f"--label_smoothing {cfg.label_smoothing}: the share of flipped labels must be in [0, 0.5)")
    if cfg.beta <= 0:
        raise UsageError(f"--beta {cfg.beta} must be above 0")
    return Objective(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)


def pair_losses(objective: Objective, policy: PairLogps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair; `reference` is (ref_chosen, ref_rejected),
    None for the reference-free losses."""
    o = objective
    if not o.needs_reference:
        avg_c = policy.chosen / policy.chosen_tokens.clamp(min=1)
        avg_r = policy.rejected / policy.rejected_tokens.clamp(min=1)
        if o.loss_type == "simpo":
            loss = simpo_loss(avg_c, avg_r, o.beta, o.simpo_gamma, o.label_smoothing)
        else:
            loss = orpo_loss(avg_c, avg_r, o.beta)
        return loss, o.beta * avg_c.detach(), o.beta * avg_r.detach()
    ref_chosen, ref_rejected = reference
    delta_c, delta_r = policy.chosen - ref_chosen, policy.rejected - ref_rejected
    if o.loss_type == "sigmoid":
        loss = sigmoid_loss(delta_c - delta_r, o.beta, o.label_smoothing)
    elif o.loss_type == "ipo":
        loss = ipo_loss(delta_c, delta_r, policy.chosen_tokens, policy.rejected_tokens, o.beta)
        delta_c, delta_r = delta_c / policy.chosen_tokens.clamp(min=1), delta_r / policy.rejected_tokens.clamp(min=1)
    else:
        loss = hinge_loss(delta_c - delta_r, o.beta)
    return loss, o.beta * delta_c.detach(), o.beta * delta_r.detach()


# ---------------------------------------------------------------------------- the log-probs


def batch_logps(model, batch: dict, device, mask_dtype: torch.dtype | None, chunked: bool) -> PairLogps:
    """Each pair's summed log-prob of its scored tokens and their count, fp32, from the 2B rows of
    a pair batch (chosen first). chunked: the model's head computes the token log-probs a chunk at
    a time (trainers/chunked_loss.py); else from the model's whole logits."""
    inputs = model_inputs({k: batch[k] for k in ("input_ids", "attention_mask")}, device, mask_dtype)
    labels = batch["labels"].to(device)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t scores token t + 1
    scored = shifted != IGNORE_INDEX
    if chunked:
        token_logps = model(**inputs, labels=labels, token_logps=True).token_logps
    else:
        logits = model(**inputs).logits.float()
        picked = logits.gather(2, shifted.clamp(min=0)[..., None]).squeeze(2)
        token_logps = (picked - torch.logsumexp(logits, dim=-1)) * scored
    sums, counts, n = token_logps.sum(dim=1), scored.sum(dim=1).float(), batch["pairs"]
    return PairLogps(sums[:n], sums[n:], counts[:n], counts[n:])


class RewardTotals:
    """Sums of the implicit rewards over the pairs since the last report, on the device (no host
    sync per step); `take` reduces them over the ranks and starts again."""

    NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")

    def __init__(self, device):
        self.device = device
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Only the pairs whose rewards are finite count: a NaN step (which the loop skips) leaves the
        figures as they were. Masked, not indexed, so nothing waits for the device."""
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        finite = torch.isfinite(chosen) & torch.isfinite(rejected)
        chosen, rejected = chosen.where(finite, 0.0), rejected.where(finite, 0.0)
        self.sums += torch.stack([chosen.sum(), rejected.sum(), ((chosen > rejected) & finite).double().sum(),
                                  (chosen - rejected).sum(), finite.double().sum()])

    def take(self, runtime, prefix: str = "") -> dict:
        totals = runtime.all_reduce_sum(self.sums.tolist())
        self.sums.zero_()
        pairs = max(totals[-1], 1)
        return {prefix + name: round(value / pairs, 6) for name, value in zip(self.NAMES, totals[:4])}


# ------------------------------------------------------------------------- the reference


def reference_cache_key(pairs_digest: str, model_fingerprint: list[dict], settings: dict) -> str:
    """What the reference log-probs depend on: the encoded pairs, the starting model's files, and
    how it runs (precision, base bits, attention, head path)."""
    payload = json.dumps({"version": REFERENCE_CACHE_VERSION, "pairs": pairs_digest, "model": model_fingerprint,
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def compute_reference(runtime, model, dataset, batch_size: int, collate, mask_dtype, chunked: bool) -> np.ndarray:
    """(len(dataset), 2) float64: the reference log-probs (chosen, rejected) of every pair, the
    model in eval mode; the pairs split over the ranks, each rank running the same number of
    forwards (ZeRO-3 gathers parameters collectively), every rank getting the whole table."""
    model.eval()
    parts = np.array_split(np.arange(len(dataset)), runtime.world_size)
    mine = parts[runtime.rank]
    found = []
    for b in range(math.ceil(max(len(p) for p in parts) / batch_size)):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        batch = collate([dataset[int(i)] for i in (idx if len(idx) else [0])])
        logps = batch_logps(model, batch, runtime.device, mask_dtype, chunked)
        if len(idx):  # an idle rank still joins the collective forward
            found += [(int(i), float(c), float(r)) for i, c, r in zip(idx, logps.chosen.cpu(), logps.rejected.cpu())]
    model.train()
    table = np.zeros((len(dataset), 2), dtype=np.float64)
    for i, chosen, rejected in runtime.gather_objects(found):
        table[i] = chosen, rejected
    return table
