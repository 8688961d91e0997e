"""Cosine k-nearest-neighbour search, near-duplicate groups and retrieval over embeddings.

The search behind DINOv2's data curation (``selfsup curate``): faiss's exact inner-product
index when faiss is installed (``pip install selfsup[curate]``), else a chunked torch search
that never holds more than ``chunk_size x N`` similarities. Both are exact searches over
L2-normalised float32 vectors, so they return the same neighbours (up to ties in the
similarity, which both break towards the lower index here).

References: Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision", arXiv:2304.07193 (sec. 3, automatic data pipeline); Johnson, Douze & Jegou
2019, "Billion-scale similarity search with GPUs" (faiss), arXiv:1702.08734.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "faiss_available",
    "faiss_index",
    "faiss_search",
    "knn_search",
    "duplicate_groups",
    "retrieve_neighbors",
]

BACKENDS = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported (the ``curate`` extra)."""
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """``"faiss"`` or ``"torch"`` for a ``backend`` option (``"auto"``: faiss when installed);
    a ValueError names the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ValueError(
            "backend='faiss' but faiss is not installed: pip install faiss-cpu (or 'selfsup[curate]'), or use 'torch'"
        )
    return backend


def _sort_ties(sims: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted by similarity descending, equal similarities by index ascending."""
    order = torch.argsort(idx, dim=1)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = torch.argsort(-sims, dim=1, stable=True)
    return sims.gather(1, order), idx.gather(1, order)


def _torch_search(queries: Tensor, database: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    sims_out, idx_out = [], []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start : start + chunk_size] @ database.T  # (c, N): the only large tensor
        sims, idx = block.topk(k, dim=1)
        sims_out.append(sims)
        idx_out.append(idx)
    return torch.cat(sims_out), torch.cat(idx_out)


def faiss_index(database: Tensor) -> Any:
    """faiss's exact inner-product index (``IndexFlatIP``: cosine on unit rows) over ``(N, D)``
    rows, built once and searched by :func:`faiss_search`."""
    import faiss  # the optional `curate` / `dev` extra
    import numpy as np

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database.detach().cpu().numpy(), dtype=np.float32))
    return index


def faiss_search(index: Any, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``index`` for ``(Q, D)`` queries on ``torch.get_num_threads()`` threads:
    ``(similarities (Q, k) float32 sorted descending, indices (Q, k) int64)`` on the CPU."""
    import faiss
    import numpy as np

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        sims, idx = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
    finally:
        faiss.omp_set_num_threads(threads)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


@torch.no_grad()
def knn_search(
    queries: Tensor,
    database: Tensor,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """The ``k`` database rows of largest cosine similarity to each query.

    Args:
        queries: ``(Q, D)`` embeddings (normalised inside).
        database: ``(N, D)`` embeddings (normalised inside).
        k: neighbours per query, ``1 <= k <= N``.
        backend: ``"faiss"`` (exact ``IndexFlatIP``), ``"torch"`` (chunked matrix products)
            or ``"auto"`` (faiss when installed).
        chunk_size: queries per torch block (memory ``chunk_size x N`` floats).

    Returns:
        ``(similarities (Q, k) float32, indices (Q, k) int64)``, each row sorted by
        similarity, highest first (ties: lower index first).
    """
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries and database must be (Q, D) and (N, D), got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k={k} must be in 1..{database.shape[0]} (the database size); lower k")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q = F.normalize(queries.float(), dim=1)
    db = F.normalize(database.float(), dim=1)
    if resolve_backend(backend) == "faiss":
        sims, idx = faiss_search(faiss_index(db), q, k)
        sims, idx = sims.to(q.device), idx.to(q.device)
    else:
        sims, idx = _torch_search(q, db, k, chunk_size)
    return _sort_ties(sims, idx)


@torch.no_grad()
def duplicate_groups(
    features: Tensor,
    threshold: float,
    k: int = 64,
    *,
    backend: str = "auto",
    chunk_size: int = 4096,
) -> Tensor:
    """Near-duplicate groups: connected components of the graph linking each sample to those
    of its ``k`` nearest neighbours with cosine similarity above ``threshold``.

    DINOv2 removes near-duplicates this way (k = 64, similarity > 0.6 on copy-detection
    embeddings) and keeps one image per component. Components are labelled by their lowest
    sample index, so "keep ``group == arange(N)``" keeps the first image of each group,
    deterministically. Edges are made symmetric (``j`` in ``i``'s list links ``i`` and ``j``).

    Args:
        features: ``(N, D)`` embeddings.
        threshold: cosine similarity above which two samples are duplicates.
        k: neighbours examined per sample (capped at ``N``; itself included).

    Returns:
        int64 ``(N,)``: the group of each sample = the lowest index in its component.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = features.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    sims, idx = knn_search(features, features, min(k, n), backend=backend, chunk_size=chunk_size)
    rows = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
    linked = (sims > threshold) & (idx != rows)
    src, dst = rows[linked], idx[linked]
    src, dst = torch.cat([src, dst]), torch.cat([dst, src])  # undirected
    group = torch.arange(n, device=idx.device)
    # Min-label propagation with pointer jumping: every step is one vectorised scatter over
    # the edges; it converges in O(log diameter) rounds of jumping.
    while True:
        new = group.scatter_reduce(0, src, group[dst], reduce="amin")
        new = new[new]  # jump: adopt the label of one's label
        if torch.equal(new, group):
            return group.cpu()
        group = new


@torch.no_grad()
def retrieve_neighbors(
    seeds: Tensor,
    pool: Tensor,
    k: int = 4,
    *,
    backend: str = "auto",
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """DINOv2's sample-based retrieval: the ``k`` nearest pool images of every seed image.

    Args:
        seeds: ``(S, D)`` embeddings of the curated seed set.
        pool: ``(N, D)`` embeddings of the (deduplicated) uncurated pool.
        k: neighbours per seed (DINOv2: 4).

    Returns:
        ``(indices (M,), similarity (M,))``: the sorted, distinct pool indices retrieved by
        at least one seed, and each one's best similarity to a seed.
    """
    sims, idx = knn_search(seeds, pool, k, backend=backend, chunk_size=chunk_size)
    best = torch.full((pool.shape[0],), -2.0, device=sims.device).scatter_reduce(
        0, idx.flatten(), sims.flatten(), reduce="amax"
    )
    chosen = torch.unique(idx.flatten())
    return chosen.cpu(), best[chosen].cpu()
