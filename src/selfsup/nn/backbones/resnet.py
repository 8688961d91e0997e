"""ResNet-18/34/50 backbones with ImageNet or CIFAR stems and a width multiplier.

References: He et al. 2016, "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.registry import BACKBONES

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]

_STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, `(B, C, H, W)` in and out.

    References: He et al. 2016, ResNet, arXiv:1512.03385 (Figure 5, left).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        """Return the BatchNorm closing the residual branch (zeroed by zero_init_residual)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Return `(B, planes, H / stride, W / stride)` for input `(B, C, H, W)`."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck block with 4x expansion, `(B, C, H, W)` in and out.

    The stride sits on the 3x3 conv (the "ResNet v1.5" placement used by torchvision and
    most self-supervised baselines), which is slightly more accurate than striding the 1x1.

    References: He et al. 2016, ResNet, arXiv:1512.03385 (Figure 5, right).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        """Return the BatchNorm closing the residual branch (zeroed by zero_init_residual)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """Return `(B, 4 * planes, H / stride, W / stride)` for input `(B, C, H, W)`."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Projection shortcut (option B of the paper) where the shape changes, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResNet(nn.Module):
    """ResNet trunk without its classifier, mapping `(B, C, H, W)` to pooled `(B, D)`.

    Four stages of ``layers[i]`` blocks with ``base * 2**i`` planes, where
    ``base = round(64 * width)``; ``num_features = 8 * base * block.expansion``
    (512 * width for BasicBlock, 2048 * width for Bottleneck).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: input channels ``C``.
        stem: "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max pool, for >= 96 px) or
            "cifar" (3x3 stride-1 conv, no pool, for 32 px images as in SimCLR's CIFAR runs).
        width: multiplier on every channel count.
        zero_init_residual: start each residual branch at zero (its last BN scale = 0) so
            every block is the identity at initialisation (Goyal et al. 2017).

    References: He et al. 2016, ResNet, arXiv:1512.03385.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got {stem!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        base = max(1, round(64 * width))
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)

        channels = base
        stages: list[nn.Sequential] = []
        for i, num_blocks in enumerate(layers):
            planes = base * 2**i
            blocks: list[nn.Module] = []
            for j in range(num_blocks):
                blocks.append(block(channels, planes, stride=2 if i > 0 and j == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features: int = channels
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last stage's feature map `(B, D, H', W')` for images `(B, C, H, W)`."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Return globally average-pooled features `(B, num_features)`."""
        return self.forward_features(x).mean(dim=(-2, -1))


def _build(
    block: type[BasicBlock] | type[Bottleneck],
    layers: tuple[int, int, int, int],
    in_channels: int,
    stem: str,
    width: float,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(
        block,
        layers,
        in_channels=in_channels,
        stem=stem,
        width=width,
        zero_init_residual=zero_init_residual,
    )


@BACKBONES.register("resnet18")
def resnet18(
    in_channels: int = 3,
    image_size: int = 224,
    stem: str = "imagenet",
    width: float = 1.0,
    zero_init_residual: bool = True,
) -> ResNet:
    """Build ResNet-18 (BasicBlock, 2-2-2-2), ``num_features = 512 * width``.

    ``image_size`` is accepted for the common factory signature and unused.

    References: He et al. 2016, ResNet, arXiv:1512.03385.
    """
    del image_size
    return _build(BasicBlock, (2, 2, 2, 2), in_channels, stem, width, zero_init_residual)


@BACKBONES.register("resnet34")
def resnet34(
    in_channels: int = 3,
    image_size: int = 224,
    stem: str = "imagenet",
    width: float = 1.0,
    zero_init_residual: bool = True,
) -> ResNet:
    """Build ResNet-34 (BasicBlock, 3-4-6-3), ``num_features = 512 * width``.

    ``image_size`` is accepted for the common factory signature and unused.

    References: He et al. 2016, ResNet, arXiv:1512.03385.
    """
    del image_size
    return _build(BasicBlock, (3, 4, 6, 3), in_channels, stem, width, zero_init_residual)


@BACKBONES.register("resnet50")
def resnet50(
    in_channels: int = 3,
    image_size: int = 224,
    stem: str = "imagenet",
    width: float = 1.0,
    zero_init_residual: bool = True,
) -> ResNet:
    """Build ResNet-50 (Bottleneck, 3-4-6-3), ``num_features = 2048 * width``.

    ``image_size`` is accepted for the common factory signature and unused.

    References: He et al. 2016, ResNet, arXiv:1512.03385.
    """
    del image_size
    return _build(Bottleneck, (3, 4, 6, 3), in_channels, stem, width, zero_init_residual)
