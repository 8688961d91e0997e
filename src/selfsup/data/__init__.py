"""Datasets, pretraining/evaluation splits and the batch iteration that feeds the engine.

Typical use::

    splits = build_data("fashion-mnist", limit=1000)
    sampler = EpochBatchSampler(len(splits.pretrain), batch_size=256, seed=0)
    for images, labels, indices in iterate_batches(splits.pretrain, sampler, epoch=0):
        ...  # images: (B, C, H, W) uint8
"""

from __future__ import annotations

from typing import Any

from selfsup.config import check_options
from selfsup.data import captions, datasets, packed, scenes  # noqa: F401  (register the builders)
from selfsup.data.base import (
    BatchTriple,
    DataError,
    DataSplits,
    ImageDataset,
    Sample,
    TensorImageDataset,
    channel_stats,
    resize_images,
    stratified_split,
)
from selfsup.data.datasets import ImageFolderDataset, read_idx, scan_image_folder
from selfsup.data.loader import EpochBatchSampler, SkipFailedCollate, iterate_batches, iterate_eval
from selfsup.registry import DATASETS

__all__ = [
    "BatchTriple",
    "DataError",
    "DataSplits",
    "EpochBatchSampler",
    "ImageDataset",
    "ImageFolderDataset",
    "Sample",
    "SkipFailedCollate",
    "TensorImageDataset",
    "build_data",
    "channel_stats",
    "iterate_batches",
    "iterate_eval",
    "read_idx",
    "resize_images",
    "scan_image_folder",
    "stratified_split",
]


def build_data(name: str, **kwargs: Any) -> DataSplits:
    """Build the registered dataset ``name`` with ``kwargs``, checking the keys first.

    Raises:
        DataError: an unknown keyword (the message names it, suggests the closest valid one
            and lists all of them) or a missing required one.
        RegistryError: an unknown dataset name.
    """
    factory = DATASETS.get(name)
    return factory(**check_options(factory, kwargs, "data", error=DataError, require=True))
