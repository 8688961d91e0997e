"""A small VGG-style ConvNet for small images, fast enough for CPU demos.

References: Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", arXiv:1409.1556.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.registry import BACKBONES

__all__ = ["ConvNet", "convnet"]

_NORMS = ("bn", "gn", "none")
_POOLS = ("max", "avg")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """Return the normalisation layer for ``channels`` feature maps."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        # Up to 32 groups (Wu & He's default) while keeping every group the same size.
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """VGG-style ConvNet mapping images `(B, C, H, W)` to pooled features `(B, D)`.

    ``depth`` stages of conv3x3-norm-ReLU with ``width * 2**i`` channels (doubling stops at
    ``8 * width``). The first conv has stride ``stem_stride``; a 2x2 pool (ceil mode, so odd
    sides keep their border) halves the resolution between stages while both sides exceed 1,
    and an average pool ends the network: global by default, or to an ``out_grid x out_grid``
    grid flattened channel-major, so that the feature keeps where things are. ``num_features``
    is ``channels * out_grid**2``; ``map_channels`` is the last stage's channel count (the
    ``D`` of :func:`~selfsup.nn.backbones.protocol.feature_map`).

    Why a grid: on 28 px Fashion-MNIST the last stage is a 2x2 map, and its global average
    throws away the layout that hand-made descriptors keep (HOG is a grid of cells). On the
    same trained SimCLR encoder the linear probe reads 87.24 from the global average and
    88.15 from the flattened 2x2 map (docs/history.md, issue 26); ``out_grid`` adds no weights,
    so a run trained with one read-out can be evaluated with another.

    Where to downsample decides the speed on small images: activations at full resolution
    dominate the memory traffic and the 2nd-3rd stages dominate the FLOPs. With the default
    ``stem_stride=2`` a 28x28 input runs its stages at 14, 7, 4 and 2 px (about 13M MACs per
    image at width 64); ``stem_stride=1`` runs them at 28, 14, 7 and 4 px (about 4x the
    FLOPs and activation memory) for tasks that need fine spatial detail.

    Args:
        in_channels: input channels ``C``.
        width: channels of the first stage.
        depth: number of conv stages.
        norm: "bn" (BatchNorm), "gn" (GroupNorm) or "none" (convs get a bias instead).
        pool: "max" or "avg" 2x2 downsampling.
        stem_stride: stride of the first conv (1 or 2).
        out_grid: side of the final average-pool grid (1 = global average pooling).

    References: Simonyan & Zisserman 2014, VGG, arXiv:1409.1556.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        depth: int = 4,
        norm: str = "bn",
        pool: str = "max",
        stem_stride: int = 2,
        out_grid: int = 1,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if out_grid < 1:
            raise ValueError(f"out_grid must be >= 1 (1 = global average pooling), got {out_grid}")
        if width < 1 or depth < 1 or in_channels < 1:
            raise ValueError(f"in_channels, width and depth must be >= 1, got {in_channels}, {width}, {depth}")
        stages: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2 ** min(i, 3)
            stages.append(
                nn.Sequential(
                    nn.Conv2d(
                        channels,
                        out,
                        3,
                        stride=stem_stride if i == 0 else 1,
                        padding=1,
                        bias=norm == "none",
                    ),
                    _norm_layer(norm, out),
                    nn.ReLU(inplace=True),
                )
            )
            channels = out
        self.stages = nn.ModuleList(stages)
        # Ceil mode: a 7x7 map pools to 4x4 instead of dropping its last row and column.
        self.pool: nn.Module = nn.MaxPool2d(2, ceil_mode=True) if pool == "max" else nn.AvgPool2d(2, ceil_mode=True)
        self.out_grid = out_grid
        self.map_channels: int = channels
        self.num_features: int = channels * out_grid**2
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last stage's feature map `(B, D, H', W')` for images `(B, C, H, W)`."""
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = stage(x)
            # No pool after the last stage: the global average pool follows anyway.
            if i < last and min(x.shape[-2:]) > 1:
                x = self.pool(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Return pooled features `(B, num_features)` for images `(B, C, H, W)`."""
        fmap = self.forward_features(x)
        if self.out_grid == 1:
            return fmap.mean(dim=(-2, -1))
        # A map smaller than the grid is repeated (adaptive pooling), so sizes always match.
        return F.adaptive_avg_pool2d(fmap, self.out_grid).flatten(1)


@BACKBONES.register("convnet")
def convnet(
    in_channels: int = 3,
    image_size: int = 224,
    width: int = 64,
    depth: int = 4,
    norm: str = "bn",
    pool: str = "max",
    stem_stride: int = 2,
    out_grid: int = 1,
) -> ConvNet:
    """Build the small VGG-style :class:`ConvNet` (``image_size`` is accepted and unused).

    References: Simonyan & Zisserman 2014, VGG, arXiv:1409.1556.
    """
    del image_size  # fully convolutional: any input size works
    return ConvNet(
        in_channels=in_channels,
        width=width,
        depth=depth,
        norm=norm,
        pool=pool,
        stem_stride=stem_stride,
        out_grid=out_grid,
    )
