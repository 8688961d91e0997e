"""Relative patch location: given a centre patch and a neighbour, say where the neighbour lies.

References: Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015 (arXiv:1505.05192).

Pseudocode (Sections 3-4 and Figure 3 of the paper)::

    for x in batch:                                  # one augmented view per image
        y ~ U{0..7}                                  # which of the 8 neighbours (Figure 2)
        c, n = centre patch, neighbour y's patch     # gap between them, each jittered
        c, n = color_drop(c), color_drop(n)          # colour input only
        logits = fc8(relu(fc7(concat(fc6(f(c)), fc6(f(n))))))   # late fusion
        loss = cross-entropy(logits, y)              # 8-way classification

Trivial shortcuts the paper closes (Section 3.1): a gap between the patches (half a patch:
96 px patches, 48 px gaps) and a random jitter of each patch (up to 7 px) so that lines and
textures cannot simply be continued across the border; and chromatic aberration, which shifts
colours towards the lens border and so tells the network where a patch came from, countered
by "color dropping" (keep one random colour channel per patch, the other two become faint
noise). Colour dropping does nothing on grey images.

Small images: patches are ``patch_size`` px squares in cells of ``image_size // 3`` px; by
default ``patch_size = floor(cell * 96 / 144)`` and ``jitter = round(cell * 7 / 144)``, the
paper's proportions (cell = patch + gap = 144 px). The shipped Fashion-MNIST and digits configs
resize the images first (``data.image_size``) so the patches hold some structure.

Evaluated feature (``eval_features``): the paper transfers the patch encoder to whole images
(``"image"``, the default). On small images an encoder trained on 8 px patches does not
transfer to the 36 px image (measured on Fashion-MNIST: level with a random-init encoder), so
``"patches"`` evaluates the encoder on the 3x3 centred patches of the grid it was trained on,
concatenated (:class:`selfsup.nn.tiles.TileEncoder`); its random-init baseline is the same
tiling of an untrained encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import pretext_classification
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.nn.tiles import TileEncoder
from selfsup.registry import METHODS
from selfsup.transforms.pretext import MIN_PATCH_SIZE, drop_color_channels, relative_location_batch

NUM_NEIGHBOURS = 8
PAPER_PATCH, PAPER_CELL, PAPER_JITTER = 96, 144, 7


@METHODS.register("relative_location")
class RelativeLocation(Method):
    """Context prediction: a shared patch encoder and an 8-way pair classifier.

    Args:
        backbone: patch encoder ``(2B, C, p, p) -> (2B, num_features)``, evaluated on full images.
        image_size: side of the training views (engine fact), which sets the cell size.
        patch_size: patch side in px; ``None`` = ``floor(cell * 96 / 144)`` (paper: 96 px patches,
            48 px gaps).
        jitter: largest shift of each patch from its cell's centre, px; ``None`` =
            ``round(cell * 7 / 144)`` (paper: up to 7 px), at most half the gap.
        color_dropping: drop 2 of 3 colour channels of each patch at random, replaced by noise
            of ``noise_ratio`` (paper: ~1/100) times the kept channel's std; no-op on 1 channel.
        fc6_dim: per-patch layer after the encoder (paper: fc6, 4096).
        fc7_dim: hidden layer over the two concatenated patches (paper: fc7, 4096).
        eval_features: ``"image"`` (the encoder on whole images, the paper's transfer) or
            ``"patches"`` (the encoder on the 3x3 centred patches, concatenated; see the
            module docstring).
    """

    view_recipe = "single_view"
    engine_facts = ("image_size",)

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int,
        patch_size: int | None = None,
        jitter: int | None = None,
        color_dropping: bool = True,
        noise_ratio: float = 0.01,
        fc6_dim: int = 4096,
        fc7_dim: int = 4096,
        eval_features: str = "image",
    ) -> None:
        super().__init__()
        if eval_features not in ("image", "patches"):
            raise ConfigError(f"method.eval_features must be 'image' or 'patches', got {eval_features!r}")
        self.eval_features = eval_features
        cell = image_size // 3
        self.patch_size = cell * PAPER_PATCH // PAPER_CELL if patch_size is None else patch_size
        if not MIN_PATCH_SIZE <= self.patch_size <= cell:
            raise ConfigError(
                f"relative_location patches of {self.patch_size} px do not fit {cell} px cells of {image_size} px "
                f"images (need {MIN_PATCH_SIZE}..{cell}): set method.patch_size or resize larger with data.image_size"
            )
        half_gap = (cell - self.patch_size) // 2
        self.jitter = min(half_gap, round(cell * PAPER_JITTER / PAPER_CELL)) if jitter is None else jitter
        if not 0 <= self.jitter <= half_gap:
            raise ConfigError(f"method.jitter={self.jitter} must be in 0..{half_gap} (half the gap between patches)")
        self.color_dropping = color_dropping
        self.noise_ratio = noise_ratio
        self.backbone = backbone
        self.fc6 = nn.Sequential(nn.Linear(feature_dim(backbone), fc6_dim), nn.ReLU(inplace=True))
        self.classifier = mlp_head(2 * fc6_dim, fc7_dim, NUM_NEIGHBOURS, num_layers=2)

    def logits_and_labels(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B, 8), labels (B,), patch features (2B, D))`` for images ``(B, C, H, W)``."""
        centre, neighbour, labels = relative_location_batch(images, self.patch_size, self.jitter)
        patches = torch.cat([centre, neighbour])  # (2B, C, p, p): both patches in one encoder call
        if self.color_dropping:
            patches = drop_color_channels(patches, self.noise_ratio)
        h = self.backbone(patches)
        a, b = self.fc6(h).chunk(2)
        return self.classifier(torch.cat([a, b], dim=1)), labels, h

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        logits, labels, h = self.logits_and_labels(batch.views[0])
        loss, accuracy = pretext_classification(logits, labels)
        return {"loss": loss, "pretext_acc": accuracy, "h_std": feature_std_tensor(h)}

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """``embed`` as a module: the backbone on whole images, or on the grid's patches."""
        if self.eval_features == "image":
            return self.eval_backbone, None
        spec = {"patch_size": self.patch_size}
        return TileEncoder(self.eval_backbone, self.patch_size, normalize=False), spec

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        return TileEncoder(backbone(), int(spec["patch_size"]), normalize=False)

    @property
    def num_features(self) -> int:
        scale = 9 if self.eval_features == "patches" else 1
        return scale * feature_dim(self.backbone)
