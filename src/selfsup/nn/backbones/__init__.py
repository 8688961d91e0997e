"""Backbones: images `(B, C, H, W)` to pooled features `(B, num_features)`.

Importing this package registers every backbone in ``selfsup.registry.BACKBONES``:
"convnet", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base" and
"timm" (which imports timm only when built). Every factory takes ``in_channels`` and
``image_size`` keywords, so ``BACKBONES.build(name, in_channels=1, image_size=28, **kw)``
works for all of them.

``feature_dim(backbone)`` and ``as_token_backbone(vit)`` (a ``TokenBackbone``) give typed
access to the attributes methods read (see ``selfsup.nn.backbones.protocol``).
"""

from selfsup.nn.backbones.convnet import ConvNet, convnet
from selfsup.nn.backbones.protocol import TokenBackbone, as_token_backbone, feature_dim
from selfsup.nn.backbones.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from selfsup.nn.backbones.timm import TimmBackbone, timm_backbone
from selfsup.nn.backbones.vit import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = [
    "ConvNet",
    "convnet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "TimmBackbone",
    "timm_backbone",
    "VisionTransformer",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "TokenBackbone",
    "as_token_backbone",
    "feature_dim",
]
