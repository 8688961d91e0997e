"""DeepCluster v2: k-means against scikit-learn (same initial centroids) and a float64 loop,
empty clusters re-seeded, the loss against its float64 formula, the epoch hook, bad input, and
a tiny real run whose loss falls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError, DataError
from selfsup.losses import deepcluster_loss
from selfsup.methods.base import EpochContext, StepInfo
from selfsup.methods.deepcluster import DeepClusterV2, kmeans
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config


def _blobs(n: int, d: int, k: int, spread: float, seed: int) -> Tensor:
    """``(n, d)`` float64 points around ``k`` random centres (overlapping for spread ~ 1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_euclidean_kmeans_equals_scikit_learn_from_the_same_initial_centroids() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = _blobs(300, 5, 6, spread=1.0, seed=0)  # overlapping blobs: many points near borders
    init = x[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:6]]
    for iterations in (1, 3, 10):
        centroids, assigned = kmeans(x, 6, iterations, init=init, spherical=False)
        ref = sklearn_cluster.KMeans(6, init=init.numpy(), n_init=1, max_iter=iterations, tol=0.0).fit(x.numpy())
        assert torch.equal(assigned, torch.from_numpy(ref.labels_).long()), iterations
        torch.testing.assert_close(centroids, torch.from_numpy(ref.cluster_centers_), rtol=1e-9, atol=1e-9)


def _spherical_loop(x: list[list[float]], init: list[list[float]], iterations: int) -> list[int]:
    """Spherical k-means written out: highest cosine, centroid = normalised mean (float64)."""

    def nearest(p: list[float], cs: list[list[float]]) -> int:
        dots = [sum(a * b for a, b in zip(p, c)) for c in cs]
        return dots.index(max(dots))

    cs = [list(c) for c in init]
    for _ in range(iterations):
        labels = [nearest(p, cs) for p in x]
        for j in range(len(cs)):
            members = [p for p, label in zip(x, labels) if label == j]
            assert members, "the reference has no empty-cluster handling"
            mean = [sum(col) / len(members) for col in zip(*members)]
            norm = math.sqrt(sum(v * v for v in mean))
            cs[j] = [v / norm for v in mean]
    return [nearest(p, cs) for p in x]


def test_spherical_kmeans_equals_a_float64_loop_and_returns_unit_centroids() -> None:
    x = F.normalize(_blobs(120, 4, 5, spread=0.7, seed=2), dim=1)
    g = torch.Generator().manual_seed(3)
    centroids, assigned = kmeans(x, 5, 10, generator=g)
    init = x[torch.randperm(120, generator=torch.Generator().manual_seed(3))[:5]]  # the same draw
    assert assigned.tolist() == _spherical_loop(x.tolist(), init.tolist(), 10)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(5, dtype=torch.float64))
    # The returned assignments are those of the returned centroids (final E-step).
    assert torch.equal(assigned, (x @ centroids.T).argmax(dim=1))


@pytest.mark.parametrize("spherical", [True, False])
def test_no_cluster_is_empty_after_reassignment(spherical: bool) -> None:
    x = F.normalize(_blobs(50, 3, 2, spread=0.1, seed=4), dim=1)
    # Initial centroids far from every point on one side: at first every point goes to one
    # cluster, the others start empty and must be re-seeded by splitting.
    init = torch.cat([x[:1], -x[:1].expand(5, 3) + 1e-3 * torch.randn(5, 3, dtype=torch.float64)])
    for iterations in (0, 1, 5):
        _, assigned = kmeans(x, 6, iterations, init=init, spherical=spherical)
        assert (torch.bincount(assigned, minlength=6) > 0).all(), (iterations, assigned)
    # Identical points: only the split's fallback (move one sample) can fill the clusters.
    same = torch.ones(7, 3, dtype=torch.float64) / math.sqrt(3)
    _, assigned = kmeans(same, 4, 3, generator=torch.Generator().manual_seed(0), spherical=spherical)
    assert (torch.bincount(assigned, minlength=4) > 0).all()


def test_k_larger_than_the_data_set_is_a_one_line_error() -> None:
    with pytest.raises(DataError, match="k=6 clusters needs at least k samples, got 5"):
        kmeans(torch.randn(5, 3), 6)
    backbone = BACKBONES.build("convnet", in_channels=1, width=4)
    with pytest.raises(ConfigError, match="method.num_prototypes=30 exceeds the 20 pretraining images"):
        DeepClusterV2(backbone, num_samples=20, num_prototypes=(10, 30))


def test_loss_equals_the_float64_formula() -> None:
    v, b, heads = 3, 4, (5, 7)
    scores = [torch.randn(v, b, k, dtype=torch.float64) for k in heads]
    assignments = torch.stack([torch.randint(0, k, (b,)) for k in heads])
    t = 0.1
    expected = 0.0
    for h, s in enumerate(scores):
        term = 0.0
        for view in range(v):
            for i in range(b):
                logits = [float(x) / t for x in s[view, i]]
                lse = max(logits) + math.log(sum(math.exp(z - max(logits)) for z in logits))
                term += lse - logits[int(assignments[h, i])]
        expected += term / (v * b)
    expected /= len(heads)
    assert float(deepcluster_loss(scores, assignments, temperature=t)) == pytest.approx(expected, rel=1e-12)


def test_epoch_hook_sets_unit_prototypes_from_the_centroids_and_the_assignments() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build("convnet", in_channels=1, width=8)
    method = DeepClusterV2(backbone, num_samples=40, proj_hidden_dim=16, proj_dim=8, num_prototypes=(3, 5, 7))
    images = torch.rand(40, 1, 12, 12)
    method.train()

    def encode(fn: object) -> Tensor:
        assert callable(fn)
        assert not method.training, "the pass must use BN running statistics (eval mode)"
        with torch.no_grad():
            return fn(images)  # type: ignore[no-any-return]

    step = StepInfo(step=0, total_steps=1, epoch=0.0)
    method.on_epoch_start(EpochContext(epoch=0, step=step, num_samples=40, encode=encode))
    assert method.training
    method.eval()
    with torch.no_grad():
        z = method.project(images)
    for head, layer in enumerate(method.heads()):
        weight = layer.weight
        assert not weight.requires_grad
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))
        g = torch.Generator().manual_seed(head)  # seed 0, epoch 0, head h
        centroids, assigned = kmeans(z, weight.shape[0], 10, generator=g)
        torch.testing.assert_close(weight, centroids)
        assert torch.equal(method.assignments[head], assigned)
        assert (torch.bincount(assigned, minlength=weight.shape[0]) > 0).all()


def _logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_deepcluster_loss_falls_in_a_tiny_run(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "deepcluster",
        "train.epochs=5",
        "backbone.width=16",
        "method.proj_hidden_dim=64",
        "method.proj_dim=32",
        "method.num_prototypes=[10, 20, 30]",
        "views.num_local=0",
        "views.global_scale=[0.5, 1.0]",
        "optim.name=adamw",
        "optim.lr=0.002",
        "optim.lr_scaling=none",
        "optim.warmup_epochs=0.5",
    )
    run = PretrainRun(cfg)
    run.fit()
    losses = _logged_losses(run.run_dir)
    per_epoch = len(losses) // 5
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    chance = sum(math.log(k) for k in (10, 20, 30)) / 3  # uniform scores over every head's clusters
    assert last < 0.93 * first and last < 0.93 * chance, (first, last, chance, losses)
    method = run.method
    assert isinstance(method, DeepClusterV2)
    placeholder = torch.arange(method.num_samples) % 10
    assert not torch.equal(method.assignments[0].cpu(), placeholder), "the epoch hook never clustered"
