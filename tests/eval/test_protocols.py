"""Evaluation protocols against independent computations: clustering ACC by brute-force
permutation search, mAP@R and Recall@K by plain float64 loops, semi-supervised subsets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from selfsup.eval.clustering import cluster_accuracy
from selfsup.eval.retrieval import average_precision_at_r, iter_topk, recall_at_k, retrieval_metrics
from selfsup.eval.semi_supervised import fraction_name, semi_supervised_subsets


# ---------------------------------------------------------------------------- clustering ACC
def _acc_brute_force(pred: list[int], labels: list[int], k: int) -> float:
    """max over every one-to-one map of cluster ids onto labels of the matched fraction."""
    best = 0
    for perm in itertools.permutations(range(k)):
        best = max(best, sum(perm[p] == y for p, y in zip(pred, labels)))
    return best / len(pred)


@pytest.mark.parametrize("seed", range(5))
def test_cluster_accuracy_equals_brute_force_permutation_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4
    labels = rng.integers(0, k, size=30).tolist()
    # Half the points keep a permuted label, half are random: a non-trivial optimum.
    perm = rng.permutation(k)
    pred = [int(perm[y]) if rng.random() < 0.5 else int(rng.integers(0, k)) for y in labels]
    assert cluster_accuracy(pred, labels) == pytest.approx(_acc_brute_force(pred, labels, k), abs=1e-12)


# ---------------------------------------------------------------------------- retrieval
def _retrieval_loop(
    q: np.ndarray, qy: np.ndarray, db: np.ndarray, dby: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """mAP@R and Recall@K of Musgrave et al. 2020 with one plain float64 loop per query."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    aps, recalls = [], {k: [] for k in ks}
    for i in range(len(q)):
        r = int((dby == qy[i]).sum())
        if r == 0:
            continue
        order = sorted(range(len(db)), key=lambda j: -float(q[i] @ db[j]))
        total, hits = 0.0, 0
        for rank in range(1, r + 1):
            if dby[order[rank - 1]] == qy[i]:
                hits += 1
                total += hits / rank  # P(rank) * rel(rank)
        aps.append(total / r)
        for k in ks:
            recalls[k].append(float(any(dby[order[j]] == qy[i] for j in range(k))))
    out = {"retrieval_map@r": float(np.mean(aps))}
    out.update({f"retrieval_recall@{k}": float(np.mean(recalls[k])) for k in ks})
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_retrieval_metrics_equal_a_float64_loop(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g, dtype=torch.float64)
    dby = torch.randint(0, 4, (60,), generator=g)
    qy = torch.randint(0, 5, (25,), generator=g)  # class 4 has no database item: left out
    db = centres[dby] + 0.9 * torch.randn(60, 6, generator=g, dtype=torch.float64)
    q = torch.cat([centres, torch.randn(1, 6, generator=g, dtype=torch.float64)])[qy]
    q = q + 0.9 * torch.randn(25, 6, generator=g, dtype=torch.float64)
    got = retrieval_metrics(q.float(), qy, db.float(), dby, ks=(1, 5), chunk_size=chunk_size)
    want = _retrieval_loop(q.numpy(), qy.numpy(), db.numpy(), dby.numpy(), (1, 5))
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["retrieval_map@r"] < got["retrieval_recall@1"] <= got["retrieval_recall@5"] <= 1


def test_average_precision_at_r_extremes() -> None:
    # R = 3: relevant items first -> 1; the first R all irrelevant -> 0; hit at ranks 2, 3 only.
    relevant = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    ap = average_precision_at_r(relevant, torch.tensor([3, 3, 3]))
    assert ap.tolist() == pytest.approx([1.0, 0.0, (1 / 2 + 2 / 3) / 3])
    assert recall_at_k(relevant, [1, 2])[2].tolist() == [1.0, 0.0, 1.0]


def test_iter_topk_chunks_cover_every_query_in_order() -> None:
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    chunks = list(iter_topk(x, x, 1, chunk_size=4))
    assert [(s, e) for s, e, _ in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(torch.cat([i for _, _, i in chunks]).flatten(), torch.arange(10))  # itself first
    with pytest.raises(ValueError, match="k=11"):
        next(iter_topk(x, x, 11))


# ---------------------------------------------------------------------------- semi-supervised
def test_semi_supervised_subsets_are_balanced_and_reproducible() -> None:
    labels = torch.arange(10).repeat_interleave(200)[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    a = semi_supervised_subsets(labels, (0.01, 0.1), seed=3)
    b = semi_supervised_subsets(labels, (0.01, 0.1), seed=3)
    c = semi_supervised_subsets(labels, (0.01, 0.1), seed=4)
    for fraction, per_class in ((0.01, 2), (0.1, 20)):
        assert torch.equal(a[fraction], b[fraction])
        assert not torch.equal(a[fraction], c[fraction])
        assert torch.bincount(labels[a[fraction]], minlength=10).tolist() == [per_class] * 10
        assert a[fraction].unique().numel() == a[fraction].numel()
    assert [fraction_name(f) for f in (0.01, 0.1, 0.025)] == ["1%", "10%", "2.5%"]


def test_semi_supervised_fraction_leaving_a_class_unlabelled_is_one_line_error() -> None:
    labels = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"1% of the labels leaves class 1 \(20 labelled samples\)") as err:
        semi_supervised_subsets(labels, (0.01,))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        semi_supervised_subsets(labels, (1.5,))
    with pytest.raises(ValueError, match="needs labels"):
        semi_supervised_subsets(torch.full((5,), -1), (0.5,))
