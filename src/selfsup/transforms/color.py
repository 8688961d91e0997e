"""CIE Lab colour conversion and the quantised ab colour space of Colorful Image Colorization.

Conversion (batched, differentiable, float32 inside even under autocast): ``rgb_to_lab`` and
``lab_to_rgb`` follow scikit-image's ``rgb2lab`` / ``lab2rgb`` exactly (sRGB companding, the
sRGB -> XYZ matrix, the D65 2-degree white point, CIE's linear segment near black), so the
tests compare against scikit-image.

Quantisation (Zhang, Isola & Efros 2016, Section 2.1): the ab plane is cut into a grid of
side 10 and only the bins that real (sRGB) colours reach are kept, giving ``Q`` classes
(``ab_gamut_bins``). Targets are soft-encoded onto the 5 nearest bins with a Gaussian kernel
of sigma 5 (``soft_encode_ab``); rare colours are up-weighted by class rebalancing
(``rebalancing_weights``); predictions are decoded by the annealed mean of the predicted
distribution (``annealed_mean``).

References:
    Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016 (arXiv:1603.08511).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "AB_GRID",
    "ab_gamut_bins",
    "ab_to_bin",
    "annealed_mean",
    "compute_ab_gamut",
    "lab_to_rgb",
    "rebalancing_weights",
    "rgb_to_lab",
    "smoothed_prior",
    "soft_encode_ab",
    "soft_encode_ab_sparse",
]

# sRGB (linear) -> XYZ, the matrix scikit-image uses (IEC 61966-2-1 primaries, D65 white).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# The D65 reference white under the CIE 1931 2-degree observer.
_WHITE_D65 = (0.95047, 1.0, 1.08883)
# CIE's threshold (6/29)^3 below which f(t) is linear, and the slope of that segment.
_EPS = 0.008856
_KAPPA = 7.787

#: Grid size of the ab quantisation (the paper's 10).
AB_GRID = 10.0


def _check_images(x: Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} expects images (B, 3, H, W), got shape {tuple(x.shape)}")


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB ``(B, 3, H, W)`` in [0, 1] -> CIE Lab ``(B, 3, H, W)`` (D65; L in [0, 100], a and
    b roughly in [-128, 127]).

    Float32 inside (also under autocast); differentiable everywhere (the cube root's branch is
    clamped so its gradient stays finite at black).
    """
    _check_images(x, "rgb_to_lab")
    with torch.autocast(x.device.type, enabled=False):
        rgb = x.float()
        # sRGB companding -> linear light; clamp so the power's gradient is finite at 0.
        linear = torch.where(rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
        matrix = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
        white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
        xyz = torch.einsum("ij,bjhw->bihw", matrix / white[:, None], linear)
        f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1.0 / 3.0), _KAPPA * xyz + 16.0 / 116.0)
        fx, fy, fz = f.unbind(1)
        return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab ``(B, 3, H, W)`` (D65) -> sRGB ``(B, 3, H, W)`` clipped to [0, 1].

    The inverse of ``rgb_to_lab``; like scikit-image, a negative Z (Lab outside the visible
    gamut) is set to 0 before the inverse companding. Float32 inside; differentiable.
    """
    _check_images(lab, "lab_to_rgb")
    with torch.autocast(lab.device.type, enabled=False):
        lab = lab.float()
        fy = (lab[:, 0] + 16.0) / 116.0
        fx = lab[:, 1] / 500.0 + fy
        fz = (fy - lab[:, 2] / 200.0).clamp_min(0.0)
        f = torch.stack((fx, fy, fz), dim=1)
        xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / _KAPPA)
        matrix = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)
        white = torch.tensor(_WHITE_D65, dtype=torch.float64)
        rgb_from_xyz = (torch.linalg.inv(matrix) * white[None, :]).to(lab.device, lab.dtype)
        linear = torch.einsum("ij,bjhw->bihw", rgb_from_xyz, xyz)
        rgb = torch.where(
            linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * linear
        )
        return rgb.clamp(0.0, 1.0)


# The in-gamut bins: for each a (a multiple of 10 from -90 to 100), the smallest and largest b
# whose grid point is the nearest bin of at least one 8-bit sRGB colour (every row's b range is
# contiguous). ``compute_ab_gamut(256)`` re-derives the table from all 2^24 colours; the tests
# check it. That gives 261 bins where the paper reports 313: the reference's ``pts_in_hull``
# (github.com/richzhang/colorization) keeps a looser set that also holds bins at the gamut's
# border which no sRGB colour rounds to; those would only ever receive soft-encoding mass.
_GAMUT_ROWS: tuple[tuple[int, int, int], ...] = (
    (-90, 80, 80),
    (-80, 40, 80),
    (-70, 20, 90),
    (-60, 0, 90),
    (-50, -20, 90),
    (-40, -30, 90),
    (-30, -40, 90),
    (-20, -40, 90),
    (-10, -50, 90),
    (0, -60, 90),
    (10, -70, 80),
    (20, -70, 80),
    (30, -80, 80),
    (40, -90, 80),
    (50, -90, 70),
    (60, -100, 70),
    (70, -110, 70),
    (80, -110, 70),
    (90, -90, 0),
    (100, -70, -50),
)


def ab_gamut_bins() -> Tensor:
    """The ``(Q, 2)`` float32 (a, b) centres of the in-gamut bins, Q = 261, sorted by a then b.

    A bin (a grid point of side ``AB_GRID`` = 10) is in gamut when it is the nearest grid point
    of the ab of some 8-bit sRGB colour at some lightness (see ``compute_ab_gamut``).
    """
    return _gamut_bins().clone()


@functools.cache
def _gamut_bins() -> Tensor:
    centres = [(a, b) for a, b_min, b_max in _GAMUT_ROWS for b in range(b_min, b_max + 1, int(AB_GRID))]
    return torch.tensor(centres, dtype=torch.float32)


def compute_ab_gamut(levels: int = 256) -> Tensor:
    """Derives the in-gamut bins from ``levels``^3 sRGB colours: ``(Q, 2)`` float32 centres of the
    grid points that are the nearest bin (side ``AB_GRID``) of some colour's ab, sorted by a then
    b. ``levels=256`` (every 8-bit colour) gives the table behind ``ab_gamut_bins``."""
    values = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    g, b = torch.meshgrid(values, values, indexing="ij")
    half = 12  # grid points -120..120 cover the sRGB ab range (|a|, |b| < 115)
    seen = torch.zeros(2 * half + 1, 2 * half + 1, dtype=torch.bool)
    for r in values:  # one slice of the cube at a time keeps memory at levels^2 colours
        lab = rgb_to_lab(torch.stack((torch.full_like(g, float(r)), g, b))[None])
        idx = torch.round(lab[0, 1:].reshape(2, -1) / AB_GRID).long() + half
        seen[idx[0], idx[1]] = True
    return ((seen.nonzero() - half) * AB_GRID).float()


def _check_ab(ab: Tensor, name: str) -> None:
    if ab.ndim != 4 or ab.shape[1] != 2:
        raise ValueError(f"{name} expects ab maps (B, 2, H, W), got shape {tuple(ab.shape)}")


def _squared_distances(ab: Tensor, bins: Tensor) -> Tensor:
    """``(B, 2, H, W)``, ``(Q, 2)`` -> ``(B, H, W, Q)`` float32 squared ab distances to every bin."""
    points = ab.float().permute(0, 2, 3, 1)
    return torch.cdist(points.reshape(-1, 2), bins.to(points)).pow(2).view(*points.shape[:-1], -1)


def ab_to_bin(ab: Tensor, bins: Tensor) -> Tensor:
    """Hard quantisation: ``(B, 2, H, W)`` ab -> ``(B, H, W)`` int64 index of the nearest bin
    among ``bins`` ``(Q, 2)``."""
    _check_ab(ab, "ab_to_bin")
    return _squared_distances(ab, bins).argmin(-1)


# Side of the cells of the nearest-bin lookup table (half the bin grid: 13 candidates per cell
# for the 261 gamut bins and 5 neighbours, instead of all 261).
_LOOKUP_CELL = AB_GRID / 2
# Cells are widened by this much on every side when their candidates are chosen, so a point that
# float32 rounding puts into a neighbouring cell still lies in the region the proof covers.
_LOOKUP_SLACK = 1e-3


@functools.lru_cache(maxsize=16)
def _candidate_table(centres: tuple[float, ...], neighbours: int, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidate bins of every cell of a grid over the bins' range: ``(origin (2,),
    shape (2,) int64, table (cells, C) int64, padded bins (Q + 1, 2) float64)`` on ``device``.

    Exactness. For a point ``p`` in a (closed, axis-aligned) cell, let ``R`` be the
    ``neighbours``-th smallest, over bins ``q``, of ``dmax(q)``, the largest distance from ``q``
    to any point of the cell. Those ``neighbours`` bins are all within ``R`` of ``p``, so ``p``'s
    ``neighbours``-th nearest distance is at most ``R``, and every bin among ``p``'s
    ``neighbours`` nearest has ``dmin(q) <= d(p, q) <= R``, ``dmin`` the smallest distance from
    ``q`` to the cell. The cell's candidates are therefore the bins with ``dmin(q) <= R`` (ties
    included); this holds wherever the bins are, gamut edge included, where the nearest bins of
    a point can be far from its own grid point. Rows are padded to the longest with index ``Q``,
    a bin at infinity. The grid covers the bins' bounding box plus one bin width; points outside
    it are rare (no sRGB colour goes there) and are searched over all bins.
    """
    bins = torch.tensor(centres, dtype=torch.float64).view(-1, 2)
    cell, pad = _LOOKUP_CELL, AB_GRID
    origin = bins.min(0).values - pad
    shape = torch.ceil((bins.max(0).values + pad - origin) / cell).long()
    corner = [origin[d] + torch.arange(int(shape[d]), dtype=torch.float64) * cell for d in range(2)]
    lo = torch.stack(torch.meshgrid(*corner, indexing="ij"), -1).reshape(-1, 1, 2) - _LOOKUP_SLACK  # (cells, 1, 2)
    hi = lo + cell + 2 * _LOOKUP_SLACK
    gap = torch.maximum(lo - bins, bins - hi).clamp_min(0.0)  # (cells, Q, 2) per-axis distance to the cell
    far = torch.maximum((bins - lo).abs(), (bins - hi).abs())  # per-axis distance to the far side
    dmin2, dmax2 = gap.pow(2).sum(-1), far.pow(2).sum(-1)
    radius2 = dmax2.kthvalue(neighbours, dim=1, keepdim=True).values
    candidate = dmin2 <= radius2
    width = int(candidate.sum(1).max())
    # Candidates first (in bin order), then padding.
    order = torch.sort((~candidate).to(torch.int8), dim=1, stable=True).indices[:, :width]
    table = torch.where(candidate.gather(1, order), order, bins.shape[0])
    padded = torch.cat([bins, torch.full((1, 2), float("inf"), dtype=torch.float64)])
    return (
        origin.float().to(device),
        shape.to(device),
        table.to(device),
        padded.to(device),
    )


def _nearest_bins(points: Tensor, bins: Tensor, neighbours: int) -> tuple[Tensor, Tensor]:
    """``(N, 2)`` float32 points -> ``(squared distance, index)`` of their ``neighbours`` nearest
    of ``bins`` ``(Q, 2)``, each ``(N, neighbours)`` (float64, int64), nearest first. Float64:
    far from the bins, d^2 is large and float32 would cost the Gaussian weights ~1e-5 of
    accuracy (the candidates are few, so it is cheap). Distances go only to the
    candidates of each point's lookup cell (``_candidate_table``); the result equals a search
    over all bins up to the order of equidistant bins."""
    if not 1 <= neighbours <= bins.shape[0]:
        raise ValueError(f"neighbours must be in [1, {bins.shape[0]}] (the number of bins), got {neighbours}")
    key = tuple(bins.detach().double().flatten().tolist())
    origin, shape, table, padded = _candidate_table(key, neighbours, str(points.device))
    rel = (points - origin) / _LOOKUP_CELL
    inside = ((rel >= 0) & (rel <= shape)).all(1)
    cell = torch.minimum(rel.nan_to_num(0.0).clamp(min=0.0).floor().long(), shape - 1)
    candidates = table[cell[:, 0] * shape[1] + cell[:, 1]]  # (N, C)
    # Per coordinate: gathering (N, C, 2) and summing over the last dimension is twice as slow.
    points64 = points.double()
    dx = points64[:, :1] - padded[:, 0][candidates]
    dy = points64[:, 1:] - padded[:, 1][candidates]
    dist2 = dx * dx + dy * dy
    dist2, pick = dist2.topk(neighbours, dim=-1, largest=False, sorted=True)
    index = candidates.gather(1, pick)
    if not bool(inside.all()):
        # Far outside the bins' range (out-of-gamut input): search every bin for those points.
        rows = (~inside).nonzero().squeeze(1)
        full = (points.double()[rows, None, :] - bins.double()).pow(2).sum(-1)
        d_out, i_out = full.topk(neighbours, dim=-1, largest=False, sorted=True)
        dist2, index = dist2.index_put((rows,), d_out), index.index_put((rows,), i_out)
    return dist2, index


def soft_encode_ab_sparse(ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0) -> tuple[Tensor, Tensor]:
    """The soft encoding of ``soft_encode_ab`` as its non-zero entries: ``(index, weight)``, each
    ``(B, H, W, neighbours)``, the bins nearest first (``index[..., 0]`` is the hard bin and the
    encoding's argmax), the Gaussian weights summing to 1 over the last dimension.

    The nearest bins come from a lookup table of each grid cell's candidate bins (built once per
    set of bins; see ``_candidate_table`` for why it is exact), so the cost is ~13 distances per
    position instead of Q = 261.
    """
    _check_ab(ab, "soft_encode_ab")
    with torch.autocast(ab.device.type, enabled=False):
        points = ab.float().permute(0, 2, 3, 1)
        dist2, nearest = _nearest_bins(points.reshape(-1, 2), bins.to(points), neighbours)
        shape = (*points.shape[:-1], neighbours)
        # The normalised Gaussian kernel; relative to the nearest bin, so every exp is <= 1
        # (softmax over a dimension of 5 is slower than writing it out).
        kernel = torch.exp((dist2[:, :1] - dist2) / (2.0 * sigma**2))
        weight = (kernel / kernel.sum(dim=1, keepdim=True)).float()
        return nearest.view(shape), weight.view(shape)


def soft_encode_ab(ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Soft-encodes ab ``(B, 2, H, W)`` onto ``bins`` ``(Q, 2)``: ``(B, Q, H, W)`` float32 whose
    every pixel sums to 1, with mass only on its ``neighbours`` nearest bins, weighted by a
    Gaussian kernel of width ``sigma`` around the true ab (the paper's 5 neighbours, sigma = 5).
    """
    nearest, weights = soft_encode_ab_sparse(ab, bins, neighbours, sigma)
    encoded = torch.zeros(*nearest.shape[:-1], bins.shape[0], dtype=weights.dtype, device=ab.device)
    return encoded.scatter_(-1, nearest, weights).permute(0, 3, 1, 2)


def rebalancing_weights(prior: Tensor, bins: Tensor, lam: float = 0.5, sigma: float = 5.0) -> Tensor:
    """Class-rebalancing weights ``(Q,)`` from the empirical bin distribution ``prior`` ``(Q,)``.

    ``p~`` = ``prior`` smoothed by a Gaussian kernel of width ``sigma`` over the bin centres
    (renormalised); ``w ∝ ((1 - lam) p~ + lam / Q)^-1``, scaled so that ``sum_q p~_q w_q = 1``
    (the paper's lam = 0.5, sigma = 5). Rare colours get up to ``1 / lam`` times more weight
    than under a uniform prior, the common desaturated ones less.
    """
    if prior.ndim != 1 or prior.shape[0] != bins.shape[0]:
        raise ValueError(f"rebalancing_weights expects a prior of shape ({bins.shape[0]},), got {tuple(prior.shape)}")
    smoothed = _smooth(prior, bins, sigma)
    w = 1.0 / ((1.0 - lam) * smoothed + lam / bins.shape[0])
    w = w / (smoothed * w).sum()
    return w.float()


def smoothed_prior(prior: Tensor, bins: Tensor, sigma: float = 5.0) -> Tensor:
    """``prior`` ``(Q,)`` smoothed by a Gaussian of width ``sigma`` over the bin centres, summing
    to 1 (the ``p~`` under which ``rebalancing_weights`` have expectation 1)."""
    return _smooth(prior, bins, sigma).float()


def _smooth(prior: Tensor, bins: Tensor, sigma: float) -> Tensor:
    """Float64 Gaussian smoothing of a histogram over the bin centres, normalised to sum 1."""
    p = prior.double() / prior.double().sum().clamp_min(1e-30)
    centres = bins.to(p)
    smoothed = torch.exp(-torch.cdist(centres, centres).pow(2) / (2.0 * sigma**2)) @ p
    return smoothed / smoothed.sum()


def annealed_mean(logits: Tensor, bins: Tensor, temperature: float = 0.38) -> Tensor:
    """Decodes predicted bin distributions ``(B, Q, H, W)`` (logits) to ab ``(B, 2, H, W)``.

    ``f_T(z) = exp(log z / T) / sum_q exp(log z_q / T)`` re-tempers the distribution ``z`` and
    its mean over the bin centres is the prediction: T = 1 is the mean (desaturated), T -> 0 the
    mode (vivid but patchy); the paper's T = 0.38 sits in between.
    """
    if logits.ndim != 4 or logits.shape[1] != bins.shape[0]:
        raise ValueError(f"annealed_mean expects logits (B, {bins.shape[0]}, H, W), got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"annealed_mean temperature must be > 0, got {temperature}")
    with torch.autocast(logits.device.type, enabled=False):
        log_z = torch.log_softmax(logits.float(), dim=1)
        f = torch.softmax(log_z / temperature, dim=1)
        return torch.einsum("bqhw,qc->bchw", f, bins.to(f))
