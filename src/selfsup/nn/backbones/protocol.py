"""Typed access to the backbone attributes that methods and tools read.

``nn.Module.__getattr__`` is typed ``Tensor | Module``, so ``backbone.num_features`` or
``vit.forward_tokens(...)`` on a plain ``nn.Module`` does not type-check. These helpers give
the static types without changing anything at run time (no copies, no wrappers, no checks
beyond what the attribute access itself does):

* :func:`feature_dim` reads the pooled feature width every backbone declares.
* :class:`TokenBackbone` is the ViT token API (implemented by ``VisionTransformer``), and
  :func:`as_token_backbone` types a module as one for a method that has already checked it
  (``selfsup.methods.base.check_token_backbone``).
* :func:`feature_map` gives any backbone's last spatial features `(B, D, h, w)` (dense probes,
  dense pretext heads such as colorization).
"""

from __future__ import annotations

from typing import Protocol, SupportsInt, cast

from torch import Tensor, nn

__all__ = ["TokenBackbone", "as_token_backbone", "feature_dim", "feature_map", "feature_map_dim"]


def feature_dim(backbone: nn.Module) -> int:
    """``int(backbone.num_features)``: the width ``D`` of the backbone's pooled `(B, D)` features.

    Raises ``AttributeError`` when the backbone declares no ``num_features``.
    """
    return int(cast(SupportsInt, backbone.num_features))


def feature_map_dim(backbone: nn.Module) -> int:
    """The channel count ``D`` of :func:`feature_map`'s `(B, D, h, w)` output.

    Equals :func:`feature_dim` unless the backbone pools to a grid (a ConvNet with
    ``out_grid > 1`` declares ``map_channels``).
    """
    channels = getattr(backbone, "map_channels", None)
    return feature_dim(backbone) if channels is None else int(cast(SupportsInt, channels))


class TokenBackbone(Protocol):
    """The token-level API of a Vision Transformer backbone (see ``VisionTransformer``).

    Masked image modelling and attention maps need it; ``enable_mask_token`` only matters to
    methods that pass ``mask=`` (SimMIM, BEiT, iBOT), ``get_last_self_attention`` only to
    attention maps.
    """

    patch_size: int
    grid_size: tuple[int, int]
    num_patches: int
    embed_dim: int
    num_features: int

    def __call__(self, x: Tensor) -> Tensor:
        """Pooled features `(B, num_features)` of images `(B, C, H, W)`."""

    def forward_tokens(self, x: Tensor, keep_indices: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """All tokens `(B, 1 + L', D)` after the final norm, class token first."""

    def enable_mask_token(self) -> nn.Parameter:
        """Create (if missing) and return the learned `(1, 1, D)` mask token."""

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """The last block's attention weights `(B, heads, 1 + L, 1 + L)`."""


def as_token_backbone(backbone: nn.Module) -> TokenBackbone:
    """``backbone`` itself, typed as a :class:`TokenBackbone` (a static cast: nothing is
    checked, so check first, e.g. with ``check_token_backbone``)."""
    return cast(TokenBackbone, backbone)


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's last spatial features `(B, D, h, w)` for images `(B, C, H, W)`.

    ConvNets and ResNets give their last stage before global pooling (``forward_features``);
    a ViT gives its normed patch tokens (class token dropped) laid back on the patch grid, so
    ``h, w = H / patch_size, W / patch_size``. ``D`` is :func:`feature_map_dim`
    (``num_features`` unless a ConvNet pools to a grid).

    Raises ``TypeError`` for a backbone with neither API (e.g. a timm wrapper).
    """
    if hasattr(backbone, "forward_tokens") and hasattr(backbone, "patch_size"):
        vit = as_token_backbone(backbone)
        tokens = vit.forward_tokens(x)[:, 1:]
        h, w = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)
    forward_features = getattr(backbone, "forward_features", None)
    if forward_features is None:
        raise TypeError(
            f"{type(backbone).__name__} gives no spatial features (needs forward_features or the ViT token API)"
        )
    out = forward_features(x)
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise TypeError(f"{type(backbone).__name__}.forward_features must return (B, D, h, w)")
    return out
