"""Batches and the resumable, rank-sharded sample order."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from trainers.attention import ROW_MULTIPLE, attention_bias
from trainers.data import IGNORE_INDEX


def collate_blocks(samples: list[dict]) -> dict:
    """Pretraining blocks -> `input_ids`, `labels` (= input_ids; the model shifts) and sample ids."""
    input_ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples]))
    return {"input_ids": input_ids, "labels": input_ids.clone(),
            "sample_ids": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


def collate_rows(rows: list[list[dict]], pad_id: int, layout: str) -> dict:
    """Rows of chat samples -> a batch in one of three layouts (trainers/attention.py says which
    the attention kernel needs). Each sample's first label is ignored, so no token is predicted
    across a sample boundary (it is `<|im_start|>`, never trained).

    packed: the samples of a row concatenated, `position_ids` restarting at 0 for each, rows padded
      on the right (to a multiple of ROW_MULTIPLE); the padding tail is one more segment whose
      labels are ignored. SDPA/eager get the per-sample causal mask from attention_bias.
    padded: one sample per row with an `attention_mask` -- the classic padded batch.
    flat: FlashAttention's padding-free batch -- every sample of every row in one row of shape
      [1, total tokens], with `cu_seq_lens_q/k` (each sample's start, int32) and `max_length_q/k`
      (the longest sample, a Python int), the kwargs transformers hands to the varlen kernel.
    """
    samples = [s for row in rows for s in row]
    sample_ids = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    if layout == "flat":
        lengths = [len(s["input_ids"]) for s in samples]
        input_ids = np.concatenate([s["input_ids"] for s in samples]).astype(np.int64)[None]
        labels = np.concatenate([s["labels"] for s in samples]).astype(np.int64)[None]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        labels[0, starts[:-1]] = IGNORE_INDEX
        position_ids = np.concatenate([np.arange(n) for n in lengths])[None]
        boundaries = torch.from_numpy(starts.astype(np.int32))
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids), "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries,
                "max_length_q": max(lengths), "max_length_k": max(lengths), "sample_ids": sample_ids,
                "num_tokens": int(starts[-1])}
    if layout not in ("packed", "padded"):
        raise ValueError(f"unknown row layout {layout!r}")
    longest = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    length = -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), length), dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for sample in row:
            n = len(sample["input_ids"])
            input_ids[r, at:at + n] = sample["input_ids"]
            labels[r, at:at + n] = sample["labels"]
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = np.arange(n)
            attention_mask[r, at:at + n] = 1
            at += n
        position_ids[r, at:] = np.arange(length - at)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "sample_ids": sample_ids, "num_tokens": int(attention_mask.sum())}
    if layout == "packed":
        batch["position_ids"] = torch.from_numpy(position_ids)
    else:
        batch["attention_mask"] = torch.from_numpy(attention_mask)
    return batch


MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict, device, mask_dtype: torch.dtype | None = None) -> dict:
    """What the model takes from `batch`, on `device` (sample ids stay behind). With `mask_dtype`
    (SDPA/eager, trainers/attention.py), a packed row's position_ids or a padded row's
    attention_mask become one (B, 1, L, L) additive mask in that dtype, shared by every layer."""
    inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
              for k, v in batch.items() if k in MODEL_INPUTS}
    if mask_dtype is not None and "cu_seq_lens_q" not in inputs:
        bias = attention_bias(inputs.get("position_ids"), inputs.get("attention_mask"), mask_dtype)
        if bias is not None:
            inputs["attention_mask"] = bias
    return inputs


def num_tokens(batch: dict) -> int:
    """Input tokens of a batch, padding excluded."""
    return batch["num_tokens"] if "num_tokens" in batch else batch["input_ids"].numel()


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions the loss counts: labels after the model's one-token shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_fill(row_lengths: np.ndarray, order: list[int], micro: int) -> float:
    """Non-pad share of all positions of the micro batches cut from `order`, each padded to its
    longest row (what collate_rows builds for the packed and padded layouts; flat has no padding)."""
    rows = np.asarray(order[:len(order) // micro * micro], dtype=np.int64).reshape(-1, micro)
    lengths = row_lengths[rows]
    return float(lengths.sum() / max(int(lengths.max(axis=1).sum()) * micro, 1))


def group_by_length(order: np.ndarray, lengths: np.ndarray, group_size: int) -> np.ndarray:
    """Sort each consecutive `group_size` chunk of `order` by length, longest first, so batches
    cut from it hold similar lengths (little padding) while the chunks stay in random order."""
    chunks = [order[i:i + group_size] for i in range(0, len(order), group_size)]
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle per epoch, rank r takes every world-th index)
    that can start mid-epoch, and whose epoch is a whole number of global batches.

    An epoch uses the first `len(dataset) // global_batch * global_batch` samples of its shuffled
    order (torch's drop_last cuts to a multiple of the world size instead), so optimizer step k
    covers order[k * global_batch:(k + 1) * global_batch] whatever the world size and micro
    batch: a 2-rank run and a 1-rank run with twice the accumulation train on identical global
    batches, epoch after epoch, and a checkpoint of one resumes on the other at the same sample.
    Up to global_batch - 1 samples sit out each epoch (a different few each time: the order is
    reshuffled).

    With `lengths`, each epoch's order is length-grouped in chunks of `group_size` samples (a
    multiple of the global batch, so the grouping too is the same for every world size): the
    strided split then gives every rank's micro batch samples of similar length.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, global_batch: int, shuffle: bool = True,
                 lengths: np.ndarray | None = None, group_size: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if global_batch % num_replicas:
            raise ValueError(f"global batch {global_batch} is not a multiple of the world size {num_replicas}")
        self.total_size = len(dataset) // global_batch * global_batch
        self.num_samples = self.total_size // num_replicas
        self.start = 0
        self.lengths, self.group_size = lengths, group_size

    def set_position(self, epoch: int, samples_done: int) -> None:
        """Resume at `samples_done` samples (this rank's) into `epoch`."""
        self.set_epoch(epoch)
        self.start = samples_done

    def __iter__(self):
        if self.lengths is None:
            indices = super().__iter__()
        else:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator).numpy()[:self.total_size]
            indices = iter(group_by_length(order, self.lengths, self.group_size)[self.rank::self.num_replicas].tolist())
        return itertools.islice(indices, self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
