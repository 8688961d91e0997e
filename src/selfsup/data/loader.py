"""Batch iteration that feeds the engine: seeded per-epoch order, exact resume, sharding.

The order of an epoch is a pure function of ``(seed, epoch)``, so a run resumed from a
checkpoint at ``(epoch, batch)`` sees exactly the batches it would have seen, and ``world_size``
processes with per-process batch ``B`` together see exactly the batches of one process with
batch ``world_size * B`` (each rank takes its contiguous slice of the global batch).

In-memory datasets (:class:`~selfsup.data.base.TensorImageDataset`) are batched by one tensor
index per batch; file-backed datasets go through a ``DataLoader`` whose workers decode images,
or, for datasets that read whole batches (``get_batch``, e.g. packed shards), read one batch
each. A DataLoader hands each batch of the sampler to exactly one worker, so with the
sampler's rank slices every image is read once per epoch over all processes and workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from selfsup.data.base import BatchTriple, DataError, ImageDataset, Sample, TensorImageDataset


class EpochBatchSampler:
    """Per-process batches of sample indices for any epoch, resumable mid-epoch.

    Epoch ``e`` uses the permutation drawn from ``torch.Generator().manual_seed(seed + e)``
    (or ``arange`` when ``shuffle=False``). Global batch ``i`` is the permuted indices
    ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size``, and rank ``r`` gets its slice
    ``[r*B, (r+1)*B)`` of it.

    Args:
        num_samples: dataset size ``N``.
        batch_size: per-process batch size ``B``.
        seed: base seed of the epoch permutations.
        shuffle: permute each epoch; ``False`` iterates in dataset order.
        drop_last: drop the final incomplete global batch (use it for training: every step
            then has the same batch size on every rank). Without it the last global batch is
            split into ``world_size`` near-equal parts, which is empty on some ranks when it
            holds fewer than ``world_size`` samples.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        if drop_last:
            self.steps_per_epoch = num_samples // self.global_batch_size
            if self.steps_per_epoch == 0:
                # Zero steps per epoch would make the engine loop forever or divide by 0.
                raise DataError(
                    f"{num_samples} samples do not fill one global batch of {self.global_batch_size} "
                    f"(batch_size={batch_size} x world_size={world_size}) with drop_last=True; "
                    "lower batch_size or use more data"
                )
        else:
            self.steps_per_epoch = math.ceil(num_samples / self.global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def permutation(self, epoch: int) -> Tensor:
        """The ``(N,)`` int64 sample order of ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Tensor]:
        """Yield this rank's ``(batch_size,)`` int64 index batches of ``epoch``, starting at
        batch ``start_batch`` (the number of batches already done, for exact resume)."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise DataError(f"start_batch={start_batch} outside 0..{self.steps_per_epoch} (steps_per_epoch)")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Tensor]:
        perm = self.permutation(epoch)
        g, b, r = self.global_batch_size, self.batch_size, self.rank
        for i in range(start_batch, self.steps_per_epoch):
            global_batch = perm[i * g : (i + 1) * g]
            if len(global_batch) == g:
                yield global_batch[r * b : (r + 1) * b]
            else:  # the incomplete last batch of drop_last=False
                yield torch.tensor_split(global_batch, self.world_size)[r]


class SkipFailedCollate:
    """Collate ``(image, label, index)`` samples into a batch, dropping ``None`` samples
    (images that failed to decode), so a batch may come out smaller, or empty.

    Args:
        in_channels: channels ``C`` of the images (shape of an empty batch).
        image_size: side ``S`` of the images.
    """

    def __init__(self, in_channels: int, image_size: int) -> None:
        self.in_channels = in_channels
        self.image_size = image_size

    def __call__(self, samples: Sequence[Sample | None]) -> BatchTriple:
        """``[(image (C, S, S), label, index) | None] -> (images (B, C, S, S) uint8,
        labels (B,) int64, indices (B,) int64)``."""
        good = [s for s in samples if s is not None]
        if not good:
            c, s = self.in_channels, self.image_size
            empty = torch.empty(0, dtype=torch.int64)
            return torch.empty((0, c, s, s), dtype=torch.uint8), empty, empty.clone()
        images = torch.stack([s[0] for s in good])
        labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
        indices = torch.tensor([s[2] for s in good], dtype=torch.int64)
        return images, labels, indices


def _loader_batches(
    dataset: ImageDataset,
    batch_lists: list[list[int]],
    num_workers: int,
    prefetch: int,
    seed: int,
    keep_empty: bool,
) -> Iterator[BatchTriple]:
    """Run ``batch_lists`` through a DataLoader; report decode failures to ``dataset``."""
    loader = DataLoader(
        dataset,
        batch_sampler=batch_lists,
        num_workers=num_workers,
        collate_fn=SkipFailedCollate(dataset.in_channels, dataset.image_size),
        pin_memory=False,
        prefetch_factor=prefetch if num_workers > 0 else None,
        # Without its own generator a DataLoader draws its worker base seed from the global
        # torch RNG, which would make training randomness depend on how data was loaded.
        generator=torch.Generator().manual_seed(seed),
    )
    note_failures = getattr(dataset, "note_failures", None)
    for requested, batch in zip(batch_lists, loader):
        images, labels, indices = batch
        if note_failures is not None and len(indices) < len(requested):
            # Workers' own counts die with them; the main process's dataset keeps the tally.
            got = set(indices.tolist())
            note_failures([i for i in requested if i not in got])
        if images.shape[0] == 0 and not keep_empty:
            continue
        yield images, labels, indices


def default_num_workers(dataset: ImageDataset) -> int:
    """DataLoader workers when none are configured: 0 for in-memory tensors (batched in this
    process), else ``min(4, cores - 1)`` of the cores this process may use (one core stays
    with the training step)."""
    if isinstance(dataset, TensorImageDataset):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


class _BatchReads(Dataset):
    """A dataset that reads whole batches (``get_batch``) as a DataLoader dataset whose
    items are batches: ``reads[list of indices] -> (images, labels, indices)``."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, batch: list[int]) -> BatchTriple:
        return self.dataset.get_batch(torch.tensor(batch, dtype=torch.int64))  # type: ignore[attr-defined]


def _as_is(batch: Any) -> Any:
    return batch


def _read_batches(
    dataset: ImageDataset, batch_lists: list[list[int]], num_workers: int, prefetch: int, seed: int
) -> Iterator[BatchTriple]:
    """``dataset.get_batch`` of each batch, in order, in ``num_workers`` processes (or here)."""
    if num_workers == 0:
        return (dataset.get_batch(torch.tensor(b, dtype=torch.int64)) for b in batch_lists)  # type: ignore[attr-defined]
    loader = DataLoader(
        _BatchReads(dataset),
        sampler=batch_lists,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_as_is,  # the batch is already one
        prefetch_factor=prefetch,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def _reads_batches(dataset: ImageDataset) -> bool:
    """Whether a file-backed dataset reads whole batches itself (``get_batch``)."""
    return not isinstance(dataset, TensorImageDataset) and callable(getattr(dataset, "get_batch", None))


def _loader_workers(dataset: ImageDataset, num_workers: int | None, prefetch: int) -> int:
    """The worker count to use (``None``: :func:`default_num_workers`); raises
    :class:`DataError` for a negative worker count or a prefetch below 1."""
    if prefetch < 1:
        raise DataError(f"prefetch must be >= 1, got {prefetch}")
    if num_workers is None:
        return default_num_workers(dataset)
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    return num_workers


def iterate_batches(
    dataset: ImageDataset,
    sampler: EpochBatchSampler,
    epoch: int,
    start_batch: int = 0,
    num_workers: int | None = 0,
    prefetch: int = 2,
) -> Iterator[BatchTriple]:
    """Yield the training batches of ``epoch`` for this rank, from batch ``start_batch`` on.

    Exactly one item per sampler batch, in sampler order, so ``start_batch + i`` is the
    batch number of the ``i``-th item (exact resume). A :class:`TensorImageDataset` is
    batched with one tensor index per batch; other datasets are decoded by a DataLoader with
    ``num_workers`` worker processes, each keeping ``prefetch`` batches ready. Samples that
    fail to decode are dropped, so such a batch is smaller, and empty if all of it failed
    (the engine should skip an empty batch but still count it).

    Args:
        dataset: the images; ``len(dataset)`` must equal ``sampler.num_samples``.
        sampler: the per-process batch order.
        epoch: epoch number (selects the permutation).
        start_batch: number of batches of this epoch already done.
        num_workers: decoding processes for file-backed datasets (0 = in this process,
            ``None`` = :func:`default_num_workers`).
        prefetch: batches each worker prepares ahead.

    Yields:
        ``(images uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))``.
    """
    if sampler.num_samples != len(dataset):
        raise DataError(
            f"sampler was built for {sampler.num_samples} samples but the dataset has "
            f"{len(dataset)}; build EpochBatchSampler(len(dataset), ...)"
        )
    num_workers = _loader_workers(dataset, num_workers, prefetch)
    batches = sampler.batches(epoch, start_batch)  # validates start_batch now, not lazily
    if isinstance(dataset, TensorImageDataset):
        return (dataset.get_batch(idx) for idx in batches)
    batch_lists = [idx.tolist() for idx in batches]
    if _reads_batches(dataset):
        return _read_batches(dataset, batch_lists, num_workers, prefetch, sampler.seed + epoch)
    return _loader_batches(dataset, batch_lists, num_workers, prefetch, sampler.seed + epoch, True)


def iterate_eval(
    dataset: ImageDataset, batch_size: int, num_workers: int | None = 0, prefetch: int = 2
) -> Iterator[BatchTriple]:
    """Yield the whole dataset in order, unshuffled, last batch possibly smaller (for
    feature extraction). Samples that fail to decode are dropped; empty batches are skipped.

    Yields:
        ``(images uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))``.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    num_workers = _loader_workers(dataset, num_workers, prefetch)
    n = len(dataset)
    if isinstance(dataset, TensorImageDataset):
        return (dataset.get_batch(torch.arange(start, min(start + batch_size, n))) for start in range(0, n, batch_size))
    batch_lists = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    if _reads_batches(dataset):
        return _read_batches(dataset, batch_lists, num_workers, prefetch, 0)
    return _loader_batches(dataset, batch_lists, num_workers, prefetch, 0, False)
