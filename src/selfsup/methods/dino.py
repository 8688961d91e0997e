"""DINO: self-distillation with no labels; a student matches a momentum teacher's centred,
sharpened output distribution across multi-crop views.

References: Caron, Touvron, Misra, Jégou, Mairal, Bojanowski & Joulin, "Emerging Properties
in Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294).

Pseudocode (Algorithm 1 of the paper, with multi-crop)::

    gs, gt: student and teacher networks (backbone + DINO head), gt = copy of gs
    s = gs(all crops)                      # one backbone call per crop size
    t = gt(global crops)                   # the teacher sees the global crops only
    loss = mean_{i global, v != i} H(softmax((t_i - C) / tau_t), softmax(s_v / tau_s))
    loss.backward(); (first epoch: no update of the last layer); update(gs)
    gt.params = l * gt.params + (1 - l) * gs.params       # engine, ema_pairs()
    C = m * C + (1 - m) * mean(t)                         # on_step_end

Two DINOv2 options (Oquab et al. 2023, arXiv:2304.07193, sec. 4): ``centering: sinkhorn``
replaces the centred softmax by Sinkhorn-Knopp codes of the teacher's global-crop outputs
(``Q = SK(exp(t / tau_t))``, 3 iterations, no centre), and ``koleo_weight > 0`` adds
``w * sum_{global crops} KoLeo(student backbone features)``, which spreads each crop's batch
of features over the sphere.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import cross_view_cross_entropy, dino_center_update, koleo_loss
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.backbones.vit import without_drop_path
from selfsup.nn.heads import frozen_copy, maybe_frozen_linear
from selfsup.nn.multicrop import encode_by_resolution
from selfsup.nn.sinkhorn import sinkhorn_knopp
from selfsup.registry import METHODS
from selfsup.schedules import WarmupThenConstant


class DINOHead(nn.Module):
    """DINO's projection head ``(B, in_dim) -> (B, out_dim)``.

    "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden
    dimension 2048 followed by l2 normalization and a weight normalized fully connected
    layer with K dimensions." The MLP uses GELU and ends in a ``bottleneck_dim`` (256)
    layer. The last layer is ``W = g * V / ||V||`` row-wise; with ``norm_last_layer`` the
    gain ``g`` stays 1 (not trained) and the outputs are ``K`` cosine similarities ("not
    normalizing leads to better performance but can make the training unstable", reference
    code).

    Attributes:
        mlp: the 3-layer MLP ``(B, in_dim) -> (B, bottleneck_dim)``.
        last_layer_v: ``(K, bottleneck_dim)`` direction of the last layer's weights.
        last_layer_g: ``(K, 1)`` gain of the last layer's rows (frozen at 1 by default).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(2):
            layers += [nn.Linear(dim, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # the reference code's initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # nn.Linear's default initialisation for the directions, as in the reference code.
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_layer_v, a=math.sqrt(5))
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weight-normalised last layer's parameters (frozen during the first epoch)."""
        return [self.last_layer_v, self.last_layer_g]

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """Head outputs ``(B, K)``; with ``freeze_last_layer`` the last layer's weights enter
        as constants, so backward skips their gradient (a ``K x bottleneck`` GEMM) rather
        than computing it to throw it away."""
        x = F.normalize(self.mlp(x), dim=-1)
        return maybe_frozen_linear(x, self.last_layer_weight, freeze_last_layer)

    def last_layer_weight(self) -> Tensor:
        """The last layer's weights ``(K, bottleneck_dim)``: ``g * V / ||V||`` row-wise."""
        return self.last_layer_g * F.normalize(self.last_layer_v, dim=1)


@METHODS.register("dino")
class DINO(Method):
    """DINO with the paper's head, temperatures, centring and multi-crop.

    Works with any backbone (ResNet, ConvNet, ViT; a ViT's positional embeddings are
    interpolated for the local crops). Clip gradients with ``optim.clip_grad`` (paper: 3.0)
    and schedule weight decay with ``optim.weight_decay_end`` (paper: 0.04 -> 0.4).

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: hidden width of the head's MLP (paper: 2048).
        proj_dim: bottleneck before the last layer (paper: 256).
        out_dim: ``K``, output size of the head (paper: 65536).
        norm_last_layer: keep the last layer's row norms at 1 (paper: true).
        head_bn: BatchNorm in the head's MLP (the reference code's ``use_bn_in_head``; off).
        student_temp: student softmax temperature (paper: 0.1).
        warmup_teacher_temp: teacher temperature at epoch 0 (paper: 0.04).
        teacher_temp: teacher temperature after the warm-up (paper: 0.07).
        warmup_teacher_temp_epochs: length of the linear teacher-temperature warm-up
            (paper: 30 epochs).
        center_momentum: momentum of the centre's moving average (paper: 0.9).
        num_global_crops: leading views the teacher sees (the engine passes the view recipe's
            ``num_global``; paper: 2).
        freeze_last_layer_epochs: epochs during which the head's last layer is not updated
            (paper: 1).
        evaluate_teacher: evaluate and export the teacher's backbone, as the paper does (its
            sec. 5.2: the teacher outperforms the student throughout training).
        centering: ``"ema"`` (DINO: subtract the moving-average centre, softmax at the
            teacher temperature) or ``"sinkhorn"`` (DINOv2: Sinkhorn-Knopp codes over the
            global batch at epsilon = the teacher temperature).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``centering: sinkhorn`` (DINOv2: 3).
        koleo_weight: weight of the KoLeo regulariser on the student's backbone features of
            each global crop (DINOv2: 0.1; 0 turns it off, DINO's default).
    """

    view_recipe = "multi_crop"
    engine_facts = ("num_global_crops",)
    default_ema_momentum = (0.996, 1.0)
    lr_scaling = "linear"

    center: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        out_dim: int = 65536,
        norm_last_layer: bool = True,
        head_bn: bool = False,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        center_momentum: float = 0.9,
        num_global_crops: int = 2,
        freeze_last_layer_epochs: float = 1.0,
        evaluate_teacher: bool = True,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
        koleo_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        if sinkhorn_iterations < 1 or koleo_weight < 0:
            raise ValueError(
                f"need sinkhorn_iterations >= 1 and koleo_weight >= 0, got {sinkhorn_iterations} and {koleo_weight}"
            )
        self.backbone = backbone
        self.head = DINOHead(feature_dim(backbone), out_dim, proj_hidden_dim, proj_dim, head_bn, norm_last_layer)
        # The teacher's targets come from the whole network: no stochastic depth (iBOT/DINOv2).
        self.teacher_backbone = without_drop_path(frozen_copy(backbone))
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp = student_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.num_global_crops = num_global_crops
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.evaluate_teacher = evaluate_teacher
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.koleo_weight = koleo_weight

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone if self.evaluate_teacher else self.backbone

    def schedules(self) -> dict[str, WarmupThenConstant]:
        """The teacher temperature: linear warm-up over epochs, then constant (paper sec. 3.1)."""
        return {
            "teacher_temp": WarmupThenConstant(
                self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs
            )
        }

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        views = batch.views
        if len(views) < 2 or not 1 <= self.num_global_crops <= len(views):
            raise ValueError(
                f"DINO needs at least 2 views, num_global_crops={self.num_global_crops} of "
                f"them global; got {len(views)}"
            )
        features = encode_by_resolution(self.backbone, views)
        student_out = self.head(features, freeze_last_layer=self.last_layer_frozen(step))  # (V * B, K)
        with torch.no_grad():
            global_crops = torch.cat(list(views[: self.num_global_crops]))
            teacher_cat = self.teacher_head(self.teacher_backbone(global_crops)).float()
        teacher_temp = step["teacher_temp"]
        targets = self.teacher_targets(teacher_cat, teacher_temp)
        # DINO's cross-entropy over (teacher crop i, student crop v != i) pairs is SwAV's swapped
        # prediction with the teacher's distributions as codes (dino_loss for the EMA centre),
        # summed per student view over its teacher crops (cross-entropy is linear in the target).
        loss = cross_view_cross_entropy(student_out, targets, len(views), temperature=self.student_temp)
        metrics = {"teacher_temp": loss.new_tensor(teacher_temp), "teacher_entropy": _entropy(targets)}
        if self.koleo_weight > 0:
            global_features = features[: len(global_crops)].chunk(self.num_global_crops)
            # A tensor: num_global_crops >= 1 (checked above), so sum() never returns its start 0.
            koleo = cast(Tensor, sum(koleo_loss(f) for f in global_features))
            metrics["koleo"] = koleo.detach()
            loss = loss + self.koleo_weight * koleo
        outputs = {"loss": loss, **metrics}
        if self.centering == "ema":
            # For on_step_end (concatenated over accumulated micro-batches): the forward never
            # changes the centre itself.
            outputs["teacher_logits"] = teacher_cat
        return outputs

    @torch.no_grad()
    def teacher_targets(self, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        """The teacher's target distributions ``(N, K)`` for its global-crop outputs ``(N, K)``:
        ``softmax((t - C) / tau_t)`` (DINO) or Sinkhorn-Knopp codes of ``t / tau_t`` over the
        global batch (DINOv2); rows sum to 1."""
        return teacher_distributions(teacher_out, self.center, teacher_temp, self.centering, self.sinkhorn_iterations)

    def last_layer_frozen(self, step: StepInfo) -> bool:
        """Whether the head's last layer stays fixed at this step (the first
        ``freeze_last_layer_epochs``): "typically [keeping the output layer fixed] during the
        first epoch helps training" (reference code)."""
        return step.epoch < self.freeze_last_layer_epochs

    def on_after_backward(self, step: StepInfo) -> None:
        # The frozen head's forward gives the last layer no gradient at all (not a zero one), so
        # that neither weight decay nor optimiser momentum moves it; this clears any other path.
        if self.last_layer_frozen(step):
            for p in self.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        if "teacher_logits" in outputs:
            self.center.copy_(dino_center_update(self.center, outputs["teacher_logits"], self.center_momentum))


@torch.no_grad()
def teacher_distributions(
    teacher_out: Tensor, center: Tensor, temp: float, centering: str, sinkhorn_iterations: int
) -> Tensor:
    """Teacher distributions ``(N, K)`` of outputs ``(N, K)``: ``softmax((t - C) / temp)``
    (DINO's EMA centre ``C``) or, with ``centering="sinkhorn"``, Sinkhorn-Knopp codes of
    ``t / temp`` over the (global) rows (DINOv2); each row sums to 1. Shared by DINO's class
    token and iBOT/DINOv2's class and patch tokens (an empty row set skips Sinkhorn)."""
    if centering == "sinkhorn" and teacher_out.shape[0] > 0:
        return sinkhorn_knopp(teacher_out, epsilon=temp, iterations=sinkhorn_iterations)
    return F.softmax((teacher_out - center).div_(temp), dim=-1)


def _entropy(p: Tensor) -> Tensor:
    """Mean entropy of the rows of ``(B, K)`` distributions: log K when uniform (collapse to
    uniformity), 0 when one-hot (collapse to one dimension); DINO's Figure 7 monitor."""
    return torch.special.entr(p).sum(dim=-1).mean().detach()  # entr(p) = -p log p, 0 at p = 0
