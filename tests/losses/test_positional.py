"""DropPos's position smoothing, attentive weights and position loss against float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import droppos_loss, patch_similarity_weights, position_smoothing_targets


def ref_smoothing(grid_h: int, grid_w: int, sigma: float) -> list[list[float]]:
    """The paper's Gaussian over 2-D grid distance, row-normalised, written out plainly."""
    num = grid_h * grid_w
    rows = []
    for i in range(num):
        yi, xi = divmod(i, grid_w)
        row = []
        for j in range(num):
            yj, xj = divmod(j, grid_w)
            row.append(math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / sigma**2))
        total = sum(row)
        rows.append([v / total for v in row])
    return rows


@pytest.mark.parametrize(("grid_h", "grid_w", "sigma"), [(3, 3, 1.0), (4, 5, 0.7), (2, 6, 2.5)])
def test_smoothing_targets_match_the_gaussian_rows_sum_to_one_and_peak_at_the_truth(
    grid_h: int, grid_w: int, sigma: float
) -> None:
    got = position_smoothing_targets(grid_h, grid_w, sigma, dtype=torch.float64)
    expected = torch.tensor(ref_smoothing(grid_h, grid_w, sigma), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(1), torch.ones(grid_h * grid_w, dtype=torch.float64))
    assert torch.equal(got.argmax(1), torch.arange(grid_h * grid_w))
    # The true position is the strict maximum of its row.
    top2 = got.topk(2, dim=1).values
    assert torch.all(top2[:, 0] > top2[:, 1])


def test_smoothing_with_sigma_zero_is_one_hot_and_negative_sigma_is_refused() -> None:
    assert torch.equal(position_smoothing_targets(3, 4, 0.0), torch.eye(12))
    # A tiny sigma tends to the one-hot labels continuously.
    torch.testing.assert_close(position_smoothing_targets(3, 4, 0.05), torch.eye(12))
    with pytest.raises(ValueError, match="sigma"):
        position_smoothing_targets(3, 3, -1.0)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, k, num = 3, 5, 12
    logits = torch.randn(b, k, num, generator=g, dtype=torch.float64)
    positions = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(b)])
    dropped = torch.rand(b, k, generator=g) < 0.6
    dropped[:, 0] = True
    return logits, positions, dropped


def ref_droppos(
    logits: torch.Tensor,
    positions: torch.Tensor,
    dropped: torch.Tensor,
    targets: list[list[float]],
    weights: torch.Tensor | None,
) -> tuple[float, float]:
    total, wsum, hits, count = 0.0, 0.0, 0, 0
    b, k, num = logits.shape
    for i in range(b):
        for j in range(k):
            if not bool(dropped[i, j]):
                continue
            row = [float(v) for v in logits[i, j]]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            label = int(positions[i, j])
            ce = -sum(targets[label][c] * (row[c] - log_z) for c in range(num))
            w = 1.0 if weights is None else float(weights[i, j])
            total += w * ce
            wsum += w
            hits += int(max(range(num), key=lambda c: row[c]) == label)
            count += 1
    return total / wsum, hits / count


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_droppos_loss_matches_the_float64_formula(sigma: float, weighted: bool) -> None:
    logits, positions, dropped = _inputs()
    weights = torch.rand(3, 5, dtype=torch.float64) if weighted else None
    targets = position_smoothing_targets(3, 4, sigma, dtype=torch.float64)
    loss, acc = droppos_loss(logits, positions, dropped, targets, weights)
    ref_targets = ref_smoothing(3, 4, sigma) if sigma else [[float(i == j) for j in range(12)] for i in range(12)]
    exp_loss, exp_acc = ref_droppos(logits, positions, dropped, ref_targets, weights)
    assert float(loss) == pytest.approx(exp_loss, rel=1e-10)
    assert float(acc) == pytest.approx(exp_acc)


def test_only_dropped_patches_count_and_targets_get_no_gradient() -> None:
    logits, positions, dropped = _inputs(1)
    logits.requires_grad_(True)
    targets = position_smoothing_targets(3, 4, 1.0, dtype=torch.float64).requires_grad_(True)
    weights = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    loss, acc = droppos_loss(logits, positions, dropped, targets, weights)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[~dropped] == 0) and torch.all(logits.grad[dropped].abs().sum(-1) > 0)
    assert targets.grad is None and weights.grad is None and not acc.requires_grad


def test_perfect_logits_give_full_accuracy_and_the_labels_are_the_true_indices() -> None:
    logits, positions, dropped = _inputs(2)
    perfect = torch.nn.functional.one_hot(positions, 12).double() * 50
    loss, acc = droppos_loss(perfect, positions, dropped, torch.eye(12, dtype=torch.float64))
    assert float(acc) == 1.0 and float(loss) < 1e-12
    # One wrong label among the dropped patches: accuracy drops by exactly one count.
    wrong = positions.clone()
    wrong[0, 0] = (positions[0, 0] + 1) % 12
    _, acc = droppos_loss(perfect, wrong, dropped, torch.eye(12, dtype=torch.float64))
    assert float(acc) == pytest.approx(1 - 1 / int(dropped.sum()))


def test_patch_similarity_weights_match_the_formula() -> None:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 1 + 9, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([[0, 4, 7], [1, 2, 8]])
    got = patch_similarity_weights(tokens, keep, temperature=0.1)
    for b in range(2):
        cls = tokens[b, 0]
        sims = [float(cls @ tokens[b, 1 + j] / (cls.norm() * tokens[b, 1 + j].norm())) for j in range(9)]
        soft = [math.exp(s / 0.1) for s in sims]
        soft = [v / sum(soft) for v in soft]
        kept = [soft[int(j)] for j in keep[b]]
        expected = [v / sum(kept) for v in kept]
        torch.testing.assert_close(got[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
