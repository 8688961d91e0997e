"""Packed data sets: images decoded once into uint8 ``.npy`` shards, read by memory mapping.

Decoding JPEGs is the cost of an image-folder epoch; a packed copy pays it once
(``selfsup data pack SOURCE OUT``) and every later epoch reads raw bytes. ``OUT`` holds:

* ``<group>-<k>-images.npy``: uint8 ``(n_k, C, S, S)``, at most ``shard_size`` images each;
* ``<group>-<k>-labels.npy``: int64 ``(n_k,)`` (``-1`` = unlabelled);
* ``manifest.json`` (written last: a folder without it is an unfinished pack): image size,
  channels, class names, the pretrain split's exact per-channel mean/std, and per shard its
  count and the CRC-32 of its bytes (``selfsup data verify OUT`` checks them).

A group is one distinct split of the source: a labelled image folder has ``train`` (also the
pretraining split) and ``test``; the manifest maps ``pretrain``/``train``/``test`` to groups.
The registered data set ``packed`` (``data.name: packed``, ``data.root: OUT``) opens the
shards with ``np.load(mmap_mode="r")``: nothing is read until a batch asks for it, so the
pack may be far larger than memory. Its :meth:`PackedDataset.get_batch` reads a whole batch
with one sorted gather per shard; :func:`selfsup.data.loader.iterate_batches` runs those
reads in DataLoader workers, each batch in exactly one worker, on each process its own
batches (the sampler's rank slice), so every image is read once per epoch; the order is
``EpochBatchSampler``'s, a function of ``(seed, epoch)``, and resumes mid-epoch.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfsup.config import check_options
from selfsup.data.base import (
    BatchTriple,
    DataError,
    DataSplits,
    ImageDataset,
    Sample,
    channel_stats,
    check_positive,
    limit_indices,
)
from selfsup.data.datasets import build_image_folder
from selfsup.data.loader import iterate_eval
from selfsup.errors import ConfigError
from selfsup.registry import DATASETS, RegistryError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "selfsup-packed"
VERSION = 1
SPLITS = ("pretrain", "train", "test")


# ------------------------------------------------------------------------------ reading
@dataclass
class _Shard:
    images: str  # file names, relative to the pack's folder
    labels: str
    count: int
    crc32: int


class _Group:
    """The shards of one group: labels in memory, images memory-mapped on first use.

    The memory maps are not pickled (a DataLoader started with ``spawn`` would copy the
    whole array): each process maps the files itself.
    """

    def __init__(self, root: Path, name: str, shards: list[_Shard], shape: tuple[int, int, int]) -> None:
        self.root, self.name, self.shards, self.shape = root, name, shards, shape
        counts = np.array([s.count for s in shards], dtype=np.int64)
        #: ``offsets[k]`` is the first row of shard ``k``.
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.count = int(counts.sum())
        self._maps: list[np.ndarray] | None = None
        labels = [self._load(s.labels, (s.count,), np.int64) for s in shards]
        self.labels = torch.from_numpy(np.concatenate(labels) if labels else np.empty(0, np.int64))

    def _load(self, file: str, shape: tuple[int, ...], dtype: type, mmap: bool = False) -> np.ndarray:
        """One shard file, checked against the manifest's shape and dtype."""
        path = self.root / file
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path} is missing (an unfinished or damaged pack; pack it again)") from None
        except (OSError, ValueError) as err:  # a truncated file, a foreign header
            raise DataError(f"{path} is not a readable .npy shard ({err}); pack it again") from None
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise DataError(
                f"{path} holds {array.dtype} {tuple(array.shape)}, but {MANIFEST} says {np.dtype(dtype)} "
                f"{shape} (shards of another pack, or a damaged one; pack it again)"
            )
        return array

    def maps(self) -> list[np.ndarray]:
        """The image shards as read-only memory maps ``(n_k, C, S, S)``."""
        if self._maps is None:
            self._maps = [self._load(s.images, (s.count, *self.shape), np.uint8, mmap=True) for s in self.shards]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


class PackedDataset(ImageDataset):
    """The images of one group of a pack (or a subset of them), memory-mapped.

    Args:
        group: the shards.
        rows: the group's rows this dataset shows, in order (``None`` = all of them).
        num_classes: number of classes (``None`` when unlabelled).
        class_names: class names in label order.
    """

    def __init__(
        self,
        group: _Group,
        rows: np.ndarray | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.group = group
        self.rows = rows
        self.in_channels, self.image_size = group.shape[0], group.shape[1]
        labels = group.labels if rows is None else group.labels[torch.from_numpy(rows)]
        self.labels = None if num_classes is None else labels
        self._labels = labels
        self.num_classes = num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return self.group.count if self.rows is None else len(self.rows)

    def get_batch(self, indices: Tensor) -> BatchTriple:
        """Read a batch: one gather per shard it touches, in ascending row order.

        Args:
            indices: ``(B,)`` int64 sample indices.

        Returns:
            ``(images uint8 (B, C, S, S), labels int64 (B,), indices int64 (B,))``.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64)
        idx = indices.numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices outside 0..{len(self) - 1}")
        rows = idx if self.rows is None else self.rows[idx]
        offsets = self.group.offsets
        shard = np.searchsorted(offsets, rows, side="right") - 1
        local = rows - offsets[shard]
        out = np.empty((len(rows), *self.group.shape), dtype=np.uint8)
        maps = self.group.maps()
        for k in np.unique(shard).tolist():
            where = np.flatnonzero(shard == k)
            order = np.argsort(local[where], kind="stable")  # ascending: read-ahead helps
            out[where[order]] = maps[k][local[where[order]]]
        return torch.from_numpy(out), self._labels[indices], indices

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index = int(index) % n
        images, labels, _ = self.get_batch(torch.tensor([index]))
        return images[0], int(labels[0]), index

    def subset(self, indices: Sequence[int] | Tensor) -> PackedDataset:
        """A new dataset of the given samples (indices renumbered from 0; no data copied)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy()
        rows = idx if self.rows is None else self.rows[idx]
        return PackedDataset(self.group, rows, self.num_classes, self.class_names)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The checked manifest of the pack in ``root``.

    Raises:
        DataError: no folder, no manifest, or a manifest that is not valid JSON or lacks keys.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"root={str(root)!r} does not exist or is not a directory")
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(
            f"root={str(root)!r} has no {MANIFEST}: not a packed data set, or an unfinished pack "
            f"(pack one with `selfsup data pack SOURCE {root}`)"
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')!r}, this selfsup reads {VERSION}")
        for key in ("channels", "image_size", "num_classes", "mean", "std", "splits", "groups"):
            if key not in manifest:
                raise ValueError(f"no {key!r}")
        for split in SPLITS:
            if manifest["splits"].get(split) not in manifest["groups"]:
                raise ValueError(f"split {split!r} names no group")
    except (ValueError, AttributeError, TypeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a valid pack manifest ({detail}); pack the data set again") from None
    return manifest


def _groups(root: Path, manifest: Mapping[str, Any]) -> dict[str, _Group]:
    shape = (int(manifest["channels"]), int(manifest["image_size"]), int(manifest["image_size"]))
    groups = {}
    for name, info in manifest["groups"].items():
        try:
            shards = [_Shard(s["images"], s["labels"], int(s["count"]), int(s["crc32"])) for s in info["shards"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{root / MANIFEST} is not a valid pack manifest (group {name!r}: {err}); pack the data set again"
            ) from None
        groups[name] = _Group(root, name, shards, shape)
    return groups


@DATASETS.register("packed")
def build_packed(root: str, limit: int | None = None, seed: int = 0, verify: bool = False) -> DataSplits:
    """A data set packed by ``selfsup data pack`` (memory-mapped uint8 shards).

    Args:
        root: the pack's folder (holding ``manifest.json``).
        limit: cap on the samples of each split (seeded random subset).
        seed: seed of the ``limit`` subset.
        verify: check every shard's CRC-32 first (reads the whole pack once).
    """
    check_positive("limit", limit)
    folder = Path(root)
    manifest = read_manifest(folder)
    if verify:
        verify_pack(folder)
    groups = _groups(folder, manifest)
    for group in groups.values():
        group.maps()  # every shard's header checked now (a worker's error would come later)
    num_classes = int(manifest["num_classes"])
    names = manifest.get("class_names")
    # One dataset per group (pretrain is train when the source's were the same object), each
    # capped by ``limit`` once, as the other builders do.
    by_group: dict[str, PackedDataset] = {}
    for group in groups.values():
        labelled = num_classes > 0 and bool((group.labels >= 0).any())
        ds = PackedDataset(group, None, num_classes if labelled else None, names if labelled else None)
        idx = limit_indices(len(ds), limit, seed)
        by_group[group.name] = ds if idx is None else ds.subset(idx)
    pretrain, train, test = (by_group[manifest["splits"][split]] for split in SPLITS)
    if len(pretrain) == 0:
        raise DataError(f"root={root!r}: the pack's pretraining split is empty; pack a data set with images")
    if len(pretrain) == len(pretrain.group.labels):
        mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
    else:  # a limit's subset
        mean, std = channel_stats(pretrain, seed=seed)
    return DataSplits(
        name="packed",
        pretrain=pretrain,
        train=train,
        test=test,
        num_classes=num_classes,
        in_channels=pretrain.in_channels,
        image_size=pretrain.image_size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def verify_pack(root: str | Path) -> int:
    """Recompute every shard's CRC-32 and compare it with the manifest's; returns the number
    of images checked.

    Raises:
        DataError: a shard whose bytes differ (named, with the fix).
    """
    folder = Path(root)
    manifest = read_manifest(folder)
    total = 0
    for group in _groups(folder, manifest).values():
        for shard, images in zip(group.shards, group.maps()):
            crc = zlib.crc32(np.load(folder / shard.labels).tobytes(), _crc_images(images, 0))
            if crc != shard.crc32:
                raise DataError(
                    f"{folder / shard.images}: checksum differs from {MANIFEST} (a damaged or replaced shard); "
                    "pack the data set again"
                )
            total += shard.count
    return total


def _crc_images(images: np.ndarray, crc: int, chunk: int = 1024) -> int:
    """CRC-32 of ``images``' bytes continued from ``crc``, in chunks (a memory map stays lazy)."""
    for start in range(0, len(images), chunk):
        crc = zlib.crc32(np.ascontiguousarray(images[start : start + chunk]).tobytes(), crc)
    return crc


# ------------------------------------------------------------------------------ writing
class _ShardWriter:
    """Appends decoded batches to the shards of one group, ``shard_size`` images a file."""

    def __init__(self, folder: Path, group: str, planned: int, shard_size: int, shape: tuple[int, int, int]) -> None:
        self.folder, self.group, self.planned, self.shard_size, self.shape = folder, group, planned, shard_size, shape
        self.shards: list[dict[str, Any]] = []
        self.written = 0
        self._open: np.memmap | None = None
        self._fill = 0
        self._labels: list[np.ndarray] = []
        self._crc = 0

    def _name(self, what: str) -> str:
        return f"{self.group}-{len(self.shards):05d}-{what}.npy"

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append uint8 ``(B, C, S, S)`` images and their int64 ``(B,)`` labels."""
        start = 0
        while start < len(images):
            if self._open is None:
                # Planned from the source's size; images that fail to decode only make the
                # last shard shorter (it is cut to size in close()).
                rows = max(1, min(self.shard_size, self.planned - self.written))
                self._open = np.lib.format.open_memmap(
                    self.folder / self._name("images"), mode="w+", dtype=np.uint8, shape=(rows, *self.shape)
                )
                self._fill, self._labels, self._crc = 0, [], 0
            take = min(len(images) - start, len(self._open) - self._fill)
            chunk = np.ascontiguousarray(images[start : start + take])
            self._open[self._fill : self._fill + take] = chunk
            self._crc = zlib.crc32(chunk.tobytes(), self._crc)
            self._labels.append(labels[start : start + take].astype(np.int64))
            self._fill += take
            self.written += take
            start += take
            if self._fill == len(self._open):
                self._finish()

    def _finish(self) -> None:
        assert self._open is not None
        images_file, labels_file = self._name("images"), self._name("labels")
        array = self._open
        if self._fill < len(array):  # fewer images than planned: rewrite the shard at its size
            cut = np.lib.format.open_memmap(
                self.folder / f"{images_file}.tmp", mode="w+", dtype=np.uint8, shape=(self._fill, *self.shape)
            )
            cut[:] = array[: self._fill]
            cut.flush()
            del cut
            os.replace(self.folder / f"{images_file}.tmp", self.folder / images_file)
        else:
            array.flush()
        self._open = None
        del array
        labels = np.concatenate(self._labels) if self._labels else np.empty(0, np.int64)
        np.save(self.folder / labels_file, labels)
        crc = zlib.crc32(labels.tobytes(), self._crc)  # the images' bytes, then the labels'
        self.shards.append({"images": images_file, "labels": labels_file, "count": self._fill, "crc32": crc})

    def close(self) -> dict[str, Any]:
        """Finish the last shard; the group's manifest entry."""
        if self._open is not None:
            self._finish()
        return {"count": self.written, "shards": self.shards}


def source_splits(source: str, options: Mapping[str, Any] | None = None, image_size: int | None = None) -> DataSplits:
    """The splits to pack: a folder of images (the ``image-folder`` data set, ``image_size``
    default 64) or a registered data set name; ``options`` go to the data set's builder."""
    kwargs = dict(options or {})
    if image_size is not None:
        kwargs["image_size"] = image_size
    if Path(source).is_dir():
        factory = build_image_folder
        kwargs["root"] = source
    else:
        try:
            factory = DATASETS.get(source)
        except RegistryError:
            raise ConfigError(
                f"{source!r} is neither a folder nor a registered data set ({', '.join(DATASETS.names())})"
            ) from None
    return factory(**check_options(factory, kwargs, "data", error=DataError, require=True))


def pack(
    splits: DataSplits,
    out: str | Path,
    shard_size: int = 50_000,
    batch_size: int = 256,
    num_workers: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Decode ``splits`` once into uint8 shards under ``out`` (see the module docstring).

    Args:
        splits: the data set (each distinct split object is packed once).
        out: output folder; must not exist or be empty.
        shard_size: images per shard file.
        batch_size: images decoded per batch.
        num_workers: decoding processes (``None``: from the cores).
        source: description recorded in the manifest.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    check_positive("shard_size", shard_size)
    check_positive("batch_size", batch_size)
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(
            f"OUT={str(out)!r} exists and is not an empty folder (an earlier or unfinished pack?); "
            "delete it or choose a new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    shape = (splits.in_channels, splits.image_size, splits.image_size)
    group_of: dict[int, str] = {}
    mapping: dict[str, str] = {}
    groups: dict[str, Any] = {}
    hist = np.zeros((shape[0], 256), dtype=np.int64)
    skipped = 0
    for split in SPLITS:
        ds: ImageDataset = getattr(splits, split)
        if id(ds) not in group_of:
            group_of[id(ds)] = split
            writer = _ShardWriter(folder, split, len(ds), shard_size, shape)
            for images, labels, _ in iterate_eval(ds, batch_size, num_workers):
                array = images.numpy()
                writer.add(array, labels.numpy())
                if split == "pretrain":  # exact statistics of the pretraining images
                    for c in range(shape[0]):
                        hist[c] += np.bincount(array[:, c].reshape(-1), minlength=256)
            groups[split] = writer.close()
            skipped += len(ds) - writer.written
        mapping[split] = group_of[id(ds)]
    count = hist[0].sum()
    if count == 0:
        raise DataError("the pretraining split has no readable image; nothing to pack")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = hist @ values / count
    std = np.sqrt(np.clip(hist @ values**2 / count - mean**2, 0.0, None)).clip(min=1e-6)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": source or splits.name,
        "dataset": splits.name,
        "channels": shape[0],
        "image_size": shape[1],
        "num_classes": splits.num_classes,
        "class_names": splits.train.class_names or splits.pretrain.class_names,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "shard_size": shard_size,
        "skipped": skipped,
        "splits": mapping,
        "groups": groups,
    }
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)  # last: a pack with a manifest is complete
    return manifest
