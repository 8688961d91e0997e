"""Tests for the fast weighted kNN search (grouped top-k, faiss backend, one-pass vote) and for
the scripts of issue 25 (benchmarks/knn.py, benchmarks/gpu_check.sh)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval import knn as knn_module
from selfsup.eval import neighbors as neighbors_module
from selfsup.eval.knn import knn_classify, knn_predict
from selfsup.eval.neighbors import faiss_available

ROOT = Path(__file__).resolve().parents[2]
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed (pip install faiss-cpu)")


def _clusters(n: int, m: int, dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noisy Gaussian clusters (overlapping, so votes are not unanimous), float64 features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y_train = torch.randint(0, classes, (n,), generator=g)
    y_test = torch.randint(0, classes, (m,), generator=g)
    x_train = centres[y_train] + 1.2 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x_test = centres[y_test] + 1.2 * torch.randn(m, dim, generator=g, dtype=torch.float64)
    return x_train, y_train, x_test, y_test


def _reference(train: Tensor, labels: Tensor, test: Tensor, k: int, t: float, classes: int) -> Tensor:
    """The weighted vote written plainly in float64: full sort of the cosine similarities, then
    ``votes[c] = sum over the k nearest with label c of exp(sim / t)``, lowest class on ties."""
    sims = F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    preds = []
    for i in range(test.shape[0]):
        votes = [0.0] * classes
        for j in order[i].tolist():
            votes[int(labels[j])] += math.exp(float(sims[i, j]) / t)
        preds.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("n,k", [(1000, 10), (997, 50), (300, 300), (64, 1), (5000, 200), (777, 13)])
def test_grouped_topk_equals_topk(n: int, k: int) -> None:
    """The group-maxima search returns exactly topk's values (and, without ties, indices)."""
    g = torch.Generator().manual_seed(n + k)
    group = knn_module._group_size(n, k)
    width = -(-n // group) * group
    sim = torch.full((9, width), float("-inf"), dtype=torch.float64)
    sim[:, :n] = torch.rand(9, n, generator=g, dtype=torch.float64)  # distinct values: no ties
    values, idx = knn_module._grouped_topk(sim, k, group)
    expected_values, expected_idx = sim[:, :n].topk(k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(idx, expected_idx)


def test_grouped_topk_with_ties_returns_the_same_values() -> None:
    """Heavily tied similarities (a few distinct levels): the same sorted top-k values."""
    g = torch.Generator().manual_seed(0)
    n, k = 3600, 100
    group = knn_module._group_size(n, k)
    assert group > 1 and n % group == 0
    sim = torch.randint(0, 7, (5, n), generator=g).float() / 7
    values, idx = knn_module._grouped_topk(sim, k, group)
    assert torch.equal(values, sim.topk(k, dim=1).values)
    assert torch.equal(sim.gather(1, idx), values)  # the indices point at those values
    assert all(len(set(row.tolist())) == k for row in idx)  # k distinct neighbours


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_backends_match_float64_reference(backend: str) -> None:
    """Both backends give the float64 reference's predictions at every k (k_max > group)."""
    x_train, y_train, x_test, y_test = _clusters(3000, 60, 16, 6, seed=1)
    ks = [1, 20, 200]
    preds = knn_predict(x_train.float(), y_train, x_test.float(), k=ks, num_classes=6, backend=backend)
    for k in ks:
        assert torch.equal(preds[k], _reference(x_train, y_train, x_test, k, 0.07, 6)), k


@needs_faiss
def test_faiss_and_torch_predictions_agree_on_many_queries() -> None:
    """Same neighbours, same votes: identical predictions and accuracies on 2000 queries."""
    x_train, y_train, x_test, y_test = _clusters(8000, 2000, 32, 10, seed=2)
    args = (x_train.float(), y_train, x_test.float())
    a = knn_predict(*args, k=(20, 200), backend="torch", chunk_size=300)
    b = knn_predict(*args, k=(20, 200), backend="faiss", chunk_size=700)
    for k in (20, 200):
        assert torch.equal(a[k], b[k])
    test = (x_train.float(), y_train, x_test.float(), y_test)
    assert knn_classify(*test, backend="torch") == knn_classify(*test, backend="faiss")


def test_float64_and_blocks_of_any_size() -> None:
    """float64 features stay float64 (torch path); chunk sizes do not change predictions."""
    x_train, y_train, x_test, _ = _clusters(1499, 50, 8, 4, seed=3)  # prime N: padded groups
    ref = _reference(x_train, y_train, x_test, 30, 0.1, 4)
    for chunk in (1, 7, 50, 10_000):
        preds = knn_predict(x_train, y_train, x_test, k=30, temperature=0.1, chunk_size=chunk, backend="auto")
        assert torch.equal(preds[30], ref), chunk


def test_votes_are_cumulative_per_k() -> None:
    """The one-pass vote equals a separate scatter-add over the first k neighbours per k."""
    g = torch.Generator().manual_seed(4)
    sim = torch.rand(6, 50, generator=g).sort(dim=1, descending=True).values
    labels = torch.randint(0, 5, (6, 50), generator=g)
    votes = knn_module._votes(sim, labels, [3, 10, 50], 0.07, 5)
    for k in (3, 10, 50):
        expected = torch.zeros(6, 5).scatter_add_(1, labels[:, :k], (sim[:, :k] / 0.07).exp())
        torch.testing.assert_close(votes[k], expected, rtol=1e-6, atol=0)


def test_bad_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(20, 4)
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match="backend must be one of"):
        knn_predict(x, y, x, k=3, backend="annoy")
    monkeypatch.setattr(neighbors_module, "faiss_available", lambda: False)  # where the backend is resolved
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        knn_predict(x, y, x, k=3, backend="faiss")
    assert knn_predict(x, y, x, k=3, backend="auto")[3].shape == (20,)  # falls back to torch


# ------------------------------------------------------------------------ the scripts


@pytest.mark.slow  # a subprocess importing torch: ~3 s alone, much more on a loaded machine
def test_knn_benchmark_prints_its_table() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks/knn.py"), "--train", "600", "--test", "40", "--dim", "8"]
    out = subprocess.run(
        [*cmd, "--k", "5", "50", "--rounds", "1", "--threads", "1"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "1 thread(s)" in out.stdout
    for name in ("old", "topk", "torch", "matmul"):
        assert f"\n{name} " in out.stdout
    assert out.stdout.count("= old") == 3 if faiss_available() else 2


GPU_CHECK = ROOT / "benchmarks/gpu_check.sh"


def test_gpu_check_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


def test_gpu_check_dry_run_prints_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    out = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "test_hog.py::test_cuda_equals_cpu" in text  # the CUDA-marked tests were found
    assert "--backbone resnet18" in text and "--backbone vit_small" in text
    assert "--precision bf16 --channels-last" in text
    assert "train.compile=true" in text and "failure tolerated" in text
    assert "configs/simclr/fashion_mnist.yaml" in text and "train.device=cuda" in text
    assert "nvidia-smi -L" in text and str(tmp_path / "out") in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure")
def test_gpu_check_fails_clearly_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SELFSUP_FMNIST": str(tmp_path)}
    (tmp_path / "train-images-idx3-ubyte.gz").touch()  # found data, so the CUDA check decides
    out = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "no CUDA device" in out.stderr
