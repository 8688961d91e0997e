"""DINOv2's automatic data curation (``selfsup curate``): deduplicate an uncurated pool, then
retrieve the pool images closest to a curated seed set.

Pipeline (Oquab et al. 2023, sec. 3 and appendix A)::

    f_pool, f_seed = embed(pool), embed(seeds)        # a trained encoder (selfsup embed)
    group = duplicate_groups(f_pool, threshold, k)    # k-NN graph, cosine > threshold, components
    pool' = one image per group (its lowest index)    # deterministic
    curated = union over seeds of knn(seed, pool', k) # sample-based retrieval, k = 4

Written under ``OUT``: ``curated.txt`` (one retrieved pool image per line: its path for an
image folder, which ``data.list_file`` of the ``image-folder`` data set reads; its index in
the split for a registered data set), ``duplicates.tsv`` (each removed image and the one
kept in its place), ``curate.json`` (counts and settings), and the two embeddings under
``OUT/pool/`` and ``OUT/seeds/`` (``selfsup embed``'s output: a re-run resumes them).

DINOv2 found duplicates with a copy-detection model (SSCD) at similarity > 0.6 over k = 64
neighbours; embeddings of a general self-supervised encoder are less peaked, so the default
threshold here is higher (0.95): check it on ``duplicates.tsv``.

References: Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision", arXiv:2304.07193; Pizzi et al. 2022, "A Self-Supervised Descriptor for Image
Copy Detection" (SSCD), arXiv:2202.10261.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfsup.config import ConfigError
from selfsup.engine.embed import embed
from selfsup.engine.export import Encoder, load_encoder
from selfsup.eval.neighbors import duplicate_groups, retrieve_neighbors

__all__ = ["Curation", "curate", "curate_features"]

#: DINOv2's neighbours per sample for deduplication and per seed for retrieval.
PAPER_DEDUP_K = 64
PAPER_RETRIEVE_K = 4


@dataclass
class Curation:
    """The result of :func:`curate_features` (indices into the pool's rows).

    Attributes:
        group: ``(N,)`` duplicate group of each pool image (the lowest index in it).
        kept: ``(N',)`` sorted indices of the images kept after deduplication.
        retrieved: ``(M,)`` sorted indices of the kept images retrieved by the seeds.
        similarity: ``(M,)`` each retrieved image's best cosine similarity to a seed.
    """

    group: Tensor
    kept: Tensor
    retrieved: Tensor
    similarity: Tensor

    @property
    def removed(self) -> Tensor:
        """Sorted indices of the images removed as duplicates."""
        return torch.nonzero(self.group != torch.arange(self.group.numel())).flatten()


def curate_features(
    pool: Tensor,
    seeds: Tensor,
    *,
    threshold: float = 0.95,
    dedup_k: int = PAPER_DEDUP_K,
    retrieve_k: int = PAPER_RETRIEVE_K,
    backend: str = "auto",
    chunk_size: int = 4096,
    center: bool = True,
) -> Curation:
    """Deduplicate ``pool (N, D)`` and retrieve ``retrieve_k`` neighbours per row of
    ``seeds (S, D)`` from what is kept (see the module doc).

    With ``center`` the pool's mean embedding is subtracted from both first: pooled features
    after a ReLU are all non-negative, so their raw cosines crowd near 1 and every image would
    look like a duplicate of every other (a random-init ConvNet's do, at 0.9).

    Raises:
        ConfigError: ``retrieve_k`` is larger than the deduplicated pool.
    """
    if center:
        mean = pool.float().mean(dim=0, keepdim=True)
        pool, seeds = pool.float() - mean, seeds.float() - mean
    try:
        group = duplicate_groups(pool, threshold, dedup_k, backend=backend, chunk_size=chunk_size)
    except ValueError as err:
        raise ConfigError(f"curate: {err}") from None
    kept = torch.nonzero(group == torch.arange(group.numel())).flatten()
    if not 1 <= retrieve_k <= kept.numel():
        raise ConfigError(
            f"--k {retrieve_k} neighbours per seed, but the deduplicated pool holds {kept.numel()} images; lower --k"
        )
    chosen, sims = retrieve_neighbors(seeds, pool[kept], retrieve_k, backend=backend, chunk_size=chunk_size)
    return Curation(group, kept, kept[chosen], sims)


def _rows(folder: Path) -> list[str]:
    """What each row of an embedding under ``folder`` is: an image path or a sample index."""
    for name in ("paths.txt", "indices.txt"):
        if (folder / name).is_file():
            return (folder / name).read_text().splitlines()
    raise ConfigError(f"{folder} holds no paths.txt or indices.txt: embed it again")


def curate(
    run: str | Path,
    pool: str | Path,
    seeds: str | Path,
    out: str | Path,
    *,
    threshold: float = 0.95,
    dedup_k: int = PAPER_DEDUP_K,
    retrieve_k: int = PAPER_RETRIEVE_K,
    backend: str = "auto",
    center: bool = True,
    pool_split: str = "train",
    seed_split: str = "train",
    options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    encoder: Encoder | None = None,
) -> Curation:
    """Embeds ``pool`` and ``seeds`` with ``run``'s encoder, curates, writes ``out`` (module doc).

    Args:
        run: the run folder or encoder file (:func:`selfsup.engine.export.load_encoder`).
        pool: the uncurated images: a folder or a registered data set name.
        seeds: the curated seed images: a folder or a registered data set name.
        out: output folder.
        threshold: cosine similarity above which two pool images are duplicates.
        dedup_k: neighbours examined per pool image for duplicates (DINOv2: 64).
        retrieve_k: pool images retrieved per seed image (DINOv2: 4).
        backend: k-NN search: ``"faiss"``, ``"torch"`` or ``"auto"`` (faiss when installed).
        center: subtract the pool's mean embedding first (:func:`curate_features`).
        pool_split, seed_split: the split of a registered data set (train, test, pretrain).
        options: a registered data set's builder options (both sources).
        batch_size, num_workers, device, progress: as ``selfsup embed``.
        encoder: an already loaded encoder (else loaded from ``run``).
    """
    out = Path(out)
    device = torch.device(device)
    encoder = encoder if encoder is not None else load_encoder(run, device=device)
    features: dict[str, tuple[Tensor, list[str]]] = {}
    for name, source, split in (("pool", pool, pool_split), ("seeds", seeds, seed_split)):
        folder = out / name
        embed(
            run,
            source,
            folder,
            split=split,
            options=options if not Path(source).is_dir() else None,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            encoder=encoder,
        )
        features[name] = (torch.from_numpy(np.load(folder / "features.npy")), _rows(folder))
    (pool_feats, pool_rows), (seed_feats, _) = features["pool"], features["seeds"]
    result = curate_features(
        pool_feats,
        seed_feats,
        threshold=threshold,
        dedup_k=dedup_k,
        retrieve_k=retrieve_k,
        backend=backend,
        center=center,
    )
    if (out / "pool" / "paths.txt").is_file():
        # Absolute: the list is read from another working directory (data.list_file).
        pool_rows = [os.path.abspath(row) for row in pool_rows]
    (out / "curated.txt").write_text("".join(pool_rows[i] + "\n" for i in result.retrieved.tolist()))
    removed = result.removed.tolist()
    (out / "duplicates.tsv").write_text(
        "removed\tkept\n" + "".join(f"{pool_rows[i]}\t{pool_rows[int(result.group[i])]}\n" for i in removed)
    )
    summary = {
        "pool": str(pool),
        "seeds": str(seeds),
        "rows": "paths" if (out / "pool" / "paths.txt").is_file() else "indices",
        "pool_images": int(pool_feats.shape[0]),
        "seed_images": int(seed_feats.shape[0]),
        "duplicates_removed": len(removed),
        "kept_after_dedup": int(result.kept.numel()),
        "curated_images": int(result.retrieved.numel()),
        "threshold": threshold,
        "dedup_k": dedup_k,
        "retrieve_k": retrieve_k,
        "backend": backend,
        "center": center,
    }
    (out / "curate.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"curated {summary['curated_images']} of {summary['pool_images']} pool images "
        f"({len(removed)} duplicates removed, {summary['seed_images']} seeds x {retrieve_k} neighbours): "
        f"{out / 'curated.txt'}",
        flush=True,
    )
    return result
