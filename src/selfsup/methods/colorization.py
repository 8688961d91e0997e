"""Colorful Image Colorization: predict a distribution over quantised ab colours from lightness.

References: Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016 (arXiv:1603.08511);
the representation-learning results are its Section 3.2 ("cross-channel encoder").

Pseudocode (Sections 2.1-2.3 of the paper)::

    for x in batch:                                # RGB in [0, 1]
        L, ab = lab(x)                             # CIE Lab, D65
        Z = soft_encode(downsample(ab))            # 5 nearest of Q in-gamut bins, Gaussian sigma 5
        logits = head(f(L))                        # Q scores per output position
        loss = -mean v(Z) * sum_q Z_q log softmax(logits)_q   # class-rebalanced, lambda = 0.5
    colours at test time: annealed mean of softmax(logits) with T = 0.38

Choices where the paper's ImageNet network differs from this library's backbones:

* Input: the encoder sees only lightness. The engine builds the backbone with the data's 3
  channels, so the method feeds ``L / 50 - 1`` (in [-1, 1]) replicated to the 3 channels; ``embed``
  does the same for evaluation images, so evaluation sees what training saw. That conversion and
  the backbone form one module (``LightnessEncoder``, the method's ``embedder``), which
  ``backbone.safetensors``, exports, ``load_encoder`` and frozen teachers hold.
* Pixels: the training view (``single_view``: random resized crop and flip, no colour changes,
  then the data set's normalisation) is de-normalised with the data set's ``mean`` / ``std``
  (engine facts) back to [0, 1] RGB, so the lightness input and the ab targets come from the
  same crop. ``embed`` and ``colorize`` de-normalise their (eval-view) input the same way.
* Output resolution: the paper predicts at 1/4 of the input (56 x 56 for 224 x 224). A small
  head (3x3 conv, BN, ReLU, 1x1 conv to Q logits) runs on ``feature_map(backbone, x)``, whose
  logits are bilinearly upsampled to ``H / out_stride`` (``out_stride = 4``; done before the
  1x1 conv, which is the same and cheaper); the ab targets are
  area-averaged to the same size before soft encoding. The loss is the mean over positions.
* Empirical colour distribution: the paper measures it on all of ImageNet before training.
  Here every training target updates a running histogram of the hard bins (buffer
  ``ab_counts``, float64, in ``on_step_end``), and each step's rebalancing weights come from the
  histogram so far (uniform until the first update). The histogram settles within the first
  few hundred steps and is checkpointed, so a resume continues exactly. Under distributed
  training the step's counts are summed over processes, so every process keeps the same
  histogram (the engine does not sync buffers).
* Bins: Q = 261 in-gamut bins (``selfsup.transforms.color.ab_gamut_bins``), derived from every
  8-bit sRGB colour, where the paper's reference set has 313 (a looser gamut).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import rebalanced_soft_cross_entropy
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.nn.backbones.protocol import feature_dim, feature_map, feature_map_dim
from selfsup.nn.distributed import all_reduce_sum
from selfsup.registry import METHODS
from selfsup.transforms.color import (
    ab_gamut_bins,
    annealed_mean,
    lab_to_rgb,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode_ab_sparse,
)


class LightnessEncoder(nn.Module):
    """What ``Colorization.embed`` computes, as one module: normalised RGB ``(B, 3, H, W)`` ->
    ``(B, D)`` features of the backbone on their lightness (``L / 50 - 1``, replicated to 3
    channels). Exports, ``load_encoder`` and frozen teachers hold it, so they give the run's
    features from the same normalised RGB input as every other encoder."""

    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.map_channels = feature_map_dim(backbone)
        # Not persistent: the data set's normalisation, recorded in the file's metadata.
        for name, value in (("mean", mean), ("std", std)):
            tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone().view(1, -1, 1, 1)
            self.register_buffer(name, tensor, persistent=False)

    def _lightness(self, images: Tensor) -> Tensor:
        rgb = (images.float() * self.std + self.mean).clamp(0.0, 1.0)
        return lightness_input(rgb_to_lab(rgb), images.shape[1])

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(self._lightness(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """The backbone's spatial features ``(B, D, h, w)`` of the lightness (dense probes)."""
        return feature_map(self.backbone, self._lightness(images))


def lightness_input(lab: Tensor, channels: int) -> Tensor:
    """Lab ``(B, 3, H, W)`` -> the encoder's input: ``L / 50 - 1`` replicated to ``channels``."""
    return (lab[:, :1] / 50.0 - 1.0).expand(-1, channels, -1, -1)


@METHODS.register("colorization")
class Colorization(Method):
    """Colorization as classification over Q in-gamut ab bins, with class rebalancing.

    The evaluated encoder is ``backbone`` fed the lightness channel; the colour head is thrown
    away after pretraining.

    Args:
        backbone: encoder with spatial features (``feature_map``), built for 3 input channels.
        in_channels: the data's channels (engine fact); must be 3 (colour data).
        mean: the data set's per-channel normalisation mean (engine fact).
        std: the data set's per-channel normalisation std (engine fact).
        hidden_dim: width of the head's 3x3 conv.
        out_stride: the prediction grid is ``H / out_stride`` (paper: 4).
        neighbours: bins each target is soft-encoded onto (paper: 5).
        sigma: width of the soft-encoding Gaussian and of the prior smoothing (paper: 5).
        rebalance: lambda, the uniform share of the rebalancing mixture (paper: 0.5); ``1.0``
            turns rebalancing off.
        temperature: annealed-mean temperature for ``colorize`` (paper: 0.38).

    Shapes:
        ``batch.views[0]`` ``(B, 3, H, W)`` -> logits ``(B, Q, H / out_stride, W / out_stride)``.
    """

    view_recipe = "single_view"
    engine_facts = ("in_channels", "mean", "std")

    bins: Tensor  # (Q, 2) ab centres of the in-gamut bins
    mean: Tensor  # (1, C, 1, 1) the data set's normalisation
    std: Tensor
    ab_counts: Tensor  # (Q,) float64 running histogram of the targets' nearest bins

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        hidden_dim: int = 128,
        out_stride: int = 4,
        neighbours: int = 5,
        sigma: float = 5.0,
        rebalance: float = 0.5,
        temperature: float = 0.38,
    ) -> None:
        super().__init__()
        if in_channels != 3:
            raise ConfigError(
                f"colorization predicts colour from lightness and needs 3-channel colour data, got "
                f"in_channels={in_channels}: use data.name=scenes, cifar or image-folder"
            )
        if out_stride < 1 or not 0.0 <= rebalance <= 1.0 or temperature <= 0:
            raise ConfigError(
                f"colorization needs out_stride >= 1, 0 <= rebalance <= 1 and temperature > 0, got "
                f"{out_stride}, {rebalance}, {temperature}"
            )
        self.backbone = backbone
        self.in_channels = in_channels
        self.out_stride = out_stride
        self.neighbours = neighbours
        self.sigma = sigma
        self.rebalance = rebalance
        self.temperature = temperature
        bins = ab_gamut_bins()
        dim = feature_map_dim(backbone)
        self.color_head = nn.Sequential(
            nn.Conv2d(dim, hidden_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.color_classifier = nn.Conv2d(hidden_dim, bins.shape[0], 1)
        self.register_buffer("bins", bins, persistent=False)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("ab_counts", torch.zeros(bins.shape[0], dtype=torch.float64))

    # ------------------------------------------------------------------ pieces
    def to_rgb(self, images: Tensor) -> Tensor:
        """Normalised images ``(B, 3, H, W)`` -> [0, 1] RGB (undoes the data set's normalisation)."""
        return (images.float() * self.std + self.mean).clamp(0.0, 1.0)

    def lightness_input(self, lab: Tensor) -> Tensor:
        """Lab ``(B, 3, H, W)`` -> the encoder's input: ``L / 50 - 1`` replicated to 3 channels."""
        return lightness_input(lab, self.in_channels)

    def logits(self, lab: Tensor, size: tuple[int, int]) -> Tensor:
        """Bin scores ``(B, Q, *size)`` from the lightness of ``lab`` ``(B, 3, H, W)``."""
        hidden = self.color_head(feature_map(self.backbone, self.lightness_input(lab)))
        if tuple(hidden.shape[-2:]) != size:
            # A 1x1 conv commutes with bilinear upsampling (whose weights sum to 1), so this is
            # upsampling the logits, done on the narrower hidden features.
            hidden = F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)
        return self.color_classifier(hidden)

    def class_weights(self) -> Tensor:
        """``(Q,)`` rebalancing weights from the running colour histogram (uniform while empty)."""
        if not bool(self.ab_counts.sum() > 0):
            return torch.ones_like(self.bins[:, 0])
        return rebalancing_weights(self.ab_counts, self.bins, lam=self.rebalance, sigma=self.sigma)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        view = batch.views[0]
        if view.shape[1] != 3:
            raise ValueError(f"colorization needs RGB views (B, 3, H, W), got {tuple(view.shape)}")
        lab = rgb_to_lab(self.to_rgb(view))
        size = (max(1, view.shape[-2] // self.out_stride), max(1, view.shape[-1] // self.out_stride))
        logits = self.logits(lab, size)
        ab = F.interpolate(lab[:, 1:], size=size, mode="area")
        with torch.no_grad():
            index, weight = soft_encode_ab_sparse(ab, self.bins, self.neighbours, self.sigma)
            hard = index[..., 0].flatten(1)  # the nearest bin: the soft target's argmax
            counts = torch.zeros(hard.shape[0], self.bins.shape[0], device=hard.device)
            counts.scatter_add_(1, hard, torch.ones_like(hard, dtype=counts.dtype))
            counts = all_reduce_sum(counts.sum(dim=0, keepdim=True))  # (1, Q), the same on every process
        loss = rebalanced_soft_cross_entropy(logits, index, weight, self.class_weights())
        accuracy = (logits.detach().argmax(dim=1).flatten(1) == hard).float().mean()
        return {"loss": loss, "bin_acc": accuracy, "ab_counts": counts}

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        """Adds this step's target bins to the running colour histogram."""
        self.ab_counts += outputs["ab_counts"].sum(dim=0).to(self.ab_counts)

    # ------------------------------------------------------------------ evaluation
    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """``embed`` as a module: the backbone behind the RGB -> lightness conversion."""
        spec = {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
        return LightnessEncoder(self.eval_backbone, self.mean, self.std), spec

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        return LightnessEncoder(backbone(), spec["mean"], spec["std"])

    @torch.no_grad()
    def colorize(self, images: Tensor, temperature: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(grayscale, predicted, truth)`` RGB ``(B, 3, H, W)`` in [0, 1] for normalised images:
        the input's lightness alone, that lightness with the annealed-mean ab prediction
        (upsampled to full resolution), and the original colours."""
        rgb = self.to_rgb(images)
        lab = rgb_to_lab(rgb)
        logits = self.logits(lab, (images.shape[-2], images.shape[-1]))
        ab = annealed_mean(logits, self.bins, self.temperature if temperature is None else temperature)
        gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(ab)], dim=1))
        return gray, lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1)), rgb
