"""Batches and the resumable, rank-sharded sample order."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from trainers.data import IGNORE_INDEX


def collate_blocks(samples: list[dict]) -> dict:
    """Pretraining blocks -> `input_ids`, `labels` (= input_ids; the model shifts) and sample ids."""
    input_ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples]))
    return {"input_ids": input_ids, "labels": input_ids.clone(),
            "sample_ids": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


def collate_rows(rows: list[list[dict]], pad_id: int, packed: bool) -> dict:
    """Rows of chat samples -> a batch padded on the right to the longest row.

    packed: padding-free -- samples of a row are concatenated and `position_ids` restart at 0 for
    each (transformers 5.x then keeps attention inside each sample; `attention_mask` stays None);
    the padding tail is one more segment whose labels are ignored. Each sample's first label is
    ignored so no token is predicted across a sample boundary (it is `<|im_start|>`, never trained).
    not packed: one sample per row with an `attention_mask` -- the classic padded batch.
    """
    length = max(sum(len(s["input_ids"]) for s in row) for row in rows)
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
             "sample_ids": torch.tensor([s["index"] for row in rows for s in row], dtype=torch.long),
             "num_tokens": int(attention_mask.sum())}
    if packed:
        batch["position_ids"] = torch.from_numpy(position_ids)
    else:
        batch["attention_mask"] = torch.from_numpy(attention_mask)
    return batch


MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask")


def model_inputs(batch: dict, device) -> dict:
    """The tensors of `batch` the model takes, on `device` (sample ids stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in MODEL_INPUTS}


def num_tokens(batch: dict) -> int:
    """Input tokens of a batch, padding excluded."""
    return batch["num_tokens"] if "num_tokens" in batch else batch["input_ids"].numel()


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions the loss counts: labels after the model's one-token shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_fill(row_lengths: np.ndarray, order: list[int], micro: int) -> float:
    """Non-pad share of all positions of the micro batches cut from `order`, each padded to its
    longest row (what collate_rows builds)."""
    rows = np.asarray(order[:len(order) // micro * micro], dtype=np.int64).reshape(-1, micro)
    lengths = row_lengths[rows]
    return float(lengths.sum() / max(int(lengths.max(axis=1).sum()) * micro, 1))


def group_by_length(order: np.ndarray, lengths: np.ndarray, group_size: int) -> np.ndarray:
    """Sort each consecutive `group_size` chunk of `order` by length, longest first, so batches
    cut from it hold similar lengths (little padding) while the chunks stay in random order."""
    chunks = [order[i:i + group_size] for i in range(0, len(order), group_size)]
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle per epoch, rank r takes every world-th index,
    drop_last so all ranks see the same number of samples) that can start mid-epoch.

    Over ranks, optimizer step k covers the same set of samples whatever the world size, so a
    2-rank run and a 1-rank run with twice the micro batch train on identical global batches.

    With `lengths`, each epoch's order is length-grouped in chunks of `group_size` (pass a
    multiple of micro batch x world): the strided split then gives every rank's micro batch
    samples of similar length, and the global batches are still the same for any world size.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 lengths: np.ndarray | None = None, group_size: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
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
