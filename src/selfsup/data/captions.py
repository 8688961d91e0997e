"""Image-text data: captions per image, sampled per epoch, from the formats users have.

A data set carries text when it has a ``captions`` attribute: one caption per image (a
``str``) or several (a ``list[str]``). :func:`caption_lists` reads it as several per image;
:func:`sample_captions` picks one caption of each image of a batch, a pure function of
``(seed, epoch, index)``, so every epoch sees another caption of an image with several, the
same on every process and after a resume.

Sources:

* ``scenes`` (generated): each scene's description in three phrasings ("a small red circle",
  "a picture of a small red circle", "an image of a small red circle"); ``hold_out`` keeps
  attribute combinations out of every training image and caption (see
  :mod:`selfsup.data.scenes`) and :func:`held_out_samples` marks the test images whose
  labelled object has one, for the compositional test.
* ``captions`` (registered here): a folder of images with a caption file, JSONL
  (``{"path": ..., "caption": ...}`` per line, or ``"captions": [...]``), CSV (header
  ``path,caption``) or COCO captions JSON (``images[].file_name``, ``annotations[].caption``,
  read with the standard library: pycocotools is not needed). Several rows per image give
  several captions; an optional ``label`` field gives the classes for zero-shot top-1.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), arXiv:2103.00020; Chen et al. 2015, "Microsoft COCO Captions"
(arXiv:1504.00325) for the captions JSON format.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.data.base import DataError, DataSplits, ImageDataset, check_positive, stratified_split
from selfsup.data.datasets import ImageFolderDataset, _finish
from selfsup.data.scenes import _M32, ScenesDataset, _held_out, _mix32, largest_object, parse_hold_out
from selfsup.registry import DATASETS

logger = logging.getLogger(__name__)

#: Phrasings of a scene's description: several captions per image, sampled per epoch.
SCENE_PHRASINGS = ("{}", "a picture of {}", "an image of {}")
#: Zero-shot prompt templates for the ``scenes`` class names ("red circle", "circle", "red"):
#: the sizes and textures of the captions, ensembled (CLIP sec. 3.1.4).
SCENE_TEMPLATES = (
    "a small {}",
    "a large {}",
    "a small striped {}",
    "a large striped {}",
    "a small checkered {}",
    "a large checkered {}",
)
#: Generic templates (a few of CLIP's ImageNet prompts).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def has_captions(dataset: ImageDataset) -> bool:
    """Whether ``dataset`` carries text (without building generated captions)."""
    return isinstance(getattr(type(dataset), "captions", None), (property, cached_property)) or (
        "captions" in vars(dataset)
    )


def caption_lists(dataset: ImageDataset) -> list[list[str]]:
    """The captions of every image, several per image where the source has several."""
    if not has_captions(dataset):
        raise DataError(f"{type(dataset).__name__} has no captions; use an image-text data set (scenes, captions)")
    captions: Sequence[Any] = dataset.captions  # type: ignore[attr-defined]
    if isinstance(dataset, ScenesDataset):
        return [[p.format(c) for p in SCENE_PHRASINGS] for c in captions]
    return [[c] if isinstance(c, str) else list(c) for c in captions]


def training_captions(dataset: ImageDataset) -> list[str]:
    """Every caption of ``dataset`` in image order (what the tokenizer is trained on)."""
    return [c for captions in caption_lists(dataset) for c in captions]


def sample_captions(lists: Sequence[Sequence[str]], indices: Tensor, epoch: int, seed: int) -> list[str]:
    """One caption of each image ``indices`` ``(B,)``: caption ``h(seed, epoch, i) mod n_i`` of
    image ``i``, an integer hash, so the choice depends on nothing else."""
    idx = indices.to(torch.int64).cpu()
    counts = torch.tensor([len(lists[i]) for i in idx.tolist()], dtype=torch.int64)
    key = _mix32(torch.tensor((seed * 0x9E3779B9 + epoch * 0x85EBCA6B) & _M32, dtype=torch.int64))
    pick = (_mix32((idx & _M32) ^ key) % counts.clamp_min(1)).tolist()
    return [lists[i][j] for i, j in zip(idx.tolist(), pick)]


def held_out_samples(dataset: ImageDataset, hold_out: Sequence[str] | None) -> Tensor | None:
    """``(N,)`` bool: which images' labelled object (a scene's largest) has a held-out
    attribute combination; ``None`` when the data set has no per-object attributes or
    nothing is held out."""
    if not hold_out or not isinstance(dataset, ScenesDataset):
        return None
    objects, positions = dataset.objects, dataset.positions
    big = largest_object(objects, positions)
    attrs = objects[torch.arange(len(objects)), big, :4]
    return _held_out(attrs, parse_hold_out(hold_out))


def prompt_templates(data_name: str) -> tuple[str, ...]:
    """Zero-shot prompt templates (``{}`` = class name) for the data set ``data_name``."""
    return SCENE_TEMPLATES if data_name == "scenes" else DEFAULT_TEMPLATES


# --------------------------------------------------------------------- caption files


def _rows(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, record)`` of a JSONL or CSV caption file, or the image-caption pairs of a COCO
    captions JSON (line 0)."""
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"caption file {file} must end in .jsonl, .csv or .json (COCO captions)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read caption file {file}: {err}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
            raise DataError(
                f"{file}: a caption CSV needs a header with the columns path,caption (got {reader.fieldnames})"
            )
        return [(n + 2, dict(row)) for n, row in enumerate(reader)]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file} line {n} is not JSON: {err.msg}") from None
            if not isinstance(record, dict) or "path" not in record:
                raise DataError(f'{file} line {n}: expected {{"path": ..., "caption": ...}}, got {line.strip()[:80]!r}')
            out.append((n, record))
        return out
    # COCO captions JSON
    try:
        coco = json.loads(text)
        names = {img["id"]: img["file_name"] for img in coco["images"]}
        return [(0, {"path": names[a["image_id"]], "caption": a["caption"]}) for a in coco["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"{file} is not a COCO captions JSON (images[].id/file_name, annotations[].image_id/caption): "
            f"{type(err).__name__} {err}"
        ) from None


def read_caption_file(
    file: str | Path, images: str | Path | None = None
) -> tuple[list[str], list[list[str]], list[str | None]]:
    """Parse a caption file into ``(image paths, captions per image, label per image)``.

    Image paths are relative to ``images`` (default: the file's folder); rows naming the same
    image add captions to it. Raises a one-line :class:`DataError` for missing images, empty
    captions or conflicting labels.
    """
    file = Path(file)
    if not file.is_file():
        raise DataError(f"caption file {str(file)!r} does not exist")
    base = Path(images) if images is not None else file.parent
    order: dict[str, int] = {}
    captions: list[list[str]] = []
    labels: list[str | None] = []
    for line, record in _rows(file):
        where = f"{file} line {line}" if line else str(file)
        texts = record.get("captions", record.get("caption"))
        texts = [texts] if isinstance(texts, str) or texts is None else list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise DataError(f"{where}: empty caption for {record.get('path')!r} (every image needs non-empty text)")
        path = str(base / str(record["path"]))
        label = record.get("label")
        label = None if label in (None, "") else str(label)
        if path not in order:
            order[path] = len(captions)
            captions.append([])
            labels.append(label)
        i = order[path]
        if label is not None and labels[i] not in (None, label):
            raise DataError(f"{where}: {record['path']!r} has labels {labels[i]!r} and {label!r}; give one per image")
        labels[i] = labels[i] or label
        captions[i] += [t.strip() for t in texts]
    if not captions:
        raise DataError(f"caption file {file} holds no captions")
    missing = [p for p in order if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"{file}: {len(missing)} of {len(order)} images do not exist (first: {missing[0]!r}); "
            f"paths are relative to images={str(base)!r}"
        )
    return list(order), captions, labels


class CaptionFolderDataset(ImageFolderDataset):
    """Images decoded from files (:class:`~selfsup.data.datasets.ImageFolderDataset`) with
    their captions: ``captions[i]`` lists the captions of image ``i``."""

    def __init__(self, captions: Sequence[Sequence[str]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(captions) != len(self):
            raise DataError(f"{len(captions)} caption lists for {len(self)} images")
        self.captions = [list(c) for c in captions]

    def subset(self, indices: Sequence[int] | Tensor) -> CaptionFolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[idx]
        return CaptionFolderDataset(
            [self.captions[i] for i in idx.tolist()],
            self._paths[idx.numpy()].tolist(),
            labels,
            self.image_size,
            self.mode,
            self.on_error,
            self.num_classes,
            self.class_names,
        )


@DATASETS.register("captions")
def build_captions(
    file: str,
    images: str | None = None,
    test_file: str | None = None,
    test_images: str | None = None,
    image_size: int = 64,
    mode: str = "RGB",
    on_error: str = "skip",
    test_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    stats_samples: int = 10_000,
) -> DataSplits:
    """Image-caption pairs from a caption file (JSONL, CSV or COCO captions JSON).

    ``pretrain`` and ``train`` are the training images, ``test`` the images of ``test_file``
    or, without it, a seeded ``test_fraction`` of the images (stratified by label when every
    image has one). With a ``label`` per image the splits are labelled (classes: the sorted
    label names) for zero-shot top-1; otherwise only retrieval applies.

    Args:
        file: the caption file; its ``path`` fields are relative to ``images``.
        images: folder of the images (default: the caption file's folder).
        test_file: a separate caption file for the test split (paths relative to
            ``test_images``, default its folder).
        test_images: folder of the test images.
        image_size: side of the images (shorter side resized, centre square cropped).
        mode: ``"RGB"`` or ``"L"``.
        on_error: ``"skip"`` or ``"raise"`` for images that fail to decode.
        test_fraction: fraction of the images held out for test without ``test_file``.
        seed: seed of the split and of ``limit``.
        limit: cap on the images of each split (seeded random subset).
        stats_samples: images decoded to estimate the mean/std.
    """
    check_positive("image_size", image_size)
    check_positive("limit", limit)
    paths, captions, names = read_caption_file(file, images)
    if test_file is not None:
        test_paths, test_captions, test_names = read_caption_file(test_file, test_images)
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction={test_fraction} must be in (0, 1) (or pass test_file=...)")
        test_paths, test_captions, test_names = [], [], []
    all_names = names + test_names
    labelled = all(n is not None for n in all_names)
    classes = sorted({str(n) for n in all_names}) if labelled else None
    index = {c: i for i, c in enumerate(classes or [])}

    def make(ps: list[str], caps: list[list[str]], ns: list[str | None]) -> CaptionFolderDataset:
        labels = torch.tensor([index[str(n)] for n in ns], dtype=torch.int64) if classes else None
        num = len(classes) if classes else None
        return CaptionFolderDataset(caps, ps, labels, image_size, mode, on_error, num, classes)

    full = make(paths, captions, names)
    if test_file is not None:
        train, test = full, make(test_paths, test_captions, test_names)
    else:
        gen = torch.Generator().manual_seed(seed)
        if full.labels is not None:
            train_idx, test_idx = stratified_split(full.labels, test_fraction, gen)
        else:
            perm = torch.randperm(len(full), generator=gen)
            cut = max(1, round(len(full) * test_fraction))
            test_idx, train_idx = perm[:cut].sort().values, perm[cut:].sort().values
        if len(train_idx) == 0:
            raise DataError(f"{file}: too few images ({len(full)}) to hold out a test split")
        train, test = full.subset(train_idx), full.subset(test_idx)
    return _finish("captions", train, train, test, len(classes or []), limit, seed, stats_samples)
