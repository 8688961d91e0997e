"""Targets of the classic pretext tasks, generated batched on the images' device.

Every function works on a whole batch at once (no loop over samples or patches) and returns
the transformed inputs with their integer labels:

* :func:`rotate_batch`: every image in all four rotations (RotNet).
* :func:`hamming_permutations`: the jigsaw permutation set of maximal Hamming distance.
* :func:`grid_patches` / :func:`jigsaw_batch`: 3x3 tiles with gaps and random jitter, shuffled
  by a permutation drawn per image (Context-Free Network).
* :func:`relative_location_batch`: a centre patch and one of its 8 neighbours (Doersch et al.).
* :func:`drop_color_channels`: Doersch et al.'s countermeasure against chromatic aberration.

Randomness: drawn from the global CPU generator (or a ``generator`` argument) and moved to the
images' device, as the masks of MAE: the engine seeds that generator and checkpoints its state,
so a resumed run draws the same targets, whatever the accelerator.

References:
    Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
    Rotations", ICLR 2018 (arXiv:1803.07728).
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016 (arXiv:1603.09246).
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015 (arXiv:1505.05192).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "MIN_PATCH_SIZE",
    "drop_color_channels",
    "grid_patches",
    "hamming_permutations",
    "jigsaw_batch",
    "relative_location_batch",
    "rotate_batch",
]

#: Smallest tile / patch side (px) the jigsaw and relative-location tasks accept: below it a
#: patch holds too few pixels to show any structure to place.
MIN_PATCH_SIZE = 3


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """Every image in all four rotations: ``(B, C, S, S) -> (4B, C, S, S)``, labels ``(4B,)``.

    Row ``r * B + i`` is image ``i`` turned by ``r * 90`` degrees counter-clockwise (exact
    ``torch.rot90``), label ``r``; RotNet feeds the four copies of an image in the same batch.

    Raises ``ValueError`` for non-square images (a 90 degree turn would change their shape).
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square (B, C, S, S) images, got {tuple(images.shape)}; crop them square")
    rotated = torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


@functools.lru_cache(maxsize=1)
def _all_permutations(num_tiles: int) -> Tensor:
    """All ``num_tiles!`` permutations, ``(num_tiles!, num_tiles)`` uint8.

    Built by insertion (the permutations of ``k + 1`` items put item ``k`` into every slot of
    each permutation of ``k`` items): a few tensor ops instead of 9! Python tuples.
    """
    perms = torch.zeros(1, 0, dtype=torch.uint8)
    for k in range(num_tiles):
        new = torch.full((len(perms), 1), k, dtype=torch.uint8)
        perms = torch.cat([torch.cat([perms[:, :slot], new, perms[:, slot:]], dim=1) for slot in range(k + 1)])
    return perms


@functools.lru_cache(maxsize=8)
def hamming_permutations(
    num_permutations: int, num_tiles: int = 9, seed: int = 0, selection: str = "min"
) -> tuple[Tensor, int]:
    """A set of permutations far apart in Hamming distance, by the paper's greedy Algorithm 1.

    Start from a random permutation (drawn with ``seed``); then repeatedly add the candidate,
    among all ``num_tiles!`` permutations not chosen yet, that is farthest from the chosen set:
    ``selection="mean"`` maximises the summed Hamming distance to the chosen ones (Algorithm 1's
    ``1^T D``, as the authors' script), ``"min"`` the distance to the nearest chosen one (a
    max-min set: larger minimal distances). Each step updates a running sum / minimum over the
    9! = 362880 candidates with a few vectorised ops (a few ms), so 1000 permutations take
    a few seconds; results are cached per process.

    Returns:
        ``(perms, min_distance)``: ``(N, num_tiles)`` int64 distinct permutations, and the
        smallest Hamming distance between two of them (0 when ``N == 1``).

    Raises ``ValueError`` when ``N`` exceeds ``num_tiles!``, ``num_tiles > 9`` or the selection
    is unknown.
    """
    if selection not in ("mean", "min"):
        raise ValueError(f"selection must be 'mean' (the paper's Algorithm 1) or 'min' (max-min), got {selection!r}")
    if not 1 <= num_tiles <= 9:
        raise ValueError(
            f"num_tiles={num_tiles}: the search enumerates all num_tiles! permutations; use at most 9 (3x3)"
        )
    if not 1 <= num_permutations <= math.factorial(num_tiles):
        raise ValueError(
            f"num_permutations={num_permutations} is out of reach: {num_tiles} tiles have "
            f"{math.factorial(num_tiles)} permutations; choose 1..{math.factorial(num_tiles)}"
        )
    candidates = _all_permutations(num_tiles)  # (M, num_tiles), M = num_tiles!
    m = candidates.shape[0]
    # (num_tiles**2, M) table: row ``position * num_tiles + tile`` marks the candidates holding
    # ``tile`` at ``position``; the matches with a permutation p are the sum of its rows p.
    onehot = torch.zeros(num_tiles * num_tiles, m, dtype=torch.uint8)
    rows = torch.arange(num_tiles) * num_tiles + candidates.long()  # (M, num_tiles)
    onehot.scatter_(0, rows.t(), 1)
    g = torch.Generator().manual_seed(seed)
    j = int(torch.randint(m, (1,), generator=g))
    chosen = [j]
    # Distances to the chosen set, kept up to date one chosen permutation at a time. A chosen
    # permutation is at distance 0 from itself, so its running minimum drops to 0 and it is
    # never picked again; for the sum it is excluded explicitly.
    total = torch.zeros(m, dtype=torch.int32)
    nearest = torch.full((m,), num_tiles, dtype=torch.int8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small ops per step: thread hand-offs would cost more than they give
    try:
        for _ in range(num_permutations - 1):
            distance = num_tiles - onehot.index_select(0, rows[j]).sum(dim=0, dtype=torch.int8)
            if selection == "mean":
                total += distance
                total[chosen] = torch.iinfo(torch.int32).min
                j = int(total.argmax())  # first maximum: deterministic ties
            else:
                torch.minimum(nearest, distance, out=nearest)
                j = int(nearest.argmax())
            chosen.append(j)
    finally:
        torch.set_num_threads(threads)
    perms = candidates[chosen].long()
    pairwise = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    pairwise.fill_diagonal_(num_tiles + 1)
    min_distance = int(pairwise.min()) if num_permutations > 1 else 0
    return perms, min_distance


def grid_patches(
    images: Tensor,
    patch_size: int,
    grid: int = 3,
    cells: Tensor | None = None,
    jitter: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Patches of a ``grid x grid`` cell layout, each at a random place inside its cell.

    The central ``grid * cell`` square of each image (``cell = min(H, W) // grid``) is cut into
    cells; each patch is a ``patch_size`` square inside its cell, so neighbouring patches are
    separated by a gap of ``cell - patch_size`` px on average. Its offset inside the cell is
    uniform over the whole slack (``jitter=None``: the jigsaw's random tile in each cell) or the
    centred position moved by up to ``jitter`` px each way (relative location).

    Args:
        images: ``(B, C, H, W)``.
        cells: ``(B, K)`` int64 cell indices (raster order) to take per image; ``None`` = all.

    Returns:
        ``(B, K, C, patch_size, patch_size)`` (``K = grid**2`` when ``cells`` is ``None``).
    """
    b, _, h, w = images.shape
    cell = min(h, w) // grid
    slack = cell - patch_size
    if patch_size < MIN_PATCH_SIZE or slack < 0:
        raise ValueError(
            f"patch_size={patch_size} does not fit {grid}x{grid} cells of {cell} px from {h}x{w} images "
            f"(need {MIN_PATCH_SIZE} <= patch_size <= {cell}); resize the images larger (data.image_size)"
        )
    if jitter is not None and not 0 <= jitter <= slack // 2:
        raise ValueError(f"jitter={jitter} must be in 0..{slack // 2} (half the gap) for {patch_size} px patches")
    device = images.device
    if cells is None:
        cells = torch.arange(grid * grid, device=device).expand(b, -1)
    shape = tuple(cells.shape)
    if jitter is None:
        offsets = torch.randint(0, slack + 1, (2, *shape), generator=generator)
    else:
        offsets = slack // 2 + torch.randint(-jitter, jitter + 1, (2, *shape), generator=generator)
    offsets = offsets.to(device)
    top, left = (h - grid * cell) // 2, (w - grid * cell) // 2
    span = torch.arange(patch_size, device=device)
    rows = (top + torch.div(cells, grid, rounding_mode="floor") * cell + offsets[0])[..., None] + span  # (B, K, p)
    cols = (left + cells % grid * cell + offsets[1])[..., None] + span
    batch = torch.arange(b, device=device)[:, None, None, None]
    # Advanced indices on dims 0, 2, 3 around the channel slice: the result is (B, K, p, p, C).
    patches = images[batch, :, rows[..., :, None], cols[..., None, :]]
    return patches.permute(0, 1, 4, 2, 3)


def jigsaw_batch(
    images: Tensor,
    permutations: Tensor,
    tile_size: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Shuffled 3x3 jigsaw tiles and the index of the permutation used for each image.

    Each image gets a permutation ``perm = permutations[label]`` drawn uniformly; input slot
    ``i`` holds the tile cut from grid cell ``perm[i]`` (``shuffled[:, i] = tiles[:, perm[i]]``).

    Args:
        images: ``(B, C, H, W)``.
        permutations: ``(N, 9)`` permutation set (see :func:`hamming_permutations`).
        tile_size: tile side inside each cell (paper: 64 px tiles in 75 px cells).

    Returns:
        ``(tiles (B, 9, C, t, t), labels (B,))``.
    """
    grid = math.isqrt(permutations.shape[1])
    tiles = grid_patches(images, tile_size, grid=grid, generator=generator)
    labels = torch.randint(len(permutations), (images.shape[0],), generator=generator).to(images.device)
    order = permutations.to(images.device)[labels]  # (B, 9)
    index = order[:, :, None, None, None].expand_as(tiles)
    return tiles.gather(1, index), labels


def relative_location_batch(
    images: Tensor,
    patch_size: int,
    jitter: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A centre patch, one of its 8 neighbours drawn uniformly per image, and its position.

    Labels ``0..7`` number the neighbours in raster order (top-left, top, top-right, left,
    right, bottom-left, bottom, bottom-right), i.e. grid cell ``label + (label >= 4)``.

    Returns:
        ``(centre (B, C, p, p), neighbour (B, C, p, p), labels (B,))``.
    """
    b = images.shape[0]
    labels = torch.randint(8, (b,), generator=generator).to(images.device)
    neighbour_cell = labels + (labels >= 4).long()
    cells = torch.stack([torch.full_like(labels, 4), neighbour_cell], dim=1)  # (B, 2)
    patches = grid_patches(images, patch_size, grid=3, cells=cells, jitter=jitter, generator=generator)
    return patches[:, 0], patches[:, 1], labels


def drop_color_channels(patches: Tensor, noise_ratio: float = 0.01, generator: torch.Generator | None = None) -> Tensor:
    """Keep one random colour channel of each patch; replace the others by faint Gaussian noise.

    Doersch et al.'s "color dropping" against chromatic aberration (lenses shift colours
    towards the image border, which tells a patch where it came from): the noise std is
    ``noise_ratio`` (paper: ~1/100) times the std of the kept channel. Single-channel input is
    returned unchanged (no colour to leak).

    Args:
        patches: ``(N, C, h, w)``.
    """
    n, c = patches.shape[:2]
    if c == 1:
        return patches
    keep = torch.randint(c, (n,), generator=generator).to(patches.device)
    kept = patches[torch.arange(n, device=patches.device), keep]  # (N, h, w)
    std = kept.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
    noise = torch.randn(patches.shape, generator=generator).to(patches) * noise_ratio * std
    mask = torch.nn.functional.one_hot(keep, c).to(patches.dtype)[:, :, None, None]
    return mask * patches + (1 - mask) * noise
