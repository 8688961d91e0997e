"""Features of every image of a folder or a registered data set (``selfsup embed``).

The encoder and its preprocessing come from :func:`selfsup.engine.export.load_encoder` (the
run's eval view: resize, centre-crop, normalise). Work is cut into chunks of consecutive
samples, each written to ``OUT/chunks/`` (via a temporary file and a rename) as soon as it
is done; a re-run skips the chunks already there, so an interrupted job resumes where it
stopped. When every chunk exists they are joined into ``OUT/features.npy`` (float32
``(N, D)``) and ``OUT/paths.txt`` (a folder: one image path per row) or ``OUT/indices.txt``
(a data set: the sample index in its split per row), plus ``OUT/labels.npy`` when known.
Images that cannot be decoded are skipped and listed in ``OUT/skipped.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.config import ConfigError
from selfsup.data import DataError, ImageDataset
from selfsup.data.datasets import ImageFolderDataset, scan_image_folder
from selfsup.data.loader import iterate_eval
from selfsup.engine.export import Encoder, load_encoder

__all__ = ["EmbedResult", "embed", "embedding_source"]

_SPLITS = ("train", "test", "pretrain")


@dataclass
class EmbedResult:
    """What :func:`embed` wrote: ``features`` (the ``.npy`` file), its row count, the
    feature width, and how many chunks were computed now (the rest were resumed)."""

    features: Path
    rows: int
    dim: int
    computed_chunks: int
    resumed_chunks: int


def embedding_source(
    source: str | Path, encoder: Encoder, split: str = "train", options: Mapping[str, Any] | None = None
) -> tuple[ImageDataset, list[str] | None, str]:
    """``(dataset, paths or None, description)`` for a folder of images (labelled by class
    sub-folders or not, resized to the encoder's size and channel count) or a registered
    data set name (``options`` go to its builder; ``split`` picks train, test or pretrain)."""
    path = Path(source)
    if path.is_dir():
        if options:
            raise ConfigError(f"data set options {dict(options)} apply to a registered data set, not a folder")
        paths, labels, classes = scan_image_folder(path, "FOLDER")
        mode = "L" if encoder.in_channels == 1 else "RGB"
        label_t = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        dataset = ImageFolderDataset(
            paths, label_t, encoder.image_size, mode, "skip", len(classes or []) or None, classes
        )
        return dataset, list(paths), f"{len(paths)} images under {path}"
    from selfsup.registry import DATASETS, RegistryError

    try:
        factory = DATASETS.get(str(source))
    except RegistryError:
        raise ConfigError(
            f"{str(source)!r} is neither a folder nor a registered data set ({', '.join(DATASETS.names())})"
        ) from None
    if split not in _SPLITS:
        raise ConfigError(f"--split {split!r} is not one of {', '.join(_SPLITS)}")
    import inspect

    kwargs = dict(options or {})
    if "image_size" in inspect.signature(factory).parameters and "image_size" not in kwargs:
        kwargs["image_size"] = encoder.image_size
    from selfsup.config import check_options

    splits = factory(**check_options(factory, kwargs, "data", require=True))
    dataset = getattr(splits, split)
    if dataset.in_channels != encoder.in_channels:
        raise DataError(
            f"{source} has {dataset.in_channels}-channel images; the encoder takes {encoder.in_channels} channel(s)"
        )
    return dataset, None, f"{len(dataset)} {split} images of {source}"


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def embed(
    run: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    chunk_size: int = 4096,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    encoder: Encoder | None = None,
) -> EmbedResult:
    """Writes the features of every image of ``source`` under ``out`` (see the module doc).

    Args:
        run: the run folder or encoder file (:func:`load_encoder`).
        source: a folder of images or a registered data set name.
        out: the output folder (created); a re-run with the same arguments resumes.
        split: for a data set: which split (train, test or pretrain).
        options: for a data set: its builder's options (e.g. ``root``).
        batch_size: images per forward pass.
        chunk_size: images per resumable chunk file.
        num_workers: decoding processes for image folders.
        device: where the encoder runs.
        progress: show a progress bar.
        encoder: an already loaded encoder (else loaded from ``run``).
    """
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"--batch-size and --chunk-size must be >= 1, got {batch_size} and {chunk_size}")
    device = torch.device(device)
    encoder = encoder if encoder is not None else load_encoder(run, device=device)
    encoder = encoder.to(device).eval()
    dataset, paths, what = embedding_source(source, encoder, split, options)
    n = len(dataset)
    if n == 0:
        raise DataError(f"no images to embed in {source}")
    out = Path(out)
    chunks_dir = out / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run": str(Path(run).resolve()) if isinstance(run, (str, Path)) else str(run),
        "source": str(Path(source).resolve()) if Path(source).is_dir() else str(source),
        "split": None if paths is not None else split,
        "options": dict(options or {}),
        "num_images": n,
        "chunk_size": chunk_size,
    }
    manifest_file = out / "embed.json"
    if manifest_file.is_file():
        saved = json.loads(manifest_file.read_text())
        if saved != manifest:
            changed = sorted(k for k in manifest if saved.get(k) != manifest[k])
            raise ConfigError(
                f"{out} holds the chunks of another embedding ({', '.join(changed)} differ); use another -o "
                "folder or delete it"
            )
    else:
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")

    from tqdm.auto import tqdm

    starts = list(range(0, n, chunk_size))
    done = {s for s in starts if (chunks_dir / f"{s // chunk_size:06d}.npz").is_file()}
    bar = tqdm(total=n, desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    bar.update(sum(min(chunk_size, n - s) for s in done))
    if done:
        bar.write(f"resuming: {len(done)} of {len(starts)} chunk(s) already in {chunks_dir}")
    computed = 0
    with torch.no_grad():
        for start in starts:
            if start in done:
                continue
            stop = min(start + chunk_size, n)
            part = dataset.subset(list(range(start, stop)))
            feats: list[torch.Tensor] = []
            rows: list[torch.Tensor] = []
            chunk_labels: list[torch.Tensor] = []
            for images, batch_labels, indices in iterate_eval(part, batch_size, num_workers):
                feats.append(encoder(encoder.preprocess(images)).float().cpu())
                rows.append(indices + start)
                chunk_labels.append(batch_labels)
                bar.update(len(indices))
            bar.update(stop - start - sum(len(r) for r in rows))  # skipped images
            dim = encoder.num_features
            _save_atomic(
                chunks_dir / f"{start // chunk_size:06d}.npz",
                features=torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32),
                indices=torch.cat(rows).numpy() if rows else np.zeros(0, np.int64),
                labels=torch.cat(chunk_labels).numpy() if chunk_labels else np.zeros(0, np.int64),
            )
            computed += 1
    bar.close()

    parts = [np.load(chunks_dir / f"{s // chunk_size:06d}.npz") for s in starts]
    features = np.concatenate([p["features"] for p in parts]).astype(np.float32)
    order = np.concatenate([p["indices"] for p in parts]).astype(np.int64)
    labels = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    np.save(out / "features.npy", features)
    if paths is not None:
        (out / "paths.txt").write_text("".join(paths[i] + "\n" for i in order.tolist()))
        skipped = sorted(set(range(n)) - set(order.tolist()))
        if skipped:
            (out / "skipped.txt").write_text("".join(paths[i] + "\n" for i in skipped))
    else:
        (out / "indices.txt").write_text("".join(f"{i}\n" for i in order.tolist()))
    if labels.size and bool((labels >= 0).all()):
        np.save(out / "labels.npy", labels)
    shutil.rmtree(chunks_dir)
    manifest_file.unlink()
    print(f"embedded {what}: {out / 'features.npy'} {features.shape}", flush=True)
    return EmbedResult(out / "features.npy", int(features.shape[0]), int(features.shape[1]), computed, len(done))
