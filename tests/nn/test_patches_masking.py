"""Tests for selfsup.nn.patches and selfsup.nn.masking."""

from __future__ import annotations

import pytest
import torch

from selfsup.nn.masking import (
    block_mask,
    fill_masked_tokens,
    grid_mask,
    mask_to_keep_indices,
    mask_to_shuffle_indices,
    random_mask,
)
from selfsup.nn.patches import patchify, unpatchify


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- patches


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), 4), ((3, 1, 6, 6), 2), ((1, 2, 5, 5), 5)])
def test_unpatchify_inverts_patchify_exactly(shape: tuple[int, int, int, int], p: int) -> None:
    x = torch.randn(shape)
    b, c, h, w = shape
    patches = patchify(x, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, c, height=h, width=w), x)
    if h == w:
        assert torch.equal(unpatchify(patches, p, c), x)
    assert torch.equal(unpatchify(patches, p, c, height=h), x)
    assert torch.equal(unpatchify(patches, p, c, width=w), x)


def test_patchify_layout_is_row_major_grid_and_ppc_inside_patch() -> None:
    x = torch.randn(2, 3, 6, 9)
    p = 3
    patches = patchify(x, p)
    grid_w = 9 // p
    for i in range(6 // p):
        for j in range(grid_w):
            crop = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (B, C, p, p)
            expected = crop.permute(0, 2, 3, 1).reshape(2, -1)  # (p, p, C) order
            assert torch.equal(patches[:, i * grid_w + j], expected)


def test_patch_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        patchify(torch.randn(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        patchify(torch.randn(1, 3, 8, 10), 4)
    with pytest.raises(ValueError, match="patch dimension"):
        unpatchify(torch.randn(1, 4, 10), 2, 3)
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.randn(1, 6, 12), 2, 3)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.randn(1, 6, 12), 2, 3, height=4, width=4)


# ---------------------------------------------------------------- random masks


@pytest.mark.parametrize("ratio,num_patches", [(0.75, 49), (0.5, 16), (0.0, 10), (1.0, 10), (0.6, 196)])
def test_random_mask_has_exact_count_per_sample(ratio: float, num_patches: int) -> None:
    mask = random_mask(7, num_patches, ratio, _gen(0))
    assert mask.dtype == torch.bool and mask.shape == (7, num_patches)
    assert torch.all(mask.sum(dim=1) == round(ratio * num_patches))


def test_random_mask_is_reproducible_and_seed_dependent() -> None:
    a = random_mask(4, 64, 0.75, _gen(1))
    b = random_mask(4, 64, 0.75, _gen(1))
    c = random_mask(4, 64, 0.75, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Samples within a batch are independent draws, not one mask repeated.
    assert not torch.equal(a[0], a[1])


def test_random_mask_is_uniform_over_positions() -> None:
    mask = random_mask(4000, 16, 0.25, _gen(3))
    freq = mask.float().mean(dim=0)
    assert torch.all((freq - 0.25).abs() < 0.03)


def test_random_mask_device_argument() -> None:
    mask = random_mask(2, 8, 0.5, _gen(0), device="cpu")
    assert mask.device.type == "cpu"
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 8, 1.5, _gen(0))


def test_keep_indices_are_the_visible_patches_in_order() -> None:
    mask = random_mask(5, 20, 0.75, _gen(4))
    keep = mask_to_keep_indices(mask)
    assert keep.dtype == torch.long and keep.shape == (5, 5)
    assert torch.all(keep[:, 1:] > keep[:, :-1])
    assert not mask.gather(1, keep).any()
    for row_mask, row_keep in zip(mask, keep):
        assert torch.equal(row_keep, torch.nonzero(~row_mask).flatten())


def test_shuffle_and_restore_are_inverse_permutations() -> None:
    mask = random_mask(3, 12, 0.5, _gen(5))
    ids_shuffle, ids_restore = mask_to_shuffle_indices(mask)
    arange = torch.arange(12).expand(3, -1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), arange)
    assert torch.equal(ids_restore.gather(1, ids_shuffle), arange)
    assert torch.equal(ids_shuffle[:, :6], mask_to_keep_indices(mask))
    assert mask.gather(1, ids_shuffle[:, 6:]).all()


def test_fill_masked_tokens_puts_tokens_back_in_patch_order() -> None:
    mask = random_mask(3, 10, 0.6, _gen(6))
    tokens = torch.randn(3, 10, 4)
    keep = mask_to_keep_indices(mask)
    visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, 4))
    mask_token = torch.randn(4)
    full = fill_masked_tokens(visible, mask, mask_token)
    expected = torch.where(mask.unsqueeze(-1), mask_token, tokens)
    assert torch.equal(full, expected)
    with pytest.raises(ValueError, match="visible"):
        fill_masked_tokens(visible[:, :3], mask, mask_token)


def test_keep_indices_reject_ragged_masks() -> None:
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number of visible"):
        mask_to_keep_indices(mask)


# ---------------------------------------------------------------- block masks


def _neighbour_fraction(mask: torch.Tensor, h: int, w: int) -> float:
    """Fraction of masked patches with at least one masked 4-neighbour."""
    m = mask.reshape(-1, h, w).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float(((neighbours > 0) & (m > 0)).sum() / m.sum())


def test_block_mask_ratio_tolerance_on_beit_grid() -> None:
    h = w = 14
    ratio, min_block = 0.4, 4
    target = round(ratio * h * w)
    mask = block_mask(256, h, w, ratio, _gen(0), min_block=min_block)
    counts = mask.sum(dim=1)
    assert mask.shape == (256, h * w) and mask.dtype == torch.bool
    assert int(counts.max()) <= target
    assert int(counts.min()) >= target - min_block
    assert abs(counts.float().mean().item() / (h * w) - target / (h * w)) < 0.01


@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.5), ((14, 14), 0.75), ((4, 6), 0.3)])
def test_block_mask_exact_mode_hits_the_target(grid: tuple[int, int], ratio: float) -> None:
    h, w = grid
    mask = block_mask(32, h, w, ratio, _gen(1), exact=True)
    assert torch.all(mask.sum(dim=1) == round(ratio * h * w))
    assert mask_to_keep_indices(mask).shape == (32, h * w - round(ratio * h * w))


def test_block_mask_is_blockwise_not_scattered() -> None:
    h = w = 14
    blocks = block_mask(64, h, w, 0.4, _gen(2), min_block=16)
    scattered = random_mask(64, h * w, 0.4, _gen(2))
    assert _neighbour_fraction(blocks, h, w) > 0.97
    assert _neighbour_fraction(scattered, h, w) < 0.9


def test_block_mask_is_reproducible_and_seed_dependent() -> None:
    a = block_mask(8, 8, 8, 0.4, _gen(3))
    b = block_mask(8, 8, 8, 0.4, _gen(3))
    c = block_mask(8, 8, 8, 0.4, _gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_block_mask_edge_cases() -> None:
    assert not block_mask(3, 5, 5, 0.0, _gen(0)).any()
    with pytest.raises(ValueError):
        block_mask(1, 5, 5, 0.4, _gen(0), min_block=0)
    with pytest.raises(ValueError):
        block_mask(1, 5, 5, 0.4, _gen(0), min_aspect=-1.0)


# ---------------------------------------------------------------- grid masks


def test_grid_mask_keeps_one_patch_per_cell() -> None:
    mask = grid_mask(6, 8, 8, cell=2, generator=_gen(0))
    assert torch.all(mask.sum(dim=1) == 48)
    cells = (~mask).reshape(6, 4, 2, 4, 2).sum(dim=(2, 4))
    assert torch.all(cells == 1)
    fixed = grid_mask(2, 4, 4, cell=2, random_offset=False)
    assert not fixed.reshape(2, 4, 4)[:, 0, 0].any()
    again = grid_mask(6, 8, 8, generator=_gen(1))
    assert torch.equal(grid_mask(6, 8, 8, generator=_gen(1)), again)
