"""CPC v2: predict the latents of the patches below from a masked-convolution context above.

References: Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami & van den Oord, "Data-Efficient
Image Recognition with Contrastive Predictive Coding", ICML 2020 (arXiv:1905.09272); van den
Oord, Li & Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018
(arXiv:1807.03748), Section 3.2 (images).

Pseudocode (Section 2 of the v2 paper)::

    x -> overlapping grid of patches x[i, j]          # 7 x 7 patches of 1/4 of the side, 50% overlap
    patches = augment(x[i, j]) independently         # per-patch crop, flip, colour dropping
    z[i, j] = f(patches)                             # encoder, mean-pooled: (B, G, G, D)
    c = g_ar(z)                                      # masked convolutions: c[i, j] sees rows <= i
    for k in 1..K:
        p_k[i, j] = W_k c[i, j]                      # predicts z[i + k, j]
        loss_k = InfoNCE(p_k, z[i + k, j]; all other patch latents of the batch as negatives)
    loss = mean_k loss_k

Small images: the grid keeps the paper's proportions (patches of a quarter of the image side,
stride half a patch: a 7 x 7 grid on 32 px images, 8 x 8 of 7 px patches on 28 px ones).
CPC v2 replaced the encoder's batch normalisation by layer normalisation, since batch
statistics shared across the patches of one image leak what the context must not see: use a
backbone without batch norm (``backbone.norm: gn``) as the shipped configs do.

Evaluated feature (``embed``): the mean of the (un-augmented) grid's patch latents (layer-normalised
as in training), ``(B, D)``
(the paper's linear classifier reads the spatially pooled latents of the grid).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.errors import ConfigError
from selfsup.losses import cpc_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.registry import METHODS
from selfsup.transforms.pretext import drop_color_channels

__all__ = ["CPCv2", "MaskedContext", "PatchGridEncoder", "augment_patches", "patch_grid", "patch_latents"]


def patch_grid(images: Tensor, patch_size: int, stride: int) -> Tensor:
    """``(B, C, H, W) -> (B, G, G', C, p, p)``: the overlapping ``p`` px patches every
    ``stride`` px, row-major from the top-left corner (one ``unfold`` per axis)."""
    patches = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (B, C, G, G', p, p)
    return patches.permute(0, 2, 3, 1, 4, 5)


def patch_latents(backbone: nn.Module, patches: Tensor, layer_norm: bool = True) -> Tensor:
    """``(B, G, G', C, p, p) -> (B, G, G', D)``: every patch of the batch in one backbone call,
    each latent layer-normalised (no affine parameters) when ``layer_norm``."""
    b, rows, cols = patches.shape[:3]
    z: Tensor = backbone(patches.flatten(0, 2)).view(b, rows, cols, -1)
    return F.layer_norm(z, z.shape[-1:]) if layer_norm else z


class PatchGridEncoder(nn.Module):
    """The encoder on every patch of the grid, mean-pooled: ``(B, C, H, W) -> (B, D)``.

    What CPC evaluates (``embed``): the patch latents of the un-augmented image averaged over
    the grid."""

    def __init__(self, backbone: nn.Module, patch_size: int, stride: int, layer_norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.stride = stride
        self.layer_norm = layer_norm
        self.num_features = feature_dim(backbone)

    def forward(self, images: Tensor) -> Tensor:
        patches = patch_grid(images, self.patch_size, self.stride)
        return patch_latents(self.backbone, patches, self.layer_norm).mean(dim=(1, 2))


def augment_patches(patches: Tensor, crop: int, flip_p: float = 0.5, color_drop: bool = True) -> Tensor:
    """CPC v2's per-patch augmentations on ``(N, C, p, p)``, each patch its own draw.

    Random crop of ``p - crop`` px resized back to ``p`` (none when ``crop`` is 0), horizontal
    flip with probability ``flip_p``, and colour dropping (keep one random channel, the others
    faint noise; single-channel input is unchanged). All batched; randomness from the global
    generator, which the engine seeds and checkpoints."""
    n, c, p, _ = patches.shape
    if crop > 0:
        side = p - crop
        offsets = torch.randint(crop + 1, (2, n)).to(patches.device)
        steps = torch.arange(side, device=patches.device)
        rows = (offsets[0, :, None] + steps)[:, None, :, None]  # (N, 1, side, 1)
        cols = (offsets[1, :, None] + steps)[:, None, None, :]  # (N, 1, 1, side)
        sample = torch.arange(n, device=patches.device)[:, None, None, None]
        channel = torch.arange(c, device=patches.device)[None, :, None, None]
        patches = patches[sample, channel, rows, cols]  # (N, C, side, side)
        patches = F.interpolate(patches, size=(p, p), mode="bilinear", align_corners=False)
    if flip_p > 0:
        flip = (torch.rand(n) < flip_p).to(patches.device)[:, None, None, None]
        patches = torch.where(flip, patches.flip(-1), patches)
    if color_drop:
        patches = drop_color_channels(patches)
    return patches


class _CausalConv(nn.Conv2d):
    """A convolution whose output at row ``i`` sees input rows ``i - k + 1 .. i`` only (the
    PixelCNN mask: every kernel row below the centre is zero, here simply absent, with the
    padding all on top); columns are padded on both sides."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, padding=0)
        self.causal_padding = (kernel_size // 2, kernel_size // 2, kernel_size - 1, 0)  # left, right, top, bottom

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class _ResidualBlock(nn.Module):
    """Bottleneck residual block: 1x1 conv, masked k x k conv, 1x1 conv (no normalisation:
    statistics over the grid would carry the rows below into the context)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.masked = _CausalConv(hidden, kernel_size)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.expand(F.relu(self.masked(F.relu(self.reduce(F.relu(x))))))
        return x + h


class MaskedContext(nn.Module):
    """PixelCNN-style context network ``(B, G, G', D) -> (B, G, G', D_c)``: the context at row
    ``i`` is a function of the latents of rows ``<= i`` only (every layer is a 1x1 or a
    top-padded masked convolution)."""

    def __init__(self, dim: int, context_dim: int, num_blocks: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(dim, context_dim, 1)
        self.blocks = nn.Sequential(*[_ResidualBlock(context_dim, kernel_size) for _ in range(num_blocks)])

    def forward(self, latents: Tensor) -> Tensor:
        c = self.blocks(self.stem(latents.permute(0, 3, 1, 2)))
        return F.relu(c).permute(0, 2, 3, 1)


@METHODS.register("cpc")
class CPCv2(Method):
    """CPC v2 on an overlapping patch grid, batched over all patches of the batch.

    Args:
        backbone: patch encoder ``(N, C, p, p) -> (N, num_features)`` (CPC v2: layer norm, no
            batch norm; use ``backbone.norm: gn``).
        image_size: side of the training views (engine fact), which sets the grid.
        patch_size: patch side in px; ``None`` = a quarter of ``image_size`` (paper: 64 px
            patches of 256 px images, a 7 x 7 grid).
        patch_stride: px between patches; ``None`` = half a patch (paper: 32 px, 50% overlap).
        prediction_steps: ``K``, predict the latents 1..K rows below (v1 on images: up to 5
            rows on a 7 x 7 grid; 3 here by default for small grids).
        context_dim: channels of the context network.
        context_blocks: masked residual blocks of the context network.
        patch_crop: px cropped from each patch (then resized back) at random; ``None`` = an
            eighth of the patch; 0 disables it.
        patch_flip_p: per-patch horizontal flip probability.
        color_dropping: per-patch colour dropping (no-op on grey images).
        latent_norm: layer-normalise each patch latent (no affine parameters). CPC v2 puts
            layer norm in the encoder instead of batch norm; here it is applied to the latent,
            so any backbone works, and it gives the dot-product scores a usable scale from the
            first step (unnormalised latents of a fresh ConvNet are ~0.02: a long plateau).
        gather: negatives from the patches of every process when training distributed.
    """

    view_recipe = "single_view"
    engine_facts = ("image_size",)

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int,
        patch_size: int | None = None,
        patch_stride: int | None = None,
        prediction_steps: int = 3,
        context_dim: int = 256,
        context_blocks: int = 2,
        patch_crop: int | None = None,
        patch_flip_p: float = 0.5,
        color_dropping: bool = True,
        latent_norm: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = max(1, image_size // 4) if patch_size is None else patch_size
        self.patch_stride = max(1, self.patch_size // 2) if patch_stride is None else patch_stride
        if not 1 <= self.patch_size <= image_size or self.patch_stride < 1:
            raise ConfigError(
                f"method.patch_size={self.patch_size} (stride {self.patch_stride}) does not fit {image_size} px "
                "images: use 1 <= patch_size <= the image side and patch_stride >= 1"
            )
        self.grid_size = (image_size - self.patch_size) // self.patch_stride + 1
        if not 1 <= prediction_steps < self.grid_size:
            raise ConfigError(
                f"method.patch_size={self.patch_size} and patch_stride={self.patch_stride} give a "
                f"{self.grid_size}x{self.grid_size} grid on {image_size} px images, too few rows to predict "
                f"prediction_steps={prediction_steps} rows ahead: lower method.prediction_steps (< rows) or "
                "the patch size / stride"
            )
        self.patch_crop = self.patch_size // 8 if patch_crop is None else patch_crop
        if not 0 <= self.patch_crop < self.patch_size:
            raise ConfigError(f"method.patch_crop={self.patch_crop} must be in 0..{self.patch_size - 1}")
        self.patch_flip_p = patch_flip_p
        self.color_dropping = color_dropping
        self.latent_norm = latent_norm
        self.gather = gather
        self.backbone = backbone
        dim = feature_dim(backbone)
        self.context = MaskedContext(dim, context_dim, context_blocks)
        # W_k: one linear map per offset k (the paper's log-bilinear f_k = exp(z^T W_k c)).
        self.predictors = nn.ModuleList(nn.Linear(context_dim, dim, bias=False) for _ in range(prediction_steps))

    def predict(self, latents: Tensor) -> list[Tensor]:
        """``(B, G, G', D)`` latents -> ``K`` predictions, the ``k``-th ``(B, G - k, G', D)``
        from the context of rows ``0 .. G - k - 1``."""
        c = self.context(latents)
        rows = latents.shape[1]
        return [w(c[:, : rows - k]) for k, w in enumerate(self.predictors, start=1)]

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        patches = patch_grid(batch.views[0], self.patch_size, self.patch_stride)  # (B, G, G', C, p, p)
        shape = patches.shape
        flat = augment_patches(patches.flatten(0, 2), self.patch_crop, self.patch_flip_p, self.color_dropping)
        z = patch_latents(self.backbone, flat.view(shape), self.latent_norm)
        loss = cpc_loss(self.predict(z), z, gather=self.gather)
        return {"loss": loss, "z_std": feature_std_tensor(z.mean(dim=(1, 2)))}

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """``embed`` as a module: the mean of the grid's patch latents (``PatchGridEncoder``)."""
        encoder = PatchGridEncoder(self.eval_backbone, self.patch_size, self.patch_stride, self.latent_norm)
        spec = {"patch_size": self.patch_size, "patch_stride": self.patch_stride, "latent_norm": self.latent_norm}
        return encoder, spec

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        layer_norm = bool(spec.get("latent_norm", True))
        return PatchGridEncoder(backbone(), int(spec["patch_size"]), int(spec["patch_stride"]), layer_norm)
