"""Optional adapter exposing any timm model as a selfsup backbone.

timm is imported only when the factory is called, so ``selfsup`` works without it.

References: Wightman 2019, "PyTorch Image Models",
https://github.com/huggingface/pytorch-image-models.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

from selfsup.nn.backbones.protocol import feature_dim
from selfsup.registry import BACKBONES

__all__ = ["TimmBackbone", "timm_backbone"]

_INSTALL_HINT = 'the "timm" backbone needs the optional dependency timm; install it with `pip install "selfsup[timm]"`'


class TimmBackbone(nn.Module):
    """Wrap a classifier-free timm model: images `(B, C, H, W)` to pooled features `(B, D)`.

    The timm model lives in ``self.model``; ``num_features`` is its pooled feature width.

    References: Wightman 2019, PyTorch Image Models (timm).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features: int = feature_dim(model)

    def forward(self, x: Tensor) -> Tensor:
        """Return `(B, num_features)` features (timm's pooled output, flattened)."""
        return self.model(x).flatten(1)


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err


@BACKBONES.register("timm")
def timm_backbone(
    model_name: str,
    in_channels: int = 3,
    image_size: int = 224,
    pretrained: bool = False,
    **kwargs: Any,
) -> TimmBackbone:
    """Build ``timm.create_model(model_name, num_classes=0, in_chans=in_channels, ...)``.

    ``image_size`` is passed as ``img_size`` to models that take it (ViTs and other
    fixed-grid models) and dropped for the others (CNNs). Extra ``kwargs`` go to timm.

    Raises:
        ImportError: with install instructions when timm is not installed.

    References: Wightman 2019, PyTorch Image Models (timm).
    """
    timm = _import_timm()
    common = dict(pretrained=pretrained, num_classes=0, in_chans=in_channels, **kwargs)
    if "img_size" in kwargs:
        return TimmBackbone(timm.create_model(model_name, **common))
    try:
        model = timm.create_model(model_name, img_size=image_size, **common)
    except TypeError as err:
        # Models without a fixed input size reject img_size; anything else is re-raised below.
        if "img_size" not in str(err):
            raise
        model = timm.create_model(model_name, **common)
    return TimmBackbone(model)
