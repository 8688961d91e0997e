"""k-NN search, duplicate groups and retrieval (selfsup.eval.neighbors) against brute force."""

from __future__ import annotations

import pytest
import torch

from selfsup.eval.neighbors import duplicate_groups, faiss_available, knn_search, retrieve_neighbors

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (the curate extra)")


def _pool_with_duplicates(n: int = 60, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Random directions plus noisy copies of some of them (chains of duplicates included)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    src = torch.tensor([0, 0, 3, 7, 12, 12, 12, 40])
    copies = base[src] + 0.02 * torch.randn(len(src), d, generator=g, dtype=torch.float64)
    chain = copies[-1:] + 0.02 * torch.randn(1, d, generator=g, dtype=torch.float64)  # a copy of a copy
    return torch.cat([base, copies, chain]).float()


def _brute_force_groups(x: torch.Tensor, threshold: float) -> list[int]:
    """float64 cosine similarities of every pair, union-find written out plainly."""
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True)
    sim = (x @ x.T).tolist()
    n = len(sim)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(n):
            if i != j and sim[i][j] > threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(n)]


def test_knn_search_matches_float64_brute_force_and_chunking() -> None:
    g = torch.Generator().manual_seed(1)
    q, db = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    want = (q.double() / q.double().norm(dim=1, keepdim=True)) @ (db.double() / db.double().norm(dim=1, keepdim=True)).T
    want_sims, want_idx = want.topk(5, dim=1)
    for chunk in (1, 4, 4096):
        sims, idx = knn_search(q, db, 5, backend="torch", chunk_size=chunk)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(sims.double(), want_sims, atol=1e-5, rtol=0)


@needs_faiss
def test_faiss_and_torch_return_the_same_neighbours() -> None:
    g = torch.Generator().manual_seed(2)
    q, db = torch.randn(40, 12, generator=g), torch.randn(300, 12, generator=g)
    s_t, i_t = knn_search(q, db, 10, backend="torch", chunk_size=7)
    s_f, i_f = knn_search(q, db, 10, backend="faiss")
    assert torch.equal(i_t, i_f)
    torch.testing.assert_close(s_t, s_f, atol=1e-5, rtol=0)
    pool = _pool_with_duplicates()
    assert torch.equal(duplicate_groups(pool, 0.95, backend="torch"), duplicate_groups(pool, 0.95, backend="faiss"))


@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_duplicate_groups_equal_brute_force_float64(threshold: float) -> None:
    pool = _pool_with_duplicates()
    want = _brute_force_groups(pool, threshold)
    got = duplicate_groups(pool, threshold, k=pool.shape[0], backend="torch", chunk_size=9)
    assert got.tolist() == want
    removed = {i for i, r in enumerate(want) if r != i}
    assert len(removed) >= 8  # the injected copies (and the chain) were all found
    # k smaller than the pool still finds these groups: each has fewer than 8 members.
    assert duplicate_groups(pool, threshold, k=8, backend="torch").tolist() == want


def test_retrieve_neighbors_returns_the_union_of_each_seeds_k_nearest() -> None:
    g = torch.Generator().manual_seed(4)
    pool, seeds = torch.randn(30, 6, generator=g), torch.randn(5, 6, generator=g)
    chosen, best = retrieve_neighbors(seeds, pool, k=3, backend="torch")
    sim = torch.nn.functional.normalize(seeds.double(), dim=1) @ torch.nn.functional.normalize(pool.double(), dim=1).T
    want = sorted({int(j) for row in sim.topk(3, dim=1).indices for j in row})
    assert chosen.tolist() == want
    top = sim.topk(3, dim=1)
    best_want = [max(float(sim[s, j]) for s in range(5) if j in top.indices[s].tolist()) for j in want]
    torch.testing.assert_close(best.double(), torch.tensor(best_want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_bad_arguments_are_one_line_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k=5 must be in 1..4"):
        knn_search(x, x, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        knn_search(x, x, 2, backend="annoy")
    with pytest.raises(ValueError, match="threshold"):
        duplicate_groups(x, 1.5)
