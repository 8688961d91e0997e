"""Patch mask generators and index helpers for masked image modelling.

Every mask is a bool tensor `(B, L)` over the row-major patch grid with **True = masked**
(hidden from the encoder, or replaced by a mask token). All randomness comes from the
``torch.Generator`` passed in, so a seeded generator reproduces the masks exactly; samples
are drawn on the generator's device and the result is moved to ``device`` (default: the
generator's device, or CPU without a generator).

References: He et al. 2021, MAE, arXiv:2111.06377 (random and grid masking);
Bao et al. 2021, BEiT, arXiv:2106.08254 (blockwise masking).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "random_mask",
    "block_mask",
    "grid_mask",
    "mask_to_keep_indices",
    "mask_to_shuffle_indices",
    "fill_masked_tokens",
]


def _devices(generator: torch.Generator | None, device: torch.device | str | None) -> tuple[torch.device, torch.device]:
    """Return (device to sample on, device of the result)."""
    sample_device = generator.device if generator is not None else torch.device("cpu")
    out_device = torch.device(device) if device is not None else sample_device
    return sample_device, out_device


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")


def random_mask(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mask exactly ``round(mask_ratio * L)`` uniformly random patches per sample.

    Each sample gets an independent uniformly random subset (argsort of uniform noise, as in
    MAE), so every row has the same number of masked patches and can be passed to
    :func:`mask_to_keep_indices`. ``round`` is Python's (half to even).

    Args:
        batch: number of samples ``B``.
        num_patches: number of patches ``L`` per sample.
        mask_ratio: fraction of patches to mask, in ``[0, 1]`` (MAE default 0.75).
        generator: source of randomness; samples are drawn on its device.
        device: device of the result (default: the generator's device).

    Returns:
        `(B, L)` bool mask, True = masked.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    _check_ratio(mask_ratio)
    sample_device, out_device = _devices(generator, device)
    num_masked = round(mask_ratio * num_patches)
    noise = torch.rand(batch, num_patches, generator=generator, device=sample_device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=sample_device)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask.to(out_device)


def mask_to_shuffle_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return the permutation that puts visible patches first, and its inverse.

    ``ids_shuffle`` lists, per sample, the visible patch indices in ascending order followed
    by the masked ones in ascending order; ``ids_restore = argsort(ids_shuffle)`` undoes it,
    which is how the MAE decoder puts mask tokens back in place.

    Args:
        mask: `(B, L)` bool, True = masked.

    Returns:
        ``(ids_shuffle, ids_restore)``, both `(B, L)` long.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, L) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    # A stable sort of 0/1 keys keeps the ascending patch order inside each group.
    ids_shuffle = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle, ids_restore


def _visible_count(mask: Tensor) -> int:
    """Number of visible patches per sample; raises unless every row has the same count."""
    visible = (~mask).sum(dim=1)
    lo, hi = torch.stack([visible.min(), visible.max()]).tolist() if mask.shape[0] else (0, 0)
    if lo != hi:
        raise ValueError(
            f"every sample must have the same number of visible patches, got between {lo} and "
            f"{hi}; use random_mask, or block_mask(..., exact=True)"
        )
    return int(lo)


def mask_to_keep_indices(mask: Tensor) -> Tensor:
    """Return the indices of the visible (False) patches `(B, L_keep)`, ascending per sample.

    These are the ``keep_indices`` of ``VisionTransformer.forward_tokens``. Every sample must
    have the same number of visible patches (true for :func:`random_mask`).

    Args:
        mask: `(B, L)` bool, True = masked.

    Returns:
        `(B, L_keep)` long patch indices (no class-token offset).

    Raises:
        ValueError: if the rows have different numbers of visible patches.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    ids_shuffle, _ = mask_to_shuffle_indices(mask)
    return ids_shuffle[:, : _visible_count(mask)]


def fill_masked_tokens(visible: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Scatter visible tokens `(B, L_keep, D)` back to `(B, L, D)`, mask token elsewhere.

    ``visible`` must be in the order of :func:`mask_to_keep_indices` (ascending patch index),
    which is what ``forward_tokens(x, keep_indices=...)[:, 1:]`` returns. This is the first
    step of the MAE decoder.

    Args:
        visible: `(B, L_keep, D)` tokens of the visible patches.
        mask: `(B, L)` bool, True = masked, with ``L - L_keep`` True per row.
        mask_token: `(D,)`, `(1, D)` or `(1, 1, D)` learned token placed at masked positions.

    Returns:
        `(B, L, D)` tokens in patch order.

    References: He et al. 2021, MAE, arXiv:2111.06377.
    """
    b, num_keep, dim = visible.shape
    if mask.shape[0] != b:
        raise ValueError(f"batch mismatch: visible has {b} samples, mask has {mask.shape[0]}")
    if _visible_count(mask) != num_keep:
        raise ValueError(
            f"mask has {_visible_count(mask)} visible patches per sample but {num_keep} visible tokens were given"
        )
    num_patches = mask.shape[1]
    _, ids_restore = mask_to_shuffle_indices(mask)
    fill = mask_token.reshape(1, 1, dim).to(visible.dtype).expand(b, num_patches - num_keep, dim)
    tokens = torch.cat([visible, fill], dim=1)
    return tokens.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))


class _UniformStream:
    """Uniform [0, 1) floats drawn from a torch generator in chunks, consumed one by one."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, chunk: int) -> None:
        self.generator = generator
        self.device = device
        self.chunk = chunk
        self.values: list[float] = []
        self.pos = 0

    def next(self) -> float:
        if self.pos == len(self.values):
            # Drawing in chunks keeps the per-block cost in Python, not in kernel launches.
            draw = torch.rand(self.chunk, generator=self.generator, device=self.device)
            self.values = draw.double().tolist()
            self.pos = 0
        value = self.values[self.pos]
        self.pos += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.next()

    def randint(self, low: int, high: int) -> int:
        """Integer uniform on ``[low, high]`` inclusive."""
        return low + min(int(self.next() * (high - low + 1)), high - low)


def block_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_attempts: int = 10,
    exact: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mask random rectangles of patches until about ``mask_ratio`` of the grid is covered.

    BEiT's blockwise masking: repeatedly draw a block area uniformly in
    ``[min_block, remaining]`` (capped by ``max_block``), a log-uniform aspect ratio in
    ``[min_aspect, max_aspect]``, and a uniform position; accept the block if it adds at least
    one new patch without overshooting the target ``T = round(mask_ratio * L)``. A sample
    stops when ``max_attempts`` consecutive blocks are rejected.

    Tolerance: the masked count never exceeds ``T``. With ``exact=False`` (the paper's
    algorithm) a sample can stop short when the free space is fragmented. At BEiT-like ratios
    (<= 0.6) the shortfall is below ``min_block`` patches: on a 14x14 grid at ratio 0.4 the
    batch mean is within 0.01 of ``T / L`` and no sample is more than ``min_block`` patches
    short (checked by the tests). At high ratios (0.75) a few percent of samples stop 10-20
    patches short. With ``exact=True`` the shortfall is topped up with uniformly random single
    patches, so every sample has exactly ``T`` masked patches (usable with
    :func:`mask_to_keep_indices`).

    Args:
        batch: number of samples ``B``.
        grid_h: patch-grid height.
        grid_w: patch-grid width (``L = grid_h * grid_w``).
        mask_ratio: target masked fraction in ``[0, 1]`` (BEiT: 75 of 196 patches, ~0.4).
        generator: source of randomness; samples are drawn on its device.
        min_block: smallest block area in patches (BEiT: 16 on a 14x14 grid).
        max_block: largest block area (default: whatever remains to reach the target).
        min_aspect: smallest block aspect ratio h/w (BEiT: 0.3).
        max_aspect: largest aspect ratio (default ``1 / min_aspect``).
        max_attempts: rejected draws in a row before a sample stops (BEiT: 10).
        exact: top up with single random patches so every sample has exactly ``T``.
        device: device of the result (default: the generator's device).

    Returns:
        `(B, grid_h * grid_w)` bool mask, True = masked, row-major over the grid.

    References: Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers",
    arXiv:2106.08254.
    """
    _check_ratio(mask_ratio)
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if max_block is not None and max_block < min_block:
        raise ValueError(f"max_block ({max_block}) must be >= min_block ({min_block})")
    if min_aspect <= 0:
        raise ValueError(f"min_aspect must be positive, got {min_aspect}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
    sample_device, out_device = _devices(generator, device)
    num_patches = grid_h * grid_w
    target = round(mask_ratio * num_patches)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    stream = _UniformStream(generator, sample_device, chunk=4096)
    masks = np.zeros((batch, grid_h, grid_w), dtype=bool)

    for grid in masks:
        count = 0
        while count < target:
            remaining = target - count
            cap = remaining if max_block is None else min(remaining, max_block)
            added = 0
            for _ in range(max_attempts):
                area = stream.uniform(min_block, cap)
                aspect = math.exp(stream.uniform(log_lo, log_hi))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                # Strictly smaller than the grid, as in BEiT, so a block never covers a whole axis.
                if not (0 < h < grid_h and 0 < w < grid_w):
                    continue
                top = stream.randint(0, grid_h - h)
                left = stream.randint(0, grid_w - w)
                block = grid[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block[...] = True
                    added = new
                    break
            if added == 0:
                break
            count += added
        if exact and count < target:
            free = np.flatnonzero(~grid.reshape(-1))
            keys = torch.rand(len(free), generator=generator, device=sample_device)
            chosen = free[keys.argsort()[: target - count].cpu().numpy()]
            grid.reshape(-1)[chosen] = True

    return torch.from_numpy(masks.reshape(batch, num_patches)).to(out_device)


def grid_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    cell: int = 2,
    generator: torch.Generator | None = None,
    random_offset: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Keep one patch per ``cell x cell`` square on a regular grid, mask the rest.

    MAE's "grid-wise sampling" ablation: with ``cell=2`` one of every four patches stays
    visible (ratio 0.75 when the grid is divisible by ``cell``). The kept position inside the
    cell is the same for all cells of a sample and, with ``random_offset``, drawn per sample.

    Args:
        batch: number of samples ``B``.
        grid_h: patch-grid height.
        grid_w: patch-grid width.
        cell: side of the square cell that keeps one patch.
        generator: source of randomness for the offsets.
        random_offset: draw the kept position inside the cell per sample (else top-left).
        device: device of the result (default: the generator's device).

    Returns:
        `(B, grid_h * grid_w)` bool mask, True = masked.

    References: He et al. 2021, MAE, arXiv:2111.06377 (Figure 6, grid sampling).
    """
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    sample_device, out_device = _devices(generator, device)
    if random_offset:
        offsets = torch.randint(0, cell, (batch, 2), generator=generator, device=sample_device)
    else:
        offsets = torch.zeros(batch, 2, dtype=torch.long, device=sample_device)
    rows = torch.arange(grid_h, device=sample_device) % cell
    cols = torch.arange(grid_w, device=sample_device) % cell
    keep_rows = rows.unsqueeze(0) == offsets[:, :1]  # (B, grid_h)
    keep_cols = cols.unsqueeze(0) == offsets[:, 1:]  # (B, grid_w)
    keep = keep_rows.unsqueeze(2) & keep_cols.unsqueeze(1)
    return (~keep).reshape(batch, grid_h * grid_w).to(out_device)
