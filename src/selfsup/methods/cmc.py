"""CMC: contrastive multiview coding, one encoder per view, contrast across views.

References: Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020
(arXiv:1906.05849).

Pseudocode (section 3 of the paper, two views ``V1, V2`` of each image, e.g. L and ab)::

    v1, v2 = split(x)                               # L | ab of Lab for RGB input
    z1, z2 = normalize(h1(f1(v1))), normalize(h2(f2(v2)))   # two half-width encoders, 128-d
    # main (section 3.2 "memory bank + NCE"): each view's feature is scored against the other
    # view's bank: positive = bank2[i], m noise rows drawn uniformly, T = 0.07, Z estimated
    L = NCE(z1; bank2) + NCE(z2; bank1)
    # option "softmax": the exact softmax over the other view's whole bank instead of NCE,
    #   L = -log softmax_j(z1 . bank2[j] / T)[i] - log softmax_j(z2 . bank1[j] / T)[i]
    # option "infonce" (in-batch, no banks): L = InfoNCE(z1, z2) + InfoNCE(z2, z1)
    bank_k[i] <- normalize(0.5 bank_k[i] + 0.5 z_k)  # after the step (on_step_end)
    representation = concat(f1(v1), f2(v2))         # what is evaluated

Views. ``views="lab"`` is the paper's split for RGB: the (de-normalised) view is converted to
CIE Lab (``selfsup.transforms.color.rgb_to_lab``) and L (1 channel) and ab (2 channels),
normalised with the constants of the authors' code, go to the two encoders. Single-channel
data (Fashion-MNIST) has no channels to split; ``views="halves"`` gives the top and the bottom
half of the image to the two encoders. The choice: like L and ab, the two halves share no
input values (a derived view such as a gradient map is a function of the intensity view, so
what the two encoders share would include low-level edges), and what they have in common is
the object (a shirt's collar and its hem, a shoe's upper and its sole), which is the
"view-invariant" information CMC's objective keeps. ``views="auto"`` picks ``lab`` for 3
channels and ``halves`` otherwise; ``lab`` on other than 3 channels is a one-line error.

Encoders. The configured backbone is a ConvNet: each view gets a ConvNet of the same depth,
norm, pooling and stem with half its stage width (the paper halves AlexNet/ResNet widths);
other backbones need ``encoder`` (a ``{name: ..., <options>}`` registry spec, built once per
view with that view's channel count). The engine's own backbone is not trained; ``backbone``
becomes the two-view encoder that splits raw (normalised) images and concatenates both
features, so kNN, linear probes and ``embed`` evaluate the paper's representation. Its spec
(``embedder``: split, view encoders, normalisation) is saved with ``backbone.safetensors``, so
``load_encoder``, exports and frozen teachers rebuild the two-view encoder, not the backbone.

Bank initialisation. ``bank_init="features"`` departs from the paper (random unit vectors, as
InstDisc): before the first step of a fresh run, one pass over the pretraining set (eval view,
BatchNorm on each pass batch's statistics) sets ``bank1[i]`` and ``bank2[i]`` to the two views'
normalised embeddings of image ``i``, so the cross-view positives are real features from the
first step instead of random vectors refreshed once per epoch (the reasons, the choice of view
and of BatchNorm statistics: ``selfsup.methods.instdisc``). Measured (Fashion-MNIST 12800-image
subset, width 16, batch 128, 3 epochs, NCE, kNN@20; seeds 0 / 1): random 72.9 / 74.8,
features 74.8 / 75.6, random-init two-view encoder 71.0 / 76.2; after epoch 1, 69.6 / 72.8
against 72.5 / 73.3. A smaller gain than InstDisc's, and not enough by itself to put this
setting above the random-init encoder in every seed. The pass costs 3% of an NCE epoch
(60000 images, width 32, 1 thread).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import bank_softmax_loss, info_nce, nce_loss
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo, StepOutputs
from selfsup.methods.instdisc import bank_scores, check_bank_init, check_index, estimate_log_z, initial_bank_features
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.convnet import ConvNet
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.memory import IndexMemoryBank
from selfsup.registry import BACKBONES, METHODS
from selfsup.transforms.color import rgb_to_lab

# Lab normalisation of the authors' code: centre and half-range of L, a and b over sRGB.
_LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
_LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
VIEW_SPLITS = ("auto", "lab", "halves")


def resolve_views(views: str, in_channels: int) -> str:
    """The view split for ``in_channels`` input channels; one-line ``ConfigError`` if impossible."""
    if views not in VIEW_SPLITS:
        raise ConfigError(f"method.views must be one of {VIEW_SPLITS}, got {views!r}")
    if views == "auto":
        return "lab" if in_channels == 3 else "halves"
    if views == "lab" and in_channels != 3:
        raise ConfigError(
            f"method.views=lab splits RGB into L and ab and needs 3-channel data, got in_channels={in_channels}: "
            "use method.views=halves (or auto) for single-channel data"
        )
    return views


class TwoViewEncoder(nn.Module):
    """Normalised images ``(B, C, H, W)`` -> ``(B, D1 + D2)``: split into the two views, encode
    each with its own encoder, concatenate the features (CMC's evaluated representation)."""

    mean: Tensor
    std: Tensor

    def __init__(
        self, views: str, encoder1: nn.Module, encoder2: nn.Module, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.views = views
        self.encoder1 = encoder1
        self.encoder2 = encoder2
        self.num_features = feature_dim(encoder1) + feature_dim(encoder2)
        # Not persistent: derived from the data set, not learnt (keeps exported weights plain).
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` -> the two views: ``(B, 1, H, W)`` L and ``(B, 2, H, W)`` ab, or the
        ``(B, C, H // 2, W)`` top and ``(B, C, H - H // 2, W)`` bottom halves."""
        if self.views == "lab":
            rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
            lab = rgb_to_lab(rgb)
            lab = (lab - lab.new_tensor(_LAB_MEAN).view(1, 3, 1, 1)) / lab.new_tensor(_LAB_STD).view(1, 3, 1, 1)
            return lab[:, :1].to(x.dtype), lab[:, 1:].to(x.dtype)
        h = x.shape[-2] // 2
        return x[..., :h, :], x[..., h:, :]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` -> each view's features ``(B, D1)``, ``(B, D2)``."""
        v1, v2 = self.split(x)
        return self.encoder1(v1), self.encoder2(v2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.encode(x), dim=1)


def _build_encoder(spec: Mapping[str, Any], in_channels: int, image_size: int) -> nn.Module:
    """A view encoder with ``in_channels`` inputs from its registry spec (name + options)."""
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"method.encoder needs a backbone name, e.g. {{name: convnet, width: 16}}; got {spec!r}")
    return BACKBONES.build(name, in_channels=in_channels, image_size=image_size, **options)


def encoder_spec(backbone: nn.Module, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The registry spec (name + options) of each view's encoder: ``spec`` if given, else a
    ConvNet like ``backbone`` at half its stage width."""
    if spec is not None:
        return dict(spec)
    if not isinstance(backbone, ConvNet):
        raise ConfigError(
            f"cmc halves a convnet backbone's width for its two encoders; for {type(backbone).__name__} give "
            "method.encoder={name: <backbone>, <options>} (one encoder per view)"
        )
    stem = backbone.stages[0]
    conv, norm = (stem[0], stem[1]) if isinstance(stem, nn.Sequential) else (None, None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"unexpected ConvNet stem {stem!r}: expected Sequential(Conv2d, norm, ReLU)")
    kind = "bn" if isinstance(norm, nn.BatchNorm2d) else "gn" if isinstance(norm, nn.GroupNorm) else "none"
    return {
        "name": "convnet",
        "width": max(1, conv.out_channels // 2),
        "depth": len(backbone.stages),
        "norm": kind,
        "pool": "max" if isinstance(backbone.pool, nn.MaxPool2d) else "avg",
        "stem_stride": int(conv.stride[0]),
    }


@METHODS.register("cmc")
class CMC(Method):
    """CMC with two views, paper defaults (memory banks + NCE, T = 0.07, m = 4096, 128-d).

    Args:
        backbone: the configured encoder; its kind and width define the two half-width encoders.
        num_samples, in_channels, image_size, mean, std: run facts (set by the engine).
        views: ``"auto"``, ``"lab"`` (L vs ab, the paper's) or ``"halves"`` (top vs bottom).
        encoder: optional registry spec of each view's encoder (default: half-width ConvNet).
        feat_dim: embedding width (paper: 128).
        objective: ``"nce"`` (memory banks and NCE, the paper's main), ``"softmax"`` (memory
            banks, softmax cross-entropy over all ``N`` rows of the other view's bank: the limit
            of the authors' later ``NCESoftmaxLoss``, which scores the positive and ``K``
            sampled rows) or
            ``"infonce"`` (in-batch softmax over the other view's embeddings, both directions;
            gathered across processes).
        temperature: ``T`` (paper: 0.07).
        num_negatives: noise samples ``m`` per image and view for NCE (paper: 4096 on STL-10,
            16384 on ImageNet).
        bank_momentum: bank update momentum (paper: 0.5, as InstDisc).
        z_estimate: ``"first_batch"`` (paper) or ``"per_batch"`` (see ``selfsup.methods.instdisc``).
        chunk_size: bank rows scored at once by ``"softmax"`` (memory ``B * chunk_size``).
        bank_init: ``"random"`` (the paper: random unit vectors) or ``"features"`` (before the
            first step, each bank's rows become the images' embeddings of its view, as
            InstDisc's option of the same name; memory-bank objectives only).

    Forward: one view ``(B, C, H, W)`` split in two; embeddings ``(B, feat_dim)`` per view.
    """

    view_recipe = "single_view"
    engine_facts = ("num_samples", "in_channels", "image_size", "mean", "std")
    lr_scaling = "linear"

    backbone: TwoViewEncoder
    z_log: Tensor
    bank_filled: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 1281167,
        in_channels: int = 3,
        image_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        views: str = "auto",
        encoder: Mapping[str, Any] | None = None,
        feat_dim: int = 128,
        objective: str = "nce",
        temperature: float = 0.07,
        num_negatives: int = 4096,
        bank_momentum: float = 0.5,
        z_estimate: str = "first_batch",
        chunk_size: int = 65536,
        bank_init: str = "random",
    ) -> None:
        super().__init__()
        if objective not in ("nce", "softmax", "infonce"):
            raise ConfigError(
                f"method.objective must be 'nce' (paper's main), 'softmax' or 'infonce', got {objective!r}"
            )
        check_bank_init(bank_init)
        if bank_init == "features" and objective == "infonce":
            raise ConfigError(
                "method.bank_init=features fills the memory banks, and objective=infonce has none: "
                "drop bank_init or use objective nce / softmax"
            )
        if chunk_size < 1:
            raise ConfigError(f"method.chunk_size must be >= 1 (bank rows scored at once), got {chunk_size}")
        if z_estimate not in ("first_batch", "per_batch"):
            raise ConfigError(f"method.z_estimate must be 'first_batch' (paper) or 'per_batch', got {z_estimate!r}")
        split = resolve_views(views, in_channels)
        channels = (1, 2) if split == "lab" else (in_channels, in_channels)
        if len(mean) == 1 and in_channels > 1:
            mean, std = tuple(mean) * in_channels, tuple(std) * in_channels
        spec = encoder_spec(backbone, encoder)
        # What rebuilds the two-view encoder from a saved file (``embedder``).
        self._embedder_spec = {
            "views": split,
            "encoder": spec,
            "channels": list(channels),
            "image_size": image_size,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        }
        encoders = [_build_encoder(spec, c, image_size) for c in channels]
        self.backbone = TwoViewEncoder(split, encoders[0], encoders[1], mean, std)
        self.head1 = nn.Linear(feature_dim(encoders[0]), feat_dim)
        self.head2 = nn.Linear(feature_dim(encoders[1]), feat_dim)
        self.objective = objective
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.bank_momentum = bank_momentum
        self.z_estimate = z_estimate
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.bank_init = bank_init
        if objective in ("nce", "softmax"):
            self.bank1 = IndexMemoryBank(num_samples, feat_dim)
            self.bank2 = IndexMemoryBank(num_samples, feat_dim)
        if bank_init == "features":
            # 1 once the banks hold the feature pass's embeddings (kept on resume: no refill).
            self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))
        if objective == "nce":
            # log Z of each view's NCE (against bank2, against bank1); -inf until estimated.
            self.register_buffer("z_log", torch.full((2,), float("-inf")))

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """The two-view encoder, which the configured backbone's options do not describe: its
        spec records the split, the view encoders' spec and channels, and the normalisation."""
        return self.eval_backbone, dict(self._embedder_spec)

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        c1, c2 = spec["channels"]
        e1, e2 = (_build_encoder(spec["encoder"], c, int(spec["image_size"])) for c in (c1, c2))
        return TwoViewEncoder(spec["views"], e1, e2, spec["mean"], spec["std"])

    @property
    def z_estimated(self) -> bool:
        return self.objective == "nce" and bool(torch.isfinite(self.z_log).all())

    def embeddings(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` -> the two views' normalised embeddings ``(B, feat_dim)`` each."""
        h1, h2 = self.backbone.encode(x)
        return F.normalize(self.head1(h1).float(), dim=1), F.normalize(self.head2(h2).float(), dim=1)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        # bank_init="features": one pass fills both banks, before the first step of a fresh run.
        if self.bank_init == "features" and not bool(self.bank_filled):
            features = initial_bank_features(self, ctx, lambda x: torch.cat(self.embeddings(x), dim=1))
            z1, z2 = features.split(self.bank1.bank.shape[1], dim=1)
            self.bank1.fill(z1)
            self.bank2.fill(z2)
            self.bank_filled.fill_(1)

    def noise_index(self, batch_size: int, device: torch.device) -> Tensor:
        """``(2, B, m)`` uniform noise indices, one set per view's NCE."""
        return torch.randint(self.num_samples, (2, batch_size, self.num_negatives), device=device)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        z1, z2 = self.embeddings(x)
        outputs: dict[str, Tensor] = {"z_std": feature_std_tensor(z1)}
        if self.objective == "infonce":
            loss = info_nce(z1, z2, temperature=self.temperature, gather=True)
            loss = loss + info_nce(z2, z1, temperature=self.temperature, gather=True)
            outputs["loss"] = loss
            return outputs
        check_index(batch.index, x.shape[0], self.num_samples, "cmc")
        index = batch.index.to(z1.device, torch.long)
        banked = dict(features1=z1.detach(), features2=z2.detach(), index=index)
        if self.objective == "softmax":
            # Each view against the other view's whole bank; the positive is bank2[i] / bank1[i].
            ce12 = bank_softmax_loss(z1, self.bank2.bank, index, self.temperature, self.chunk_size)
            ce21 = bank_softmax_loss(z2, self.bank1.bank, index, self.temperature, self.chunk_size)
            outputs.update(loss=ce12 + ce21, softmax_12=ce12.detach(), softmax_21=ce21.detach(), **banked)
            return outputs
        noise = self.noise_index(x.shape[0], z1.device)
        fixed = self.z_estimated and self.z_estimate == "first_batch"
        losses, z_logs = [], []
        # View 1 against view 2's bank and view 2 against view 1's: the positive is the other
        # view of the same image.
        for k, (z, bank) in enumerate(((z1, self.bank2.bank), (z2, self.bank1.bank))):
            candidates = torch.cat([index[:, None], noise[k]], dim=1)
            scores = bank_scores(z, bank, candidates, self.temperature)
            z_log = self.z_log[k : k + 1] if fixed else estimate_log_z(scores.detach(), self.num_samples)
            log_p = scores - z_log
            losses.append(nce_loss(log_p[:, 0], log_p[:, 1:], -math.log(self.num_samples)))
            z_logs.append(z_log.detach())
        outputs.update(
            loss=losses[0] + losses[1],
            nce_12=losses[0].detach(),
            nce_21=losses[1].detach(),
            **banked,
            z_log=torch.cat(z_logs).repeat(x.shape[0], 1),
        )
        return outputs

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        if self.objective == "infonce":
            return
        # Z and the banks change only here, after the optimiser step.
        if self.objective == "nce" and (not self.z_estimated or self.z_estimate == "per_batch"):
            self.z_log.copy_(outputs["z_log"][0])
        self.bank1.update(outputs["index"], outputs["features1"], momentum=self.bank_momentum)
        self.bank2.update(outputs["index"], outputs["features2"], momentum=self.bank_momentum)
