"""Dataset contract, the in-memory tensor dataset, the splits bundle and shared helpers.

Every dataset yields raw ``uint8`` images ``(C, H, W)``: augmentation happens batched on
the training device (``selfsup.transforms``), so decoding and resizing are the only
per-sample work done here. A dataset built from tensors (digits, Fashion-MNIST, CIFAR, npz)
is a :class:`TensorImageDataset`, whose :meth:`~TensorImageDataset.get_batch` gathers a whole
batch with one tensor index and needs no worker processes.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from selfsup.errors import DataError

#: One sample: ``(image uint8 (C, H, W), label (-1 if unknown), index in the dataset)``.
Sample = tuple[Tensor, int, int]

#: One batch: ``(images uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))``.
BatchTriple = tuple[Tensor, Tensor, Tensor]


class ImageDataset(Dataset, abc.ABC):
    """Abstract image dataset: ``dataset[i] -> (image uint8 (C, H, W), label, i)``.

    A label of ``-1`` means the sample is unlabelled. Datasets that decode files lazily may
    return ``None`` for a sample that cannot be decoded (see ``on_error`` of the image-folder
    dataset); the loaders in :mod:`selfsup.data.loader` drop such samples from the batch.

    Attributes:
        in_channels: number of image channels ``C`` (1 or 3).
        image_size: side of the square images after the dataset's resize.
        num_classes: number of classes, or ``None`` when the dataset is unlabelled.
        labels: int64 ``(N,)`` labels of all samples when known without decoding, else
            ``None``. ``-1`` marks an unlabelled sample inside an otherwise labelled set.
        class_names: names of the classes in label order, when known.
    """

    in_channels: int
    image_size: int
    num_classes: int | None
    labels: Tensor | None
    class_names: list[str] | None = None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index`` as ``(image uint8 (C, H, W), label, index)``, or ``None`` if it
        could not be decoded and the dataset skips bad samples."""

    @abc.abstractmethod
    def subset(self, indices: Sequence[int] | Tensor) -> ImageDataset:
        """A new dataset of the given samples, in the given order (indices are renumbered
        ``0..len(indices)-1``)."""


def _check_labels(labels: Tensor | None, n: int, where: str) -> Tensor | None:
    """Validate a label vector: int64 ``(n,)`` with values ``>= -1``; returns it as int64."""
    if labels is None:
        return None
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.shape != (n,):
        raise DataError(f"{where}: labels have shape {tuple(labels.shape)}, expected ({n},)")
    if n and int(labels.min()) < -1:
        raise DataError(f"{where}: labels must be >= 0 (or -1 for unlabelled)")
    return labels


class TensorImageDataset(ImageDataset):
    """In-memory dataset over a ``uint8`` image tensor ``(N, C, H, W)`` and optional labels.

    Args:
        images: ``(N, C, H, W)`` uint8 images, ``H == W``.
        labels: ``(N,)`` integer labels (``-1`` = unlabelled sample) or ``None``.
        num_classes: number of classes; inferred as ``max(labels) + 1`` when omitted.
        class_names: optional class names in label order.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"TensorImageDataset needs uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[-1] != images.shape[-2]:
            raise DataError(
                f"images are {images.shape[-2]}x{images.shape[-1]}, not square; pass "
                "image_size=... to resize the shorter side and center-crop"
            )
        self.images = images
        self.labels = _check_labels(labels, images.shape[0], "TensorImageDataset")
        if num_classes is None and self.labels is not None and len(self.labels):
            num_classes = int(self.labels.max()) + 1
        self.num_classes = num_classes
        self.class_names = class_names
        self.in_channels = int(images.shape[1])
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index = int(index) % n
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label, index

    def get_batch(self, indices: Tensor) -> BatchTriple:
        """Gather a batch with one tensor index (no per-sample Python work).

        Args:
            indices: ``(B,)`` int64 sample indices.

        Returns:
            ``(images uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))``; labels
            are ``-1`` for an unlabelled dataset.
        """
        indices = indices.to(torch.int64)
        images = self.images[indices]
        if self.labels is None:
            labels = torch.full(indices.shape, -1, dtype=torch.int64)
        else:
            labels = self.labels[indices]
        return images, labels, indices

    def subset(self, indices: Sequence[int] | Tensor) -> TensorImageDataset:
        """A new dataset of the given samples (copies the selected images)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[idx]
        return TensorImageDataset(self.images[idx], labels, self.num_classes, self.class_names)


@dataclass
class DataSplits:
    """The three views of a dataset that pretraining and evaluation need.

    Attributes:
        name: dataset name as registered (e.g. ``"fashion-mnist"``).
        pretrain: images for self-supervised pretraining (the engine hides their labels).
        train: labelled images: the kNN memory / linear-probe training set.
        test: labelled held-out images for evaluation.
        num_classes: number of classes of ``train``/``test``; 0 when there are no labels
            (then kNN and linear evaluation are impossible and ``train``/``test`` are empty).
        in_channels: image channels ``C``.
        image_size: side of the square images.
        mean: per-channel mean of the pretrain images scaled to [0, 1].
        std: per-channel standard deviation of the pretrain images scaled to [0, 1].
    """

    name: str
    pretrain: ImageDataset
    train: ImageDataset
    test: ImageDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split in ("pretrain", "train", "test"):
            ds: ImageDataset = getattr(self, split)
            if ds.in_channels != self.in_channels or ds.image_size != self.image_size:
                raise DataError(
                    f"{self.name}: {split} images are {ds.in_channels}x{ds.image_size}px, "
                    f"expected {self.in_channels}x{self.image_size}px like the other splits"
                )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DataError(f"{self.name}: mean/std must have one value per channel")

    def summary(self) -> str:
        """One line describing the splits, for logs."""
        return (
            f"{self.name}: pretrain={len(self.pretrain)} train={len(self.train)} "
            f"test={len(self.test)} classes={self.num_classes} "
            f"images={self.in_channels}x{self.image_size}x{self.image_size}"
        )


def resize_images(images: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Center-crop uint8 images to a square of their shorter side, then resize it to ``size``.

    Equivalent to "resize the shorter side, then center-crop", except that cropping first
    keeps pixels outside the square from bleeding in through the filter; the image-folder
    dataset does the same with PIL. Bilinear with antialiasing, in chunks to bound the
    kernel's scratch memory.

    Args:
        images: ``(N, C, H, W)`` uint8.
        size: output side.
        chunk: images per interpolation call.

    Returns:
        ``(N, C, size, size)`` uint8.
    """
    if size <= 0:
        raise DataError(f"image_size must be a positive integer, got {size}")
    n, c, h, w = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images.contiguous()
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        # torch resizes uint8 directly (a vectorised kernel, 2-4x faster than via float).
        out[start : start + chunk] = F.interpolate(
            images[start : start + chunk],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return out


def channel_stats(
    dataset: ImageDataset, max_samples: int = 10_000, seed: int = 0, require_readable: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a dataset's images scaled to [0, 1].

    Uses a seeded random sample of at most ``max_samples`` images (all of them when the
    dataset is smaller); samples that fail to decode are ignored. With no readable image it
    returns mean 0 and std 1 (normalisation becomes the identity), or, with
    ``require_readable``, raises :class:`DataError` (a data set nothing can be learnt from).

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats.
    """
    n = len(dataset)
    c = dataset.in_channels
    if n == 0:
        return (0.0,) * c, (1.0,) * c
    if n > max_samples:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:max_samples].sort().values
    else:
        idx = torch.arange(n)
    # A per-channel histogram of the byte values gives both moments exactly and is the
    # fastest reduction over uint8 (no widening copy of the images).
    hist = torch.zeros((c, 256), dtype=torch.int64)
    if isinstance(dataset, TensorImageDataset):
        for start in range(0, len(idx), 1024):
            x = dataset.images[idx[start : start + 1024]]
            for ch in range(c):
                hist[ch] += torch.bincount(x[:, ch].reshape(-1), minlength=256)
    else:
        for i in idx.tolist():
            sample = dataset[i]
            if sample is None:
                continue
            for ch in range(c):
                hist[ch] += torch.bincount(sample[0][ch].reshape(-1), minlength=256)
    count = int(hist[0].sum())
    if count == 0:
        if require_readable and len(idx):
            path = getattr(dataset, "path", None)
            first = f" (first: {path(int(idx[0]))!r})" if callable(path) else ""
            which = f"the {n}" if len(idx) == n else f"{len(idx)} sampled of the {n}"
            raise DataError(
                f"none of {which} images could be decoded{first}; nothing to train on "
                "(check the files, e.g. with PIL, or point data.root at readable images)"
            )
        return (0.0,) * c, (1.0,) * c
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = hist.to(torch.float64) @ values / count
    var = (hist.to(torch.float64) @ values.square() / count - mean.square()).clamp_(min=0.0)
    # A constant channel would give std 0 and divide-by-zero in normalisation.
    std = var.sqrt().clamp_(min=1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def stratified_split(labels: Tensor, test_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split sample indices into train/test with the same class proportions.

    The test set has ``ceil(N * test_fraction)`` samples (as scikit-learn's
    ``train_test_split``), shared among classes in proportion to their sizes (largest
    remainders get the leftover samples) and chosen within a class by ``generator``. A class
    keeps at least one training sample, so a single-sample class stays in train.

    Args:
        labels: ``(N,)`` int64 labels ``>= 0``.
        test_fraction: fraction of each class held out, in ``(0, 1)``.
        generator: seeded generator for the per-class shuffles.

    Returns:
        ``(train_indices, test_indices)``, each sorted int64.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes, counts = torch.unique(labels, return_counts=True)
    n_total = int(counts.sum())
    # The epsilon keeps float noise (10 * 0.3 = 3.0000000000000004) from adding a sample.
    n_test_total = math.ceil(n_total * test_fraction - 1e-9)
    quota = counts.to(torch.float64) * n_test_total / max(1, n_total)
    n_test = quota.floor().to(torch.int64)
    leftover = round(float(quota.sum()) - int(n_test.sum()))
    # Stable sort: ties between equal remainders go to the lower class index, deterministically.
    order = torch.sort(quota - n_test, descending=True, stable=True).indices
    n_test[order[:leftover]] += 1
    n_test = torch.minimum(n_test, counts - 1)
    train_parts, test_parts = [], []
    for cls, k in zip(classes.tolist(), n_test.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    train = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.long)
    test = torch.cat(test_parts).sort().values if test_parts else torch.empty(0, dtype=torch.long)
    return train, test


def limit_indices(n: int, limit: int | None, seed: int) -> Tensor | None:
    """Indices of a seeded random subset of ``limit`` out of ``n`` samples, sorted, or
    ``None`` when no capping is needed.

    A random subset rather than the first ``limit``: class-sorted sources (image folders)
    would otherwise keep only the first classes.
    """
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values


def check_positive(name: str, value: int | None) -> None:
    """Raise :class:`DataError` unless ``value`` is ``None`` or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise DataError(f"{name} must be a positive integer or None, got {value!r}")
