"""Retrieval metrics of frozen features: mAP@R and Recall@K, computed in chunks of queries.

Image-to-image retrieval with class labels as relevance: every query (a test image) ranks the
database (the training images) by cosine similarity; a database item is relevant when it has
the query's label. The building blocks are shared with cross-modal retrieval (CLIP's
image-to-text Recall@K, where the one relevant item of query ``i`` is item ``i``):

- :func:`iter_topk` yields the top-``k`` database indices of each chunk of queries, so a
  ``10k x 60k`` similarity matrix never exists at once;
- :func:`recall_at_k` and :func:`average_precision_at_r` score one chunk from its boolean
  relevance of the ranked items;
- :func:`retrieval_metrics` puts them together for label relevance.

References: Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020
(arXiv:2003.08505), sec. 3.2 (mAP@R, and why Recall@1 alone is not enough); Recall@K as in
Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016
(arXiv:1511.06452).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_precision_at_r", "iter_topk", "recall_at_k", "retrieval_metrics"]


def iter_topk(
    query: Tensor, database: Tensor, k: int, chunk_size: int = 256, cosine: bool = True
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, end, indices (end - start, k))``: the ``k`` most similar database rows of
    queries ``start:end``, most similar first.

    Args:
        query: ``(Q, D)`` query features.
        database: ``(N, D)`` database features (same device as ``query``).
        k: items to retrieve per query, ``1 <= k <= N``.
        chunk_size: queries per similarity block; memory is ``chunk_size * N`` floats.
        cosine: L2-normalise both sides first (cosine similarity); else the dot product.
    """
    if query.dim() != 2 or database.dim() != 2 or query.shape[1] != database.shape[1]:
        raise ValueError(
            f"query and database must be (Q, D) and (N, D); got {tuple(query.shape)} and {tuple(database.shape)}"
        )
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k={k} must be in [1, {database.shape[0]}] (the database size)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cosine:
        query, database = F.normalize(query.float(), dim=1), F.normalize(database.float(), dim=1)
    for start in range(0, query.shape[0], chunk_size):
        end = min(start + chunk_size, query.shape[0])
        similarity = query[start:end] @ database.T  # (c, N)
        yield start, end, similarity.topk(k, dim=1, sorted=True).indices


def recall_at_k(relevant: Tensor, ks: Sequence[int]) -> dict[int, Tensor]:
    """Per-query Recall@K: 1 where any of the first ``K`` ranked items is relevant.

    Args:
        relevant: ``(Q, L)`` bool, ``relevant[q, i]`` for the ``i``-th ranked item of query
            ``q`` (``L >= max(ks)``).
        ks: the cut-offs.

    Returns:
        ``{K: (Q,) float}`` hits in ``{0, 1}``.
    """
    if relevant.dim() != 2 or any(k < 1 or k > relevant.shape[1] for k in ks):
        raise ValueError(f"relevant must be (Q, L) with L >= every K; got {tuple(relevant.shape)} for K={list(ks)}")
    return {k: relevant[:, :k].any(dim=1).float() for k in ks}


def average_precision_at_r(relevant: Tensor, num_relevant: Tensor) -> Tensor:
    """Per-query AP@R (Musgrave et al. 2020): with ``R`` the number of relevant database items
    of the query, ``AP@R = (1/R) sum_{i<=R} P(i) rel(i)``, ``P(i)`` the precision of the first
    ``i`` ranked items: the ranking counts only within the first ``R``, and a query scores 1
    exactly when its ``R`` relevant items come first.

    Args:
        relevant: ``(Q, L)`` bool relevance of the ranked items, ``L >= max(num_relevant)``.
        num_relevant: ``(Q,)`` int ``R`` of each query, ``>= 1``.

    Returns:
        ``(Q,)`` float64 AP@R in ``[0, 1]``.
    """
    if relevant.dim() != 2 or num_relevant.shape != relevant.shape[:1]:
        raise ValueError(
            f"relevant (Q, L) and num_relevant (Q,) differ: {tuple(relevant.shape)}, {tuple(num_relevant.shape)}"
        )
    if num_relevant.numel() and (int(num_relevant.min()) < 1 or int(num_relevant.max()) > relevant.shape[1]):
        raise ValueError(f"every R must be in [1, {relevant.shape[1]}] (the ranked items given)")
    rank = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    r = num_relevant.to(relevant.device).long()
    hits = relevant & (rank <= r[:, None])  # only the first R ranked items count
    precision = hits.cumsum(dim=1).double() / rank.double()
    return (precision * hits).sum(dim=1) / r.double()


def retrieval_metrics(
    query_features: Tensor,
    query_labels: Tensor,
    database_features: Tensor,
    database_labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 256,
) -> dict[str, float]:
    """Image-to-image retrieval with labels as relevance, cosine similarity: mAP@R and Recall@K.

    Queries without any relevant database item (a class absent from the database) are left
    out of both means, as their AP is undefined.

    Args:
        query_features: ``(Q, D)``; query_labels: ``(Q,)`` int.
        database_features: ``(N, D)``; database_labels: ``(N,)`` int.
        ks: the Recall@K cut-offs (default 1 and 5).
        chunk_size: queries per similarity block (memory ``chunk_size * N`` floats; the top
            ``max(R, K)`` of each row is kept, never a full sort).

    Returns:
        ``{"retrieval_map@r": ..., "retrieval_recall@<K>": ...}``, fractions in ``[0, 1]``.
    """
    if query_labels.shape != query_features.shape[:1] or database_labels.shape != database_features.shape[:1]:
        raise ValueError("features (N, D) and labels (N,) differ in length")
    device = query_features.device
    query_labels, database_labels = query_labels.to(device).long(), database_labels.to(device).long()
    if query_labels.numel() == 0 or database_labels.numel() == 0:
        raise ValueError("retrieval needs at least one query and one database item")
    if int(query_labels.min()) < 0 or int(database_labels.min()) < 0:
        raise ValueError("retrieval needs labelled queries and database items (labels >= 0)")
    classes = int(max(query_labels.max(), database_labels.max())) + 1
    per_class = torch.bincount(database_labels, minlength=classes)
    num_relevant = per_class[query_labels]
    keep = num_relevant > 0
    if not bool(keep.any()):
        raise ValueError("no query has a relevant database item (no label in common)")
    query_features, query_labels, num_relevant = query_features[keep], query_labels[keep], num_relevant[keep]
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > database_labels.numel():
        raise ValueError(f"Recall@K cut-offs must be in [1, {database_labels.numel()}], got {ks}")
    depth = max(int(num_relevant.max()), ks[-1])
    ap_sum = 0.0
    recall_sums = dict.fromkeys(ks, 0.0)
    for start, end, indices in iter_topk(query_features, database_features, depth, chunk_size):
        relevant = database_labels[indices] == query_labels[start:end, None]
        ap_sum += float(average_precision_at_r(relevant, num_relevant[start:end]).sum())
        for k, hits in recall_at_k(relevant, ks).items():
            recall_sums[k] += float(hits.sum())
    n = int(keep.sum())
    return {"retrieval_map@r": ap_sum / n, **{f"retrieval_recall@{k}": recall_sums[k] / n for k in ks}}
