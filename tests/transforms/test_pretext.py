"""Pretext targets: exact rotations, the Hamming permutation set, tiles and patches where the
labels say (images whose cells are identifiable constants), colour dropping, bad sizes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from selfsup.errors import ConfigError
from selfsup.registry import BACKBONES
from selfsup.transforms import (
    drop_color_channels,
    grid_patches,
    hamming_permutations,
    jigsaw_batch,
    relative_location_batch,
    rotate_batch,
)


def cell_images(batch_size: int, size: int, grid: int = 3, channels: int = 1) -> Tensor:
    """``(B, C, S, S)`` images whose grid cell ``k`` (raster order) holds the constant
    ``100 * b + k`` (``b`` the image), so every patch says which image and cell it came from."""
    cell = size // grid
    ids = torch.arange(grid * grid, dtype=torch.float32).reshape(grid, grid)
    layout = ids.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # (grid*cell, grid*cell)
    images = torch.full((batch_size, channels, size, size), -1.0)
    top = (size - grid * cell) // 2
    images[:, :, top : top + grid * cell, top : top + grid * cell] = layout
    return images + 100 * torch.arange(batch_size, dtype=torch.float32)[:, None, None, None]


# ------------------------------------------------------------------------------ rotation
def test_rotations_are_exact_quarter_turns_with_their_labels() -> None:
    images = torch.randn(3, 2, 5, 5)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for r in range(4):
        block = rotated[3 * r : 3 * r + 3]
        # A quarter turn counter-clockwise moves pixel (i, j) to (S-1-j, i), written out plainly.
        expected = images.clone()
        for _ in range(r):
            turned = torch.empty_like(expected)
            for i in range(5):
                for j in range(5):
                    turned[..., 4 - j, i] = expected[..., i, j]
            expected = turned
        assert torch.equal(block, expected), r


def test_rotation_rejects_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 1, 4, 6))


# ------------------------------------------------------------------------------ permutations
@pytest.mark.parametrize("selection", ["min", "mean"])
def test_hamming_set_is_distinct_and_reports_its_minimal_distance(selection: str) -> None:
    perms, min_distance = hamming_permutations(30, selection=selection, seed=3)
    assert perms.shape == (30, 9) and perms.dtype == torch.int64
    rows = [tuple(p) for p in perms.tolist()]
    assert all(sorted(p) == list(range(9)) for p in rows) and len(set(rows)) == 30
    brute = min(sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(rows, 2))
    assert min_distance == brute


def test_hamming_set_is_greedy_max_min_on_a_small_puzzle() -> None:
    """On 4 tiles (24 candidates) the max-min greedy choice is checked against brute force."""
    perms, _ = hamming_permutations(6, num_tiles=4, seed=1, selection="min")
    chosen = [tuple(p) for p in perms.tolist()]
    for k in range(1, 6):

        def nearest(c: tuple[int, ...], k: int = k) -> int:
            return min(sum(a != b for a, b in zip(c, p)) for p in chosen[:k])

        best = max(nearest(c) for c in itertools.permutations(range(4)) if c not in chosen[:k])
        assert nearest(chosen[k]) == best
    # The max-min set is far apart: 9 tiles, 100 permutations, nearest pair at >= 5 moves.
    assert hamming_permutations(100)[1] >= 5


def test_hamming_set_is_deterministic_and_rejects_unreachable_sizes() -> None:
    assert torch.equal(hamming_permutations(10, seed=7)[0], hamming_permutations(10, seed=7)[0].clone())
    with pytest.raises(ValueError, match="out of reach"):
        hamming_permutations(math.factorial(4) + 1, num_tiles=4)
    with pytest.raises(ValueError, match="at most 9"):
        hamming_permutations(4, num_tiles=16)
    with pytest.raises(ValueError, match="selection"):
        hamming_permutations(4, num_tiles=4, selection="median")


# ------------------------------------------------------------------------------ jigsaw tiles
def test_jigsaw_tiles_land_where_the_permutation_says() -> None:
    images = cell_images(6, 31)  # 10 px cells, one border pixel of -1
    perms, _ = hamming_permutations(12)
    tiles, labels = jigsaw_batch(images, perms, tile_size=7, generator=torch.Generator().manual_seed(0))
    assert tiles.shape == (6, 9, 1, 7, 7) and labels.shape == (6,)
    for b in range(6):
        for slot in range(9):
            tile = tiles[b, slot]
            # A tile lies wholly inside its cell (constant), and it is cell perms[label][slot].
            assert torch.all(tile == 100 * b + perms[labels[b], slot]), (b, slot)


def test_tiles_jitter_inside_their_cells() -> None:
    """Tile offsets cover the whole slack of the cell (the paper's random placement)."""
    image = torch.arange(15 * 15, dtype=torch.float32).reshape(1, 1, 15, 15).expand(200, 1, 15, 15)
    tiles = grid_patches(image, patch_size=3, grid=3, generator=torch.Generator().manual_seed(0))
    top_left = tiles[:, 0, 0, 0, 0].long()  # pixel value = 15 * row + col of the tile's corner
    rows, cols = top_left // 15, top_left % 15
    assert set(rows.tolist()) == {0, 1, 2} and set(cols.tolist()) == {0, 1, 2}
    centre = tiles[:, 4, 0, 0, 0].long()
    assert set((centre // 15).tolist()) == {5, 6, 7}


# ------------------------------------------------------------------------------ relative location
def test_relative_location_labels_name_the_neighbour_cell() -> None:
    images = cell_images(64, 48, channels=3)
    centre, neighbour, labels = relative_location_batch(images, patch_size=10, jitter=2)
    assert centre.shape == neighbour.shape == (64, 3, 10, 10)
    assert set(labels.tolist()) == set(range(8))
    # Raster order of the 8 neighbours, the centre (cell 4) skipped.
    cell_of = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    offsets = 100 * torch.arange(64, dtype=torch.float32)[:, None, None, None]
    assert torch.all(centre == 4 + offsets)
    assert torch.all(neighbour == cell_of[labels].float()[:, None, None, None] + offsets)


def test_relative_location_jitter_stays_within_its_bound() -> None:
    image = torch.arange(48 * 48, dtype=torch.float32).reshape(1, 1, 48, 48).expand(300, 1, 48, 48)
    centre, _, _ = relative_location_batch(image, patch_size=10, jitter=2, generator=torch.Generator().manual_seed(1))
    corner = centre[:, 0, 0, 0].long()
    # Cell 4 spans rows/cols 16..31; the centred 10 px patch starts at 19, moved by -2..2.
    assert set((corner // 48).tolist()) == set(range(17, 22)) and set((corner % 48).tolist()) == set(range(17, 22))


# ------------------------------------------------------------------------------ colour dropping
def test_color_dropping_keeps_one_channel_and_fills_the_rest_with_faint_noise() -> None:
    patches = torch.randn(500, 3, 6, 6) * 2 + 1
    out = drop_color_channels(patches, noise_ratio=0.01, generator=torch.Generator().manual_seed(0))
    kept = (out == patches).flatten(2).all(dim=2)  # (N, 3): which channels are untouched
    assert torch.equal(kept.sum(dim=1), torch.ones(500, dtype=torch.long))
    counts = kept.sum(dim=0)
    assert all(120 < int(c) < 220 for c in counts), counts  # each channel kept ~1/3 of the time
    dropped = out[~kept]  # (2N, 6, 6)
    kept_std = patches[kept].flatten(1).std(dim=1)
    noise_std = dropped.flatten(1).std(dim=1).reshape(500, 2)
    ratio = noise_std / kept_std[:, None]
    assert 0.007 < float(ratio.mean()) < 0.013 and float(dropped.mean().abs()) < 0.01


def test_color_dropping_leaves_grey_patches_alone() -> None:
    grey = torch.randn(4, 1, 5, 5)
    assert drop_color_channels(grey) is grey


# ------------------------------------------------------------------------------ bad sizes
def test_patches_that_do_not_fit_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"patch_size=3 does not fit .*data\.image_size"):
        grid_patches(torch.zeros(1, 1, 8, 8), patch_size=3)
    with pytest.raises(ValueError, match="jitter=3"):
        relative_location_batch(torch.zeros(2, 1, 30, 30), patch_size=6, jitter=3)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("jigsaw", {"image_size": 8}, r"at least 9 px .* got 8 px: resize larger with data\.image_size"),
        ("jigsaw", {"image_size": 30, "tile_size": 2}, r"set method\.tile_size or resize larger with data\.image_size"),
        ("jigsaw", {"image_size": 30, "tile_size": 11}, "tiles of 11 px do not fit 10 px cells"),
        ("jigsaw", {"image_size": 30, "num_permutations": 362881}, "out of reach"),
        ("relative_location", {"image_size": 8}, r"set method\.patch_size"),
        ("relative_location", {"image_size": 48, "jitter": 5}, r"method\.jitter=5 must be in 0\.\.3"),
    ],
)
def test_methods_reject_sizes_they_cannot_use(method: str, options: dict[str, int], match: str) -> None:
    from selfsup.registry import METHODS

    backbone = BACKBONES.build("convnet", in_channels=1, image_size=16, width=4)
    with pytest.raises(ConfigError, match=match) as err:
        METHODS.build(method, backbone=backbone, **options)
    assert "\n" not in str(err.value)
