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


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions the loss counts: labels after the model's one-token shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle per epoch, rank r takes every world-th index,
    drop_last so all ranks see the same number of samples) that can start mid-epoch.

    Over ranks, optimizer step k covers the same set of samples whatever the world size, so a
    2-rank run and a 1-rank run with twice the micro batch train on identical global batches.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, samples_done: int) -> None:
        """Resume at `samples_done` samples (this rank's) into `epoch`."""
        self.set_epoch(epoch)
        self.start = samples_done

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
