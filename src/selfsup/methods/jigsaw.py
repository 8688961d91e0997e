"""Jigsaw puzzles: recognise which of N permutations shuffled an image's 3x3 tiles.

References: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016 (arXiv:1603.09246).

Pseudocode (the Context-Free Network, Section 3 and Figure 3 of the paper)::

    P = hamming_permutations(N)                      # fixed set, far apart (Algorithm 1)
    for x in batch:                                  # one augmented view per image
        tiles = 3x3 cells of x, a random t x t tile inside each (gaps + jitter)
        y ~ U{0..N-1};  tiles = tiles[P[y]]          # slot i holds the tile of cell P[y][i]
        h_i = fc6(f(normalise(tile_i)))              # shared encoder, each tile on its own
        logits = fc8(relu(fc7(concat(h_1..h_9))))    # N-way classification
        loss = cross-entropy(logits, y)

Each tile goes through the encoder alone ("context-free"), so the network must recognise the
parts before it can place them. The gaps between the tiles (64 px tiles in 75 px cells in the
paper) and their random placement keep it from matching edges and continuing lines; each
tile's mean and standard deviation are normalised on their own so it cannot match low-level
statistics either (Section 3.2).

Small images: tiles are ``tile_size`` px squares in cells of ``image_size // 3`` px; by default
``tile_size = floor(cell * 64 / 75)``, the paper's proportion. 28 px Fashion-MNIST would give
7 px tiles in 9 px cells: the shipped configs resize the images first (``data.image_size``,
e.g. 48 px -> 13 px tiles in 16 px cells); the encoder is then evaluated on the resized images.

Evaluated feature (``eval_features``): the paper transfers the tile encoder's conv layers to a
network that sees whole images (``"image"``, the default). On small images an encoder trained
on 10 px tiles does not transfer to the 36 px image (measured on Fashion-MNIST: kNN below a
random-init encoder), so ``"tiles"`` evaluates what the Context-Free Network itself computes:
the encoder on each of the 3x3 centred tiles (no jitter, normalised like in training),
concatenated ``(B, 9 D)`` (fc6's input). Its random-init baseline is the same tiling of an
untrained encoder (``Method.embedder``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import pretext_classification
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.nn.tiles import TileEncoder, normalize_tiles
from selfsup.registry import METHODS
from selfsup.transforms.pretext import MIN_PATCH_SIZE, hamming_permutations, jigsaw_batch

GRID = 3
PAPER_TILE, PAPER_CELL = 64, 75


@METHODS.register("jigsaw")
class Jigsaw(Method):
    """Context-Free Network: a shared tile encoder and an N-way permutation classifier.

    Args:
        backbone: tile encoder ``(9B, C, t, t) -> (9B, num_features)``, evaluated on full images.
        image_size: side of the training views (engine fact), which sets the cell size.
        num_permutations: size N of the permutation set (paper: 1000; its Table 3 also 100).
        permutation_selection: ``"min"`` adds the permutation farthest from its nearest chosen
            one (a max-min set), ``"mean"`` the one of largest summed distance (the paper's
            Algorithm 1 as written; it leaves pairs at distance 2).
        permutation_seed: seed of the random first permutation.
        tile_size: tile side in px; ``None`` = ``floor(cell * 64 / 75)`` (paper: 64 in 75).
        fc6_dim: per-tile layer after the encoder (paper: fc6, 1024 per tile).
        fc7_dim: hidden layer over the 9 concatenated tiles (paper: fc7, 4096).
        normalize_tiles: normalise each tile's mean and std on its own (paper: yes).
        eval_features: ``"image"`` (the encoder on whole images, the paper's transfer) or
            ``"tiles"`` (the encoder on the 3x3 centred tiles, concatenated; see the module
            docstring).
    """

    view_recipe = "single_view"
    engine_facts = ("image_size",)
    permutations: Tensor  # (N, 9) buffer: label -> permutation

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int,
        num_permutations: int = 1000,
        permutation_selection: str = "min",
        permutation_seed: int = 0,
        tile_size: int | None = None,
        fc6_dim: int = 1024,
        fc7_dim: int = 4096,
        normalize_tiles: bool = True,
        eval_features: str = "image",
    ) -> None:
        super().__init__()
        if eval_features not in ("image", "tiles"):
            raise ConfigError(f"method.eval_features must be 'image' or 'tiles', got {eval_features!r}")
        self.eval_features = eval_features
        cell = image_size // GRID
        self.tile_size = cell * PAPER_TILE // PAPER_CELL if tile_size is None else tile_size
        if cell < MIN_PATCH_SIZE:
            raise ConfigError(
                f"jigsaw needs images of at least {GRID * MIN_PATCH_SIZE} px ({GRID}x{GRID} cells of "
                f">= {MIN_PATCH_SIZE} px), got {image_size} px: resize larger with data.image_size"
            )
        if not MIN_PATCH_SIZE <= self.tile_size <= cell:
            raise ConfigError(
                f"jigsaw tiles of {self.tile_size} px do not fit {cell} px cells of {image_size} px images "
                f"(need {MIN_PATCH_SIZE}..{cell}): set method.tile_size or resize larger with data.image_size"
            )
        try:
            perms, self.min_hamming_distance = hamming_permutations(
                num_permutations, GRID * GRID, permutation_seed, permutation_selection
            )
        except ValueError as err:
            raise ConfigError(f"method.num_permutations / permutation_selection: {err}") from None
        # A buffer: the label -> permutation table is part of what the classifier means.
        self.register_buffer("permutations", perms.clone())  # a copy: the set is cached per process
        self.normalize_tiles = normalize_tiles
        self.backbone = backbone
        self.fc6 = nn.Sequential(nn.Linear(feature_dim(backbone), fc6_dim), nn.ReLU(inplace=True))
        self.classifier = mlp_head(GRID * GRID * fc6_dim, fc7_dim, num_permutations, num_layers=2)

    def logits_and_labels(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B, N), labels (B,), tile features (9B, D))`` for images ``(B, C, H, W)``."""
        tiles, labels = jigsaw_batch(images, self.permutations, self.tile_size)  # (B, 9, C, t, t)
        if self.normalize_tiles:
            tiles = normalize_tiles(tiles)
        # All 9B tiles in one encoder call: shared weights, and BatchNorm sees every slot.
        h = self.backbone(tiles.flatten(0, 1))
        per_tile = self.fc6(h).unflatten(0, (images.shape[0], GRID * GRID))  # (B, 9, fc6_dim)
        return self.classifier(per_tile.flatten(1)), labels, h

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        logits, labels, h = self.logits_and_labels(batch.views[0])
        loss, accuracy = pretext_classification(logits, labels)
        return {"loss": loss, "pretext_acc": accuracy, "h_std": feature_std_tensor(h)}

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """``embed`` as a module: the backbone on whole images, or the tile encoder."""
        if self.eval_features == "image":
            return self.eval_backbone, None
        spec = {"tile_size": self.tile_size, "normalize": self.normalize_tiles}
        return TileEncoder(self.eval_backbone, self.tile_size, self.normalize_tiles), spec

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        return TileEncoder(backbone(), int(spec["tile_size"]), bool(spec["normalize"]))

    @property
    def num_features(self) -> int:
        scale = GRID * GRID if self.eval_features == "tiles" else 1
        return scale * feature_dim(self.backbone)
