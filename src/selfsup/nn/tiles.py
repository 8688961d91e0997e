"""Whole-image features of an encoder trained on small tiles or patches (jigsaw, relative
location): the encoder on each cell of a grid, concatenated.

A patch encoder trained on 8-13 px crops does not transfer to a whole 32-48 px image (the
scale and the statistics it saw differ); what the pretext network itself computes is the
encoder on each of the grid's tiles, side by side. :class:`TileEncoder` does that
deterministically (centred tiles, no jitter) so it can be evaluated, exported and rebuilt.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.nn.backbones.protocol import feature_dim

__all__ = ["TileEncoder", "normalize_tiles"]


def normalize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile ``(..., C, t, t)`` to zero mean and unit std over its own pixels."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)


class TileEncoder(nn.Module):
    """The encoder on each of the ``grid x grid`` centred tiles of an image, concatenated:
    ``(B, C, H, W) -> (B, grid^2 D)``, deterministic (no jitter). The cells are those of the
    pretext tasks (:func:`selfsup.transforms.pretext.grid_patches`): the central
    ``grid * cell`` square, ``cell = min(H, W) // grid``; each tile is the cell's centred
    ``tile_size`` square, optionally normalised to zero mean and unit std on its own."""

    def __init__(self, backbone: nn.Module, tile_size: int, normalize: bool = True, grid: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid = grid
        self.tile_size = tile_size
        self.normalize = normalize
        self.num_features = grid * grid * feature_dim(backbone)

    def tiles(self, images: Tensor) -> Tensor:
        """``(B, grid^2, C, t, t)``: the centred ``t`` px tile of each cell, in raster order."""
        h, w = images.shape[-2:]
        cell = min(h, w) // self.grid
        top, left, inset = (h - self.grid * cell) // 2, (w - self.grid * cell) // 2, (cell - self.tile_size) // 2
        square = images[..., top : top + self.grid * cell, left : left + self.grid * cell]
        cells = square.unflatten(-2, (self.grid, cell)).unflatten(-1, (self.grid, cell))  # (B, C, g, cell, g, cell)
        cells = cells.permute(0, 2, 4, 1, 3, 5).flatten(1, 2)  # (B, g^2, C, cell, cell)
        return cells[..., inset : inset + self.tile_size, inset : inset + self.tile_size]

    def forward(self, images: Tensor) -> Tensor:
        tiles = self.tiles(images)
        if self.normalize:
            tiles = normalize_tiles(tiles)
        return self.backbone(tiles.flatten(0, 1)).unflatten(0, (images.shape[0], self.grid**2)).flatten(1)
