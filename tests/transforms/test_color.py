"""Tests for selfsup.transforms.color: Lab conversion against scikit-image, and the quantised ab
space of Colorful Image Colorization (bins, soft encoding, rebalancing, annealed mean)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from selfsup.transforms import ab_gamut_bins, ab_to_bin, annealed_mean, lab_to_rgb, rgb_to_lab, soft_encode_ab
from selfsup.transforms.color import compute_ab_gamut, rebalancing_weights, smoothed_prior, soft_encode_ab_sparse


def _rgb(seed: int = 0, shape: tuple[int, ...] = (3, 3, 10, 12)) -> torch.Tensor:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # black, white and the primaries hit both branches of every curve
    x[0, :, 0, 1] = 1.0
    x[0, :, 0, 2:5] = torch.eye(3)
    x[0, :, 1, 0] = 0.02  # below the sRGB linear-segment threshold
    return x


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).double().numpy()


def test_rgb_to_lab_matches_skimage() -> None:
    x = _rgb()
    lab = rgb_to_lab(x.float())
    assert lab.dtype == torch.float32 and lab.shape == x.shape
    np.testing.assert_allclose(_nhwc(lab), rgb2lab(_nhwc(x)), atol=2e-4)


def test_lab_to_rgb_matches_skimage_and_inverts() -> None:
    x = _rgb(1)
    lab = torch.from_numpy(rgb2lab(_nhwc(x))).permute(0, 3, 1, 2).float()
    rgb = lab_to_rgb(lab)
    np.testing.assert_allclose(_nhwc(rgb), lab2rgb(_nhwc(lab)), atol=2e-5)
    torch.testing.assert_close(rgb.double(), x, atol=2e-5, rtol=0)
    # Lab outside the sRGB gamut: clipped to [0, 1] like scikit-image (negative Z set to 0).
    g = torch.Generator().manual_seed(2)
    wild = torch.cat([torch.rand(2, 1, 6, 6, generator=g) * 100, (torch.rand(2, 2, 6, 6, generator=g) - 0.5) * 250], 1)
    out = lab_to_rgb(wild)
    assert out.min() >= 0 and out.max() <= 1
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(_nhwc(out), lab2rgb(_nhwc(wild)), atol=2e-5)


def test_lab_conversion_is_differentiable_and_float32_under_autocast() -> None:
    x = _rgb(3).float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab = rgb_to_lab(x)
        back = lab_to_rgb(lab)
    assert lab.dtype == torch.float32 and back.dtype == torch.float32
    (lab.sum() + back.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rgb_to_lab(torch.rand(2, 1, 4, 4))


def test_gamut_bins_are_derived_from_srgb() -> None:
    bins = ab_gamut_bins()
    assert bins.shape == (261, 2)
    assert torch.equal(bins % 10, torch.zeros_like(bins))
    # A 64-level cube already reaches every bin of the table (the full 8-bit cube is the slow test).
    assert torch.equal(compute_ab_gamut(64), bins)
    # Every sRGB colour's nearest grid point is in the table.
    lab = rgb_to_lab(_rgb(4).float())
    nearest = torch.round(lab[:, 1:] / 10) * 10
    hard = bins[ab_to_bin(lab[:, 1:], bins)].permute(0, 3, 1, 2)
    torch.testing.assert_close(hard, nearest)


@pytest.mark.slow
def test_gamut_table_equals_all_8bit_colours() -> None:
    assert torch.equal(compute_ab_gamut(256), ab_gamut_bins())


def test_quantisation_round_trips_within_half_a_bin() -> None:
    bins = ab_gamut_bins()
    ab = rgb_to_lab(_rgb(5, (4, 3, 16, 16)).float())[:, 1:]  # in-gamut ab
    recovered = bins[ab_to_bin(ab, bins)].permute(0, 3, 1, 2)
    assert (recovered - ab).abs().max() <= 5.0 + 1e-4


def test_soft_encoding_five_gaussian_neighbours() -> None:
    bins = ab_gamut_bins()
    ab = rgb_to_lab(_rgb(6).float())[:, 1:]
    enc = soft_encode_ab(ab, bins)
    assert enc.shape == (ab.shape[0], bins.shape[0], *ab.shape[2:])
    torch.testing.assert_close(enc.sum(1), torch.ones_like(enc[:, 0]))
    assert ((enc > 0).sum(1) == 5).all()
    # One pixel against the paper's formula in float64: Gaussian(sigma = 5) of the distance to
    # each of the 5 nearest centres, normalised.
    point = ab[0, :, 2, 3].double()
    d = (bins.double() - point).norm(dim=1)
    near = d.argsort()[:5]
    expected = torch.zeros(bins.shape[0], dtype=torch.float64)
    expected[near] = torch.exp(-(d[near] ** 2) / (2 * 5.0**2))
    expected /= expected.sum()
    torch.testing.assert_close(enc[0, :, 2, 3].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("neighbours", "grid_bins"), [(5, True), (1, True), (10, True), (5, False)])
def test_sparse_soft_encoding_equals_a_float64_search_over_all_bins(neighbours: int, grid_bins: bool) -> None:
    """The lookup-table search gives the brute-force answer: the same nearest bins in the same
    order (up to the order of equidistant bins) and the same Gaussian weights, for in-gamut
    colours, points exactly on bins and halfway between them (cell borders, many ties),
    out-of-gamut points near the gamut's edge and far outside the table's range; also for
    bins off the grid (the table's proof does not rely on the grid)."""
    g = torch.Generator().manual_seed(9)
    bins = ab_gamut_bins() if grid_bins else (torch.rand(150, 2, generator=g) - 0.5) * 200
    srgb = rgb_to_lab(_rgb(10, (2, 3, 8, 8)).float())[:, 1:]
    wide = (torch.rand(4, 2, 8, 8, generator=g) - 0.5) * 300  # out of gamut, partly beyond the table
    ties = torch.round((torch.rand(4, 2, 8, 8, generator=g) - 0.5) * 260 / 5) * 5  # on bins / midpoints
    ab = torch.cat([srgb, wide, ties])
    index, weight = soft_encode_ab_sparse(ab, bins, neighbours=neighbours, sigma=5.0)
    assert index.shape == weight.shape == (ab.shape[0], 8, 8, neighbours)

    points = ab.double().permute(0, 2, 3, 1).reshape(-1, 1, 2)
    dist2 = ((points - bins.double()) ** 2).sum(-1)  # (N, Q)
    ref_d2, ref_index = dist2.sort(dim=1, stable=True)
    got_d2 = dist2.gather(1, index.reshape(-1, neighbours))
    # The chosen bins are at exactly the k smallest distances, nearest first.
    torch.testing.assert_close(got_d2, ref_d2[:, :neighbours], atol=1e-9, rtol=0)
    # Where no two of the k + 1 nearest are equidistant, the indices are the reference's.
    gaps = ref_d2[:, 1 : neighbours + 1] - ref_d2[:, :neighbours]
    distinct = (gaps > 1e-6).all(1)
    assert distinct.sum() > 100 and (not grid_bins or (~distinct).sum() > 10)  # ties: grid bins only
    assert torch.equal(index.reshape(-1, neighbours)[distinct], ref_index[distinct, :neighbours])
    # Gaussian weights (sigma 5) of the k nearest distances, normalised.
    kernel = torch.exp(-ref_d2[:, :neighbours] / (2 * 5.0**2))
    torch.testing.assert_close(
        weight.reshape(-1, neighbours).double(), kernel / kernel.sum(1, keepdim=True), atol=1e-6, rtol=0
    )


def test_rebalancing_weights_have_unit_expectation() -> None:
    bins = ab_gamut_bins()
    counts = torch.rand(bins.shape[0], generator=torch.Generator().manual_seed(7)) ** 4 * 1000
    w = rebalancing_weights(counts, bins)
    p = smoothed_prior(counts, bins).double()
    assert (w > 0).all()
    torch.testing.assert_close((p * w.double()).sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    # Independent float64 computation: smooth with a Gaussian over the centres, mix with uniform.
    c = bins.double()
    kernel = torch.exp(-((c[:, None] - c[None]) ** 2).sum(-1) / 50.0)
    p_ref = kernel @ (counts.double() / counts.double().sum())
    p_ref /= p_ref.sum()
    w_ref = 1.0 / (0.5 * p_ref + 0.5 / len(c))
    w_ref /= (p_ref * w_ref).sum()
    torch.testing.assert_close(w.double(), w_ref, atol=1e-5, rtol=1e-5)
    # Rarer colours get more weight; lam = 1 gives uniform weights.
    assert w[p.argmin()] > w[p.argmax()]
    torch.testing.assert_close(rebalancing_weights(counts, bins, lam=1.0), torch.ones(len(c)))


def test_annealed_mean_limits() -> None:
    bins = ab_gamut_bins()
    logits = torch.randn(2, bins.shape[0], 3, 4, generator=torch.Generator().manual_seed(8)) * 3
    probs = logits.softmax(1)
    mean = torch.einsum("bqhw,qc->bchw", probs, bins)
    torch.testing.assert_close(annealed_mean(logits, bins, temperature=1.0), mean, atol=1e-4, rtol=1e-5)
    mode = bins[logits.argmax(1)].permute(0, 3, 1, 2)
    torch.testing.assert_close(annealed_mean(logits, bins, temperature=1e-3), mode, atol=1e-3, rtol=0)
    mid = annealed_mean(logits, bins)  # T = 0.38: between the mean and the mode
    assert (mid - mode).abs().mean() < (mean - mode).abs().mean()
    with pytest.raises(ValueError, match="temperature"):
        annealed_mean(logits, bins, temperature=0.0)
