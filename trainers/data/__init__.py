"""Data preparation: readers (sources), pretraining blocks (packing), batches (collate)."""

IGNORE_INDEX = -100  # label value the loss skips (HF convention); defined here once
