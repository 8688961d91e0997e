"""Tests for selfsup.eval: kNN, linear probe, feature extraction, clustering, monitors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from selfsup.eval import (
    DEFAULT_WEIGHT_DECAYS,
    LinearProbe,
    balanced_label_subset,
    cluster_accuracy,
    clustering_metrics,
    effective_rank,
    evaluate_features,
    extract_features,
    feature_std,
    knn_classify,
    knn_predict,
    linear_probe,
    linear_probe_encoder,
    raw_pixel_features,
    train_linear_head,
)


def _blobs(
    per_class: int,
    num_classes: int,
    dim: int,
    noise: float,
    gen: torch.Generator,
    centers: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(features (per_class * C, dim), labels, centers (C, dim))`` Gaussian blobs."""
    if centers is None:
        centers = 4.0 * torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centers[labels] + noise * torch.randn(labels.shape[0], dim, generator=gen)
    return feats, labels, centers


def _batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Split tensors into a list of ``(x, y)`` mini-batches."""
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


# ----------------------------------------------------------------------------------- kNN


def _knn_reference(train: Tensor, train_y: Tensor, test: Tensor, k: int, t: float, num_classes: int) -> list[int]:
    """Weighted kNN vote written as a plain float64 loop (Wu et al. 2018, Eq. for p_c)."""
    train64, test64 = train.double(), test.double()
    preds = []
    for i in range(test64.shape[0]):
        q = test64[i]
        sims = []
        for j in range(train64.shape[0]):
            x = train64[j]
            sims.append(float(q @ x) / (math.sqrt(float(q @ q)) * math.sqrt(float(x @ x))))
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_y[j])] += math.exp(sims[j] / t)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


def test_knn_perfect_on_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(1)
    train_x, train_y, centers = _blobs(30, 6, 16, 0.3, gen)
    test_x, test_y, _ = _blobs(10, 6, 16, 0.3, gen, centers)
    metrics = knn_classify(train_x, train_y, test_x, test_y, k=(1, 20))
    assert metrics == {"knn_top1@1": 1.0, "knn_top5@1": 1.0, "knn_top1@20": 1.0, "knn_top5@20": 1.0}


def test_knn_fewer_than_five_classes_reports_top1_only() -> None:
    gen = torch.Generator().manual_seed(2)
    train_x, train_y, centers = _blobs(20, 3, 8, 0.3, gen)
    test_x, test_y, _ = _blobs(5, 3, 8, 0.3, gen, centers)
    assert knn_classify(train_x, train_y, test_x, test_y, k=5) == {"knn_top1@5": 1.0}


def test_knn_chunked_equals_unchunked() -> None:
    gen = torch.Generator().manual_seed(3)
    train_x = torch.randn(300, 32, generator=gen)
    train_y = torch.randint(0, 7, (300,), generator=gen)
    test_x = torch.randn(97, 32, generator=gen)
    test_y = torch.randint(0, 7, (97,), generator=gen)
    small = knn_predict(train_x, train_y, test_x, k=(1, 10, 50), chunk_size=7)
    big = knn_predict(train_x, train_y, test_x, k=(1, 10, 50), chunk_size=10_000)
    assert small.keys() == big.keys() == {1, 10, 50}
    for k in small:
        assert small[k].dtype == torch.int64 and small[k].shape == (97,)
        assert torch.equal(small[k], big[k])
    assert knn_classify(train_x, train_y, test_x, test_y, k=(1, 10, 50), chunk_size=7) == knn_classify(
        train_x, train_y, test_x, test_y, k=(1, 10, 50), chunk_size=10_000
    )


def test_knn_matches_float64_loop_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    # Scales differ per row so the L2 normalisation matters.
    train_x = torch.randn(80, 8, generator=gen) * torch.rand(80, 1, generator=gen).add(0.1)
    train_y = torch.randint(0, 5, (80,), generator=gen)
    test_x = torch.randn(30, 8, generator=gen) * 3.0
    ks = (1, 5, 17, 80)
    preds = knn_predict(train_x, train_y, test_x, k=ks, temperature=0.1, num_classes=5, chunk_size=8)
    for k in ks:
        expected = _knn_reference(train_x, train_y, test_x, k, 0.1, 5)
        assert preds[k].tolist() == expected, k
    # The sets differ across k, so the test really exercises slicing one top-k result.
    assert not torch.equal(preds[1], preds[80])


def test_knn_rejects_bad_arguments() -> None:
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="exceeds"):
        knn_predict(x, y, x, k=11)
    with pytest.raises(ValueError, match="dims differ"):
        knn_predict(x, y, torch.randn(3, 5), k=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, k=1, temperature=0.0)


# ------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_reaches_100_percent() -> None:
    gen = torch.Generator().manual_seed(5)
    train_x, train_y, centers = _blobs(40, 5, 20, 0.5, gen)
    test_x, test_y, _ = _blobs(20, 5, 20, 0.5, gen, centers)
    metrics = linear_probe(train_x, train_y, test_x, test_y, epochs=50)
    assert metrics["linear_top1"] == 1.0 and metrics["linear_top5"] == 1.0
    assert metrics["linear_weight_decay"] in DEFAULT_WEIGHT_DECAYS
    assert metrics["linear_val_top1"] == 1.0


def test_linear_probe_noisy_beats_chance_and_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(6)
    # Centres close relative to the noise: clearly learnable but far from separable.
    centers = 0.35 * torch.randn(10, 32, generator=gen)
    train_x, train_y, _ = _blobs(60, 10, 32, 1.0, gen, centers)
    test_x, test_y, _ = _blobs(30, 10, 32, 1.0, gen, centers)
    first = linear_probe(train_x, train_y, test_x, test_y, epochs=50, weight_decay=(1e-4, 1e-2, 1e-1), seed=3)
    assert 0.5 < first["linear_top1"] < 1.0  # chance is 0.1
    assert first["linear_top5"] >= first["linear_top1"]
    second = linear_probe(train_x, train_y, test_x, test_y, epochs=50, weight_decay=(1e-4, 1e-2, 1e-1), seed=3)
    assert first == second


def test_linear_probe_single_weight_decay_skips_search() -> None:
    gen = torch.Generator().manual_seed(7)
    x, y, _ = _blobs(10, 3, 6, 0.5, gen)
    metrics = linear_probe(x, y, x, y, weight_decay=3e-3, epochs=20)
    assert metrics["linear_weight_decay"] == 3e-3
    assert "linear_val_top1" not in metrics and "linear_top5" not in metrics


def test_train_linear_head_reaches_the_logistic_regression_optimum() -> None:
    """The L-BFGS fit equals scikit-learn's multinomial logistic regression optimum."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(8)
    centers = 0.5 * torch.randn(4, 6, generator=gen)
    x, y, _ = _blobs(50, 4, 6, 1.0, gen, centers)
    x = x.double()
    wd = 1e-2
    probe = train_linear_head(x, y, weight_decay=wd, epochs=500, standardize=False)
    # sklearn minimises 0.5 ||W||^2 + C * sum CE, i.e. ours times 1 / (wd) with C = 1/(wd N).
    sk = LogisticRegression(C=1.0 / (wd * x.shape[0]), tol=1e-10, max_iter=10_000)
    sk.fit(x.numpy(), y.numpy())
    ours = torch.softmax(probe(x), dim=1).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(x.numpy()), atol=1e-5)


def test_linear_probe_as_linear_folds_standardisation() -> None:
    gen = torch.Generator().manual_seed(9)
    x, y, _ = _blobs(20, 3, 5, 1.0, gen)
    x = x * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0]) + 7.0
    probe = train_linear_head(x, y, epochs=30)
    assert isinstance(probe, LinearProbe) and not probe.std.eq(1).all()
    folded = probe.as_linear()
    assert isinstance(folded, nn.Linear)
    torch.testing.assert_close(folded(x), probe(x), rtol=1e-4, atol=1e-4)
    _, returned = linear_probe(x, y, x, y, weight_decay=1e-3, epochs=30, return_probe=True)
    assert isinstance(returned, LinearProbe)


def _small_encoder() -> nn.Module:
    """Return a tiny conv encoder with BatchNorm and dropout, ``(B, 1, 6, 6) -> (B, 8)``."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
    )


def _image_batches(gen: torch.Generator, n: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Return uint8 ``(B, 1, 6, 6)`` images whose brightness encodes one of 3 labels."""
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 30, (n, 1, 6, 6), generator=gen)
    index = torch.arange(n)
    return [(images[i : i + 16].to(torch.uint8), labels[i : i + 16], index[i : i + 16]) for i in range(0, n, 16)]


def test_linear_probe_encoder_leaves_encoder_bit_identical() -> None:
    gen = torch.Generator().manual_seed(10)
    encoder = _small_encoder().train()
    # Non-trivial running stats, so "unchanged" is not vacuous.
    with torch.no_grad():
        encoder(torch.randn(32, 1, 6, 6, generator=gen))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    metrics = linear_probe_encoder(
        encoder,
        _image_batches(gen, 96),
        _image_batches(gen, 48),
        preprocess=lambda im: im.float() / 255.0,
        epochs=30,
        weight_decay=(1e-4, 1e-2),
    )
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert encoder.training
    assert all(p.grad is None for p in encoder.parameters())
    assert 0.0 <= metrics["linear_top1"] <= 1.0 and "linear_weight_decay" in metrics


# ------------------------------------------------------------------- feature extraction


def test_extract_features_uses_eval_mode_and_restores_flags() -> None:
    gen = torch.Generator().manual_seed(11)
    encoder = _small_encoder().train()
    with torch.no_grad():
        encoder(torch.randn(32, 1, 6, 6, generator=gen))
    encoder[3].eval()  # a deliberately frozen submodule must stay frozen afterwards
    modes = [m.training for m in encoder.modules()]
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k or "num_batches" in k}
    batches = _image_batches(gen, 40)

    def preprocess(images: Tensor) -> Tensor:
        return images.float() / 255.0

    features, labels = extract_features(encoder, batches, preprocess=preprocess)

    assert [m.training for m in encoder.modules()] == modes
    for key, value in stats.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    assert features.shape == (40, 8) and features.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.cat([b[1] for b in batches]))
    assert features.device.type == "cpu" and not features.requires_grad
    # Matches an eval-mode forward (running stats, no dropout), which a train-mode one does not.
    reference = copy.deepcopy(encoder).eval()
    images = torch.cat([preprocess(b[0]) for b in batches])
    with torch.no_grad():
        torch.testing.assert_close(features, reference(images))
    # The features are ordinary tensors: a probe can train on them with autograd.
    weight = torch.zeros(8, 3, requires_grad=True)
    (features @ weight).sum().backward()
    assert weight.grad is not None


def test_extract_features_restores_mode_on_error_and_flattens_callables() -> None:
    encoder = _small_encoder().train()
    with pytest.raises(TypeError, match="tuple or list"):
        extract_features(encoder, [torch.zeros(2, 1, 6, 6)])
    assert all(m.training for m in encoder.modules())

    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    feats, labels = extract_features(lambda x: x * 2, [(images, [4, 5])])
    assert torch.equal(feats, images.view(2, -1) * 2) and labels.tolist() == [4, 5]


class _Wrapper(nn.Module):
    """A method-like module whose bound ``embed`` is passed as the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _small_encoder()

    def embed(self, images: Tensor) -> Tensor:
        return self.backbone(images)


def test_extract_features_switches_the_owner_of_a_bound_method() -> None:
    gen = torch.Generator().manual_seed(18)
    wrapper = _Wrapper().train()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    batches = [(torch.randn(8, 1, 6, 6, generator=gen), torch.zeros(8, dtype=torch.int64))]
    first, _ = extract_features(wrapper.embed, batches)
    second, _ = extract_features(wrapper.embed, batches)
    torch.testing.assert_close(first, second)  # dropout off, running stats used
    assert wrapper.training and wrapper.backbone[1].training
    for key, value in before.items():
        assert torch.equal(wrapper.state_dict()[key], value), key


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Extract 3 + 2 * rank rows per rank and save the gathered result (spawned process)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        n = 3 + 2 * rank
        x = torch.full((n, 2), float(rank)) + torch.arange(n, dtype=torch.float32)[:, None]
        y = torch.full((n,), 10 * rank) + torch.arange(n)
        feats, labels = extract_features(nn.Identity(), [(x, y)], gather=True)
        local = extract_features(nn.Identity(), [(x, y)], gather=False)
        torch.save({"feats": feats, "labels": labels, "local": local}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_extract_features_gathers_unequal_sizes_across_processes(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected_f = torch.cat([r["local"][0] for r in results])
    expected_y = torch.cat([r["local"][1] for r in results])
    assert expected_f.shape == (8, 2)
    for r in results:
        assert torch.equal(r["feats"], expected_f) and torch.equal(r["labels"], expected_y)
    assert results[0]["local"][0].shape == (3, 2)


# ------------------------------------------------------------------ baselines, clustering


def test_raw_pixel_features_are_flattened_unit_pixels() -> None:
    gen = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (10, 2, 3, 3), generator=gen).to(torch.uint8)
    labels = torch.arange(10)
    feats, y = raw_pixel_features(_batches(images, labels, 4))
    assert feats.shape == (10, 18) and torch.equal(y, labels)
    torch.testing.assert_close(feats, images.float().view(10, -1) / 255.0)
    feats2, _ = raw_pixel_features(_batches(images, labels, 4), preprocess=lambda im: im.float())
    torch.testing.assert_close(feats2, images.float().view(10, -1))


def test_evaluate_features_combines_all_metrics() -> None:
    gen = torch.Generator().manual_seed(13)
    train_x, train_y, centers = _blobs(20, 5, 12, 0.3, gen)
    test_x, test_y, _ = _blobs(8, 5, 12, 0.3, gen, centers)
    with pytest.warns(UserWarning, match="dropping kNN"):
        metrics = evaluate_features(
            train_x,
            train_y,
            test_x,
            test_y,
            knn_k=(5, 1000),
            linear_epochs=30,
            linear_weight_decay=(1e-3, 1e-2),
            clustering=True,
        )
    for key in ("knn_top1@5", "knn_top5@5", "linear_top1", "linear_top5", "cluster_acc", "nmi", "ari"):
        assert metrics[key] == pytest.approx(1.0), key
    assert "knn_top1@1000" not in metrics and metrics["linear_weight_decay"] in (1e-3, 1e-2)


def test_evaluate_features_reports_the_collapse_monitors_of_the_test_features() -> None:
    gen = torch.Generator().manual_seed(15)
    train_x, train_y, centers = _blobs(20, 5, 12, 0.3, gen)
    test_x, test_y, _ = _blobs(8, 5, 12, 0.3, gen, centers)
    metrics = evaluate_features(train_x, train_y, test_x, test_y, knn_k=5, linear=False, collapse_monitors=True)
    assert metrics["feature_std"] == pytest.approx(feature_std(test_x))
    assert metrics["effective_rank"] == pytest.approx(effective_rank(test_x))
    collapsed = evaluate_features(
        train_x, train_y, test_x[:1].repeat(40, 1), test_y, knn_k=5, linear=False, collapse_monitors=True
    )
    assert collapsed["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert "feature_std" not in evaluate_features(train_x, train_y, test_x, test_y, knn_k=5, linear=False)


def test_clustering_metrics_perfect_on_separated_blobs() -> None:
    gen = torch.Generator().manual_seed(14)
    feats, labels, _ = _blobs(25, 4, 8, 0.2, gen)
    metrics = clustering_metrics(feats, labels, num_clusters=4, seed=0)
    assert metrics == pytest.approx({"cluster_acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_cluster_accuracy_hungarian_and_permutation_invariance() -> None:
    # Best matching: cluster 0 -> class 1, cluster 1 -> class 0; one sample left wrong.
    assert cluster_accuracy([0, 0, 1, 1, 1], [1, 1, 0, 0, 1]) == pytest.approx(0.8)
    gen = torch.Generator().manual_seed(15)
    labels = torch.randint(0, 6, (200,), generator=gen)
    noisy = torch.where(torch.rand(200, generator=gen) < 0.3, torch.randint(0, 6, (200,), generator=gen), labels)
    base = cluster_accuracy(noisy, labels)
    assert 0.6 < base < 1.0
    perm = torch.randperm(6, generator=gen)
    assert cluster_accuracy(perm[noisy], labels) == base
    assert cluster_accuracy(perm[labels], labels) == 1.0
    # More clusters than classes: the extra cluster cannot be matched and counts as wrong.
    assert cluster_accuracy([0, 1, 2, 2], [0, 1, 1, 1]) == pytest.approx(0.75)


# --------------------------------------------------------------------------- monitors


def test_feature_std_healthy_and_collapsed() -> None:
    gen = torch.Generator().manual_seed(16)
    dim = 64
    z = torch.randn(4096, dim, generator=gen)
    assert feature_std(z) == pytest.approx(1.0 / math.sqrt(dim), rel=0.05)
    # Collapse to one direction, whatever the norms: normalisation removes the scale.
    direction = torch.randn(1, dim, generator=gen)
    collapsed = direction * torch.rand(256, 1, generator=gen).add(0.5)
    assert feature_std(collapsed) < 1e-6


def test_effective_rank_isotropic_rank_one_and_exact_k() -> None:
    gen = torch.Generator().manual_seed(17)
    dim = 32
    assert effective_rank(torch.randn(4096, dim, generator=gen)) > 0.95 * dim
    u, v = torch.randn(100, 1, generator=gen), torch.randn(1, dim, generator=gen)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-4)
    # k equal singular values give exactly k.
    q, _ = torch.linalg.qr(torch.randn(100, 5, generator=gen, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(dim, 5, generator=gen, dtype=torch.float64))
    # The paper's eps on the 27 zero singular values adds ~4e-5 of entropy.
    assert effective_rank(q @ r.T) == pytest.approx(5.0, abs=1e-3)
    # Unequal singular values (3, 1): p = (3/4, 1/4), exp(entropy) from the formula itself.
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    expected = math.exp(-float((p * p.log()).sum()))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected, abs=1e-5)


# -- class-balanced label subsets (semi-supervised protocol) ------------------------------------


def test_balanced_label_subset_takes_the_fraction_of_each_class_reproducibly() -> None:
    labels = torch.cat([torch.full((100,), 0), torch.full((50,), 1), torch.full((7,), 2), torch.full((5,), -1)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(3))]
    picked = balanced_label_subset(labels, 0.1, seed=1)
    counts = torch.bincount(labels[picked], minlength=3).tolist()
    assert counts == [10, 5, 1]  # round(0.1 * n_c), at least one per class
    assert torch.equal(picked, balanced_label_subset(labels, 0.1, seed=1))
    assert not torch.equal(picked, balanced_label_subset(labels, 0.1, seed=2))
    assert picked.unique().numel() == picked.numel() and bool((labels[picked] >= 0).all())
    assert torch.equal(balanced_label_subset(labels, 1.0), torch.nonzero(labels >= 0).flatten())


def test_balanced_label_subset_draw_is_uniform_within_a_class() -> None:
    labels = torch.zeros(10, dtype=torch.long)
    hits = torch.zeros(10)
    for seed in range(2000):
        hits[balanced_label_subset(labels, 0.3, seed=seed)] += 1
    assert torch.allclose(hits / 2000, torch.full((10,), 0.3), atol=0.04)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_balanced_label_subset_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        balanced_label_subset(torch.zeros(4, dtype=torch.long), fraction)
