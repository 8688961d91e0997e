"""Batched Histogram of Oriented Gradients (HOG) in torch: a hand-crafted baseline and a target.

HOG features sit beside raw pixels in every results table (kNN and linear probe on the
same features), and MaskFeat regresses them as its reconstruction target; both use
:func:`hog`. The definition is scikit-image's ``skimage.feature.hog`` (with
``feature_vector=True``, ``transform_sqrt=False``), computed for a whole batch at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BLOCK_NORMS", "hog", "hog_dim"]

BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")

# Dalal & Triggs' L2-Hys clips the L2-normalised block at 0.2 before renormalising.
_HYS_CLIP = 0.2


def _grid(image_size: int | tuple[int, int], pixels_per_cell: int, cells_per_block: int) -> tuple[int, int, int, int]:
    """Return ``(cells_row, cells_col, blocks_row, blocks_col)``; a ValueError when no block fits."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if pixels_per_cell < 1 or cells_per_block < 1:
        raise ValueError(
            f"pixels_per_cell and cells_per_block must be >= 1, got {pixels_per_cell} and {cells_per_block}"
        )
    cells_row, cells_col = height // pixels_per_cell, width // pixels_per_cell
    blocks_row, blocks_col = cells_row - cells_per_block + 1, cells_col - cells_per_block + 1
    if blocks_row <= 0 or blocks_col <= 0:
        side = pixels_per_cell * cells_per_block
        raise ValueError(
            f"HOG needs images of at least {side}x{side} pixels for pixels_per_cell={pixels_per_cell} and "
            f"cells_per_block={cells_per_block}, got {height}x{width}"
        )
    return cells_row, cells_col, blocks_row, blocks_col


def hog_dim(
    image_size: int | tuple[int, int],
    orientations: int = 9,
    pixels_per_cell: int = 4,
    cells_per_block: int = 2,
) -> int:
    """Return the length ``D`` of :func:`hog`'s feature vector for ``image_size`` (side or ``(H, W)``).

    ``D = blocks_row * blocks_col * cells_per_block**2 * orientations`` with
    ``blocks = H // pixels_per_cell - cells_per_block + 1``; 1296 for 28 px and the defaults.
    """
    _, _, blocks_row, blocks_col = _grid(image_size, pixels_per_cell, cells_per_block)
    return blocks_row * blocks_col * cells_per_block**2 * orientations


def _central_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(g_row, g_col)``, each ``(B, C, H, W)``: ``x[i+1] - x[i-1]``, zero on the image border.

    skimage sets the border rows (for ``g_row``) and columns (for ``g_col``) to zero instead
    of padding the image, so the border pixels vote with the other axis' gradient only.
    """
    g_row = F.pad(images[:, :, 2:, :] - images[:, :, :-2, :], (0, 0, 1, 1))
    g_col = F.pad(images[:, :, :, 2:] - images[:, :, :, :-2], (1, 1, 0, 0))
    return g_row, g_col


def _normalize_blocks(blocks: Tensor, block_norm: str, eps: float) -> Tensor:
    """Normalise each block over its last axis (``cells_per_block**2 * orientations`` values)."""
    if block_norm == "L1":
        return blocks / (blocks.abs().sum(-1, keepdim=True) + eps)
    if block_norm == "L1-sqrt":
        return torch.sqrt(blocks / (blocks.abs().sum(-1, keepdim=True) + eps))
    # skimage puts eps squared inside the square root for both L2 variants.
    out = blocks / torch.sqrt(blocks.square().sum(-1, keepdim=True) + eps**2)
    if block_norm == "L2":
        return out
    out = out.clamp(max=_HYS_CLIP)
    return out / torch.sqrt(out.square().sum(-1, keepdim=True) + eps**2)


def hog(
    images: Tensor,
    orientations: int = 9,
    pixels_per_cell: int = 4,
    cells_per_block: int = 2,
    block_norm: str = "L2-Hys",
    eps: float = 1e-5,
) -> Tensor:
    """Return the HOG descriptor of every image in a batch, as scikit-image computes it.

    Steps (Dalal & Triggs 2005, without their Gaussian block window and with hard binning):

    1. central-difference gradients ``g_row = x[r+1] - x[r-1]``, ``g_col = x[c+1] - x[c-1]``,
       zero on the image's first and last row (``g_row``) and column (``g_col``);
    2. for ``C > 1`` channels, per pixel the channel whose gradient magnitude is largest
       (the first such channel on ties);
    3. unsigned orientation ``atan2(g_row, g_col)`` in degrees modulo 180; pixel votes its
       magnitude into the one bin ``i`` with ``180 i / n <= angle < 180 (i + 1) / n``
       (no interpolation between bins or cells); each cell's histogram is the mean over its
       ``pixels_per_cell**2`` pixels; only the ``H // pixels_per_cell`` by
       ``W // pixels_per_cell`` cells that fit, from the top-left corner, are used;
    4. overlapping blocks of ``cells_per_block x cells_per_block`` cells, stride one cell,
       each normalised on its own: ``L1`` ``v / (|v|_1 + eps)``, ``L1-sqrt`` its square root,
       ``L2`` ``v / sqrt(|v|_2^2 + eps^2)``, ``L2-Hys`` that clipped at 0.2 and L2-normalised
       again (the paper's choice and the default);
    5. flattened in the order ``(blocks_row, blocks_col, cells_row, cells_col, orientations)``.

    Equivalent to ``skimage.feature.hog(image, orientations, (p, p), (c, c), block_norm,
    transform_sqrt=False, feature_vector=True)`` on each ``(H, W)`` image, or with
    ``channel_axis=-1`` on each ``(H, W, C)`` image, to float32 rounding (the tests check
    it against scikit-image in float64). The defaults (9 orientations, 4 px cells, 2 x 2
    blocks, L2-Hys) give the 1296-d descriptor used as the Fashion-MNIST baseline; the
    paper's 8 px cells and 2 x 2 blocks suit larger images.

    Gradients and orientations are computed in float64 (float32 on MPS, which lacks it), so
    that every pixel lands in the same bin as scikit-image's float64 computation even for
    quantised images; histograms and normalisation use the output dtype.

    Args:
        images: ``(B, C, H, W)`` images, any scale (HOG is invariant to it up to ``eps``);
            integer images are converted to float.
        orientations: number of orientation bins over [0, 180) degrees.
        pixels_per_cell: side of a square cell, in pixels.
        cells_per_block: side of a square block, in cells.
        block_norm: one of ``"L1"``, ``"L1-sqrt"``, ``"L2"``, ``"L2-Hys"``.
        eps: avoids division by zero in flat blocks, placed as in scikit-image.

    Returns:
        ``(B, D)`` features with ``D = hog_dim((H, W), orientations, pixels_per_cell,
        cells_per_block)``, on the input's device; float32 (float64 for float64 input).
        A constant image gives zeros.

    References:
        Dalal & Triggs, "Histograms of Oriented Gradients for Human Detection", CVPR 2005;
        scikit-image's ``skimage.feature.hog``.
    """
    if images.ndim != 4:
        raise ValueError(f"hog expects images of shape (B, C, H, W), got {tuple(images.shape)}")
    if orientations < 1:
        raise ValueError(f"orientations must be >= 1, got {orientations}")
    if block_norm not in BLOCK_NORMS:
        raise ValueError(f"block_norm must be one of {BLOCK_NORMS}, got {block_norm!r}")
    batch, channels, height, width = images.shape
    cells_row, cells_col, blocks_row, blocks_col = _grid((height, width), pixels_per_cell, cells_per_block)
    out_dtype = torch.promote_types(images.dtype, torch.float32)
    compute_dtype = torch.float32 if images.device.type == "mps" else torch.float64

    g_row, g_col = _central_gradients(images.to(compute_dtype))
    magnitude = torch.hypot(g_row, g_col)
    if channels > 1:
        best = magnitude.argmax(dim=1, keepdim=True)
        g_row, g_col, magnitude = g_row.gather(1, best), g_col.gather(1, best), magnitude.gather(1, best)
    # Only the cells that fit are histogrammed; the gradients above still see the whole image.
    rows, cols = cells_row * pixels_per_cell, cells_col * pixels_per_cell
    g_row, g_col, magnitude = g_row[..., :rows, :cols], g_col[..., :rows, :cols], magnitude[..., :rows, :cols]

    # Same arithmetic as skimage (degrees, then a floored remainder like NumPy's %) so a pixel
    # on a bin edge falls on the same side. Quantised images (k/255) have many gradients at
    # exactly 45 or 135 degrees; float64 keeps their differences of float32 pixels exact, where
    # float32 rounding would scatter them across the edge (a bin edge for 4 or 8 orientations).
    angle = torch.remainder(torch.atan2(g_row, g_col) * (180.0 / math.pi), 180.0)
    # Bin i holds w * i <= angle < w * (i + 1), w = 180 / n, with the edges rounded as skimage
    # rounds them; a tiny negative angle whose wrap rounded up to exactly 180 lies in no bin.
    bin_width = 180.0 / orientations
    upper_edges = [bin_width * (i + 1) for i in range(orientations)]
    edges = torch.tensor(upper_edges, dtype=compute_dtype, device=images.device)
    bins = torch.bucketize(angle, edges, right=True)  # (B, 1, rows, cols); == orientations: no bin

    # Each cell's pixels side by side, (B, cells, pixels_per_cell**2), to scatter-add their
    # magnitudes into the cell's bins; the extra bin n collects the "no bin" pixels.
    def by_cell(t: Tensor) -> Tensor:
        t = t.reshape(batch, cells_row, pixels_per_cell, cells_col, pixels_per_cell).transpose(2, 3)
        return t.reshape(batch, cells_row * cells_col, pixels_per_cell**2)

    # On CUDA the adds within a cell run in any order (float32 last-bit differences between
    # runs) unless torch.use_deterministic_algorithms is on; on CPU they are sequential.
    cell_hist = torch.zeros(batch, cells_row * cells_col, orientations + 1, dtype=out_dtype, device=images.device)
    cell_hist.scatter_add_(2, by_cell(bins), by_cell(magnitude.to(out_dtype)))
    cell_hist = cell_hist[..., :orientations].reshape(batch, cells_row, cells_col, orientations) / pixels_per_cell**2

    # (B, blocks_row, blocks_col, n, b, b) -> (B, blocks_row, blocks_col, b, b, n), skimage's order.
    blocks = cell_hist.unfold(1, cells_per_block, 1).unfold(2, cells_per_block, 1).permute(0, 1, 2, 4, 5, 3)
    blocks = blocks.reshape(batch, blocks_row * blocks_col, cells_per_block**2 * orientations)
    return _normalize_blocks(blocks, block_norm, eps).reshape(batch, -1)
