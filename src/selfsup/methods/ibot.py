"""iBOT: DINO's class-token self-distillation plus masked image modelling with an online
tokenizer, the momentum teacher's patch distributions.

References: Zhou, Wei, Wang, Shen, Xie, Yuille & Kong, "iBOT: Image BERT Pre-Training with
Online Tokenizer", ICLR 2022 (arXiv:2111.07832; code: github.com/bytedance/ibot).

Pseudocode (Algorithm 1 of the paper, with multi-crop)::

    gs, gt: student and teacher (ViT + head on the class token and on every patch token)
    m = blockwise masks of the global crops: half of the image-views unmasked, the others
        with a ratio r ~ U(0.1, 0.5)
    s_cls, s_patch = gs(global crops with masked patches -> mask token), gs(local crops)
    t_cls, t_patch = gt(global crops, unmasked)
    L_cls   = mean_{i global, v != i} H(softmax((t_cls_i - C) / tau_t), softmax(s_cls_v / tau_s))
    L_patch = mean_{global v} mean_images mean_{masked l} H(softmax((t_patch_vl - C') / tau_t'),
                                                            softmax(s_patch_vl / tau_s))
    loss = L_cls + L_patch; (first epoch: no update of the heads' last layers)
    gt.params = l * gt.params + (1 - l) * gs.params              # engine, ema_pairs()
    C  = m * C  + (1 - m) * mean(t_cls)                          # on_step_end
    C' = m * C' + (1 - m) * mean_images(mean_patches(t_patch))   # on_step_end

The DINOv2 options of ``DINO`` exist here too (``centering: sinkhorn`` for both the class and
the patch targets, ``koleo_weight``, ``layer_decay``); ``methods/dinov2.py`` sets them.
Randomness (masks, drop path): the global CPU generator, which the engine seeds and
checkpoints.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from selfsup.losses import cross_view_cross_entropy, dino_center_update, koleo_loss, masked_patch_cross_entropy
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs, check_token_backbone
from selfsup.methods.dino import DINOHead, _entropy, teacher_distributions
from selfsup.nn.backbones.protocol import as_token_backbone, feature_dim
from selfsup.nn.backbones.vit import without_drop_path
from selfsup.nn.heads import frozen_copy
from selfsup.nn.masking import block_mask
from selfsup.nn.multicrop import encode_by_resolution
from selfsup.nn.param_groups import layer_decay_param_groups
from selfsup.registry import METHODS
from selfsup.schedules import WarmupThenConstant


def sample_ibot_masks(
    num: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    device: torch.device | str | None = None,
) -> Tensor:
    """Blockwise masks `(num, grid_h * grid_w)` (True = masked) for ``num`` image-views.

    ``int(num * mask_probability)`` image-views, chosen at random, are masked (DINOv2's
    count; iBOT draws it per crop with the same probability 0.5), each with its own ratio
    ``r ~ U(mask_ratio)`` of BEiT-style blocks: minimum block ``(min(h, w) // 3) ** 2``
    patches and aspect ratios in ``(0.3, 1 / 0.3)``, as in iBOT's reference loader; the rest
    stay unmasked. Draws from the global CPU generator.

    References: Zhou et al. 2021, iBOT, arXiv:2111.07832; Oquab et al. 2023, DINOv2,
    arXiv:2304.07193; Bao et al. 2021, BEiT, arXiv:2106.08254.
    """
    masks = torch.zeros(num, grid_h * grid_w, dtype=torch.bool)
    num_masked = int(num * mask_probability)
    chosen = torch.randperm(num)[:num_masked].tolist()
    ratios = (mask_ratio[0] + (mask_ratio[1] - mask_ratio[0]) * torch.rand(num_masked)).tolist()
    min_block = max(1, (min(grid_h, grid_w) // 3) ** 2)
    # One call per masked image-view (its own ratio); block_mask loops over samples anyway.
    for i, ratio in zip(chosen, ratios):
        masks[i] = block_mask(1, grid_h, grid_w, ratio, min_block=min_block, min_aspect=0.3)[0]
    return masks.to(device) if device is not None else masks


@METHODS.register("ibot")
class IBOT(Method):
    """iBOT with the paper's heads, temperatures, centres, masking and multi-crop.

    Needs a ViT backbone (the token API with a mask token, created here). The class token
    feeds the class head, the student's patch tokens at masked positions the patch head;
    register tokens (``num_registers`` of the ViT) reach neither. Clip gradients with
    ``optim.clip_grad`` (paper: 3.0) and schedule weight decay with ``optim.weight_decay_end``
    (paper: 0.04 -> 0.4).

    Args:
        backbone: ViT with the token API ``forward_tokens(x, mask=...)``.
        proj_hidden_dim: hidden width of the heads' MLPs (paper: 2048).
        proj_dim: bottleneck before the last layer (paper: 256).
        out_dim: ``K``, output size of the class head (paper: 8192).
        patch_out_dim: output size of a separate patch head (paper: 8192).
        shared_head: one head for class and patch tokens (the paper's released ViT recipes:
            true), else a separate patch head with its own MLP and last layer (DINOv2; iBOT's
            own "separate" variant shares the MLP and splits only the last layer).
        norm_last_layer: keep the last layers' row norms at 1 (DINO default; iBOT's ViT-S
            recipe: false).
        head_bn: BatchNorm in the heads' MLPs (off, as in the paper).
        student_temp: student softmax temperature (paper: 0.1).
        warmup_teacher_temp, teacher_temp: class-token teacher temperature, linear warm-up
            from the first to the second (paper: 0.04 -> 0.07).
        warmup_teacher_patch_temp, teacher_patch_temp: the same for patch tokens (paper:
            0.04 -> 0.07).
        warmup_teacher_temp_epochs: length of both warm-ups (paper: 30 epochs).
        center_momentum: momentum of both centres' moving averages (paper: 0.9).
        mask_ratio: range of the per-image blockwise mask ratio (paper: (0.1, 0.5)).
        mask_probability: fraction of global image-views that are masked (paper: 0.5).
        cls_weight, patch_weight: ``lambda_1``, ``lambda_2`` (paper: 1 and 1).
        num_global_crops: leading views the teacher sees (the engine passes the recipe's).
        freeze_last_layer_epochs: epochs without updates of the heads' last layers (1).
        evaluate_teacher: evaluate and export the teacher's backbone (the paper does).
        drop_path_rate: the student's stochastic depth (paper: 0.1 for ViT-S; ``None`` keeps
            the backbone's); the teacher's is always 0.
        centering: ``"ema"`` (iBOT: centred softmax with the two moving-average centres) or
            ``"sinkhorn"`` (DINOv2: Sinkhorn-Knopp codes over the class outputs of the global
            batch and over its masked patches; no centres).
        sinkhorn_iterations: iterations for ``centering: sinkhorn`` (DINOv2: 3).
        koleo_weight: weight of KoLeo on the student's class token of each global crop
            (DINOv2: 0.1; 0: off, iBOT).
        layer_decay: layer-wise lr decay of the backbone (DINOv2: 0.9; 1: off, iBOT).
    """

    view_recipe = "multi_crop"
    engine_facts = ("num_global_crops",)
    requires_token_backbone = True
    default_ema_momentum = (0.996, 1.0)
    lr_scaling = "linear"

    center: Tensor
    patch_center: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        shared_head: bool = True,
        norm_last_layer: bool = True,
        head_bn: bool = False,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        center_momentum: float = 0.9,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        cls_weight: float = 1.0,
        patch_weight: float = 1.0,
        num_global_crops: int = 2,
        freeze_last_layer_epochs: float = 1.0,
        evaluate_teacher: bool = True,
        drop_path_rate: float | None = 0.1,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
        koleo_weight: float = 0.0,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, type(self).__name__)
        lo, hi = mask_ratio
        if not (0.0 <= lo <= hi <= 1.0 and 0.0 <= mask_probability <= 1.0):
            raise ValueError(
                f"need 0 <= mask_ratio[0] <= mask_ratio[1] <= 1 and mask_probability in [0, 1], got "
                f"{tuple(mask_ratio)} and {mask_probability}"
            )
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        if sinkhorn_iterations < 1 or koleo_weight < 0 or not 0.0 < layer_decay <= 1.0:
            raise ValueError(
                f"need sinkhorn_iterations >= 1, koleo_weight >= 0 and layer_decay in (0, 1], got "
                f"{sinkhorn_iterations}, {koleo_weight} and {layer_decay}"
            )
        if drop_path_rate is not None:
            set_rate = getattr(backbone, "set_drop_path_rate", None)
            if set_rate is None:
                raise ValueError(f"{type(backbone).__name__} has no set_drop_path_rate: set method.drop_path_rate=null")
            set_rate(drop_path_rate)
        as_token_backbone(backbone).enable_mask_token()  # before the teacher copy: same parameters
        self.backbone = backbone
        width = feature_dim(backbone)
        self.head = DINOHead(width, out_dim, proj_hidden_dim, proj_dim, head_bn, norm_last_layer)
        self.patch_head: DINOHead | None = (
            None if shared_head else DINOHead(width, patch_out_dim, proj_hidden_dim, proj_dim, head_bn, norm_last_layer)
        )
        self.teacher_backbone = without_drop_path(frozen_copy(backbone))
        self.teacher_head = frozen_copy(self.head)
        self.teacher_patch_head = None if self.patch_head is None else frozen_copy(self.patch_head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, out_dim if shared_head else patch_out_dim))
        self.student_temp = student_temp
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_patch_temp, self.teacher_patch_temp = warmup_teacher_patch_temp, teacher_patch_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.mask_ratio = (float(lo), float(hi))
        self.mask_probability = mask_probability
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.num_global_crops = num_global_crops
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.evaluate_teacher = evaluate_teacher
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.koleo_weight = koleo_weight
        self.layer_decay = layer_decay

    def heads(self, teacher: bool = False) -> tuple[nn.Module, nn.Module]:
        """The (class head, patch head) of the student or the teacher (the same module twice
        when the head is shared)."""
        cls_head, patch_head = (self.teacher_head, self.teacher_patch_head) if teacher else (self.head, self.patch_head)
        return cls_head, cls_head if patch_head is None else patch_head

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.backbone, self.teacher_backbone),
            (self.head, self.teacher_head),
        ]
        if self.patch_head is not None and self.teacher_patch_head is not None:
            pairs.append((self.patch_head, self.teacher_patch_head))
        return pairs

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone if self.evaluate_teacher else self.backbone

    def schedules(self) -> dict[str, WarmupThenConstant]:
        """Both teacher temperatures: linear warm-up over epochs, then constant."""
        epochs = self.warmup_teacher_temp_epochs
        return {
            "teacher_temp": WarmupThenConstant(self.warmup_teacher_temp, self.teacher_temp, epochs),
            "teacher_patch_temp": WarmupThenConstant(self.warmup_teacher_patch_temp, self.teacher_patch_temp, epochs),
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """The default groups, or with ``layer_decay < 1`` layer-wise lr decay over the ViT's
        blocks (heads at the full rate; no weight decay on norms, biases and tokens)."""
        if self.layer_decay == 1.0:
            return super().param_groups()
        heads = nn.ModuleDict({"head": self.head, **({"patch_head": self.patch_head} if self.patch_head else {})})
        return layer_decay_param_groups(self.backbone, heads, self.layer_decay, "backbone.", "")

    def sample_masks(self, num: int, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """`(num, grid_h * grid_w)` bool masks of the global image-views (True = masked)."""
        return sample_ibot_masks(num, grid_h, grid_w, self.mask_ratio, self.mask_probability, device)

    @torch.no_grad()
    def targets(self, teacher_out: Tensor, center: Tensor, temp: float) -> Tensor:
        """Teacher distributions `(N, K)` of outputs `(N, K)`: ``softmax((t - C) / temp)`` or
        Sinkhorn-Knopp codes over the (global) rows; each row sums to 1."""
        return teacher_distributions(teacher_out, center, temp, self.centering, self.sinkhorn_iterations)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        views, g = batch.views, self.num_global_crops
        if len(views) < 2 or not 1 <= g <= len(views):
            raise ValueError(f"{type(self).__name__} needs >= 2 views, num_global_crops={g} global; got {len(views)}")
        vit, teacher = as_token_backbone(self.backbone), as_token_backbone(self.teacher_backbone)
        cls_head, patch_head = self.heads()
        t_cls_head, t_patch_head = self.heads(teacher=True)
        global_crops = torch.cat(list(views[:g]))
        n, (h, w), p = global_crops.shape[0], global_crops.shape[-2:], vit.patch_size
        mask = self.sample_masks(n, h // p, w // p, global_crops.device)

        tokens = vit.forward_tokens(global_crops, mask=mask)  # (N, 1 + L, D), registers dropped
        cls_tokens = [tokens[:, 0]]
        if len(views) > g:  # local crops: unmasked, class token only, one call per size
            cls_tokens.append(encode_by_resolution(lambda x: vit.forward_tokens(x)[:, 0], views[g:]))
        # A frozen last layer enters the heads as a constant: no weight gradient is computed.
        frozen = self.last_layer_frozen(step)
        student_cls = cls_head(torch.cat(cls_tokens), freeze_last_layer=frozen)  # (V * B, K), view-major
        student_patch = patch_head(tokens[:, 1:][mask], freeze_last_layer=frozen)  # (M, K): masked only
        with torch.no_grad():
            t_tokens = teacher.forward_tokens(global_crops)
            teacher_cls = t_cls_head(t_tokens[:, 0]).float()
            if self.centering == "ema":  # the patch centre needs every patch's output
                t_patch_all = t_patch_head(t_tokens[:, 1:].flatten(0, 1)).float().reshape(n, mask.shape[1], -1)
                teacher_patch = t_patch_all[mask]
            else:
                teacher_patch = t_patch_head(t_tokens[:, 1:][mask]).float()
            cls_targets = self.targets(teacher_cls, self.center, step["teacher_temp"])
            patch_targets = self.targets(teacher_patch, self.patch_center, step["teacher_patch_temp"])

        # DINO's cross-view loss: every student view against every other global crop's target.
        cls_loss = cross_view_cross_entropy(student_cls, cls_targets, len(views), temperature=self.student_temp)
        patch_loss = masked_patch_cross_entropy(student_patch, patch_targets, mask, self.student_temp)
        loss = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        outputs = {
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "masked_fraction": mask.float().mean(),
            "teacher_entropy": _entropy(cls_targets),
            "teacher_patch_entropy": _entropy(patch_targets) if len(patch_targets) else loss.new_zeros(()),
            "teacher_temp": loss.new_tensor(step["teacher_temp"]),
        }
        if self.koleo_weight > 0:
            # A tensor: g >= 1 (checked above), so sum() never returns its start 0.
            koleo = cast(Tensor, sum(koleo_loss(c) for c in tokens[:, 0].chunk(g)))
            outputs["koleo"] = koleo.detach()
            loss = loss + self.koleo_weight * koleo
        if self.centering == "ema":
            # For on_step_end (concatenated over micro-batches): the forward never moves a centre.
            outputs["teacher_logits"] = teacher_cls
            outputs["teacher_patch_logits"] = t_patch_all.mean(dim=1)  # (N, K): each image's mean
        return {"loss": loss, **outputs}

    def last_layer_frozen(self, step: StepInfo) -> bool:
        """Whether the heads' last layers stay fixed at this step (the first
        ``freeze_last_layer_epochs``), as DINO's (:meth:`selfsup.methods.dino.DINO.last_layer_frozen`)."""
        return step.epoch < self.freeze_last_layer_epochs

    def on_after_backward(self, step: StepInfo) -> None:
        # No gradient, rather than a zero one, so that neither weight decay nor momentum moves
        # the last layers during the first epoch (reference code: cancel_gradients_last_layer);
        # the frozen heads' forward computed none, this clears any other path.
        if self.last_layer_frozen(step):
            for head in (self.head, self.patch_head):
                if head is not None:
                    for p in head.last_layer_parameters():
                        p.grad = None

    @torch.no_grad()
    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        if "teacher_logits" in outputs:
            self.center.copy_(dino_center_update(self.center, outputs["teacher_logits"], self.center_momentum))
            self.patch_center.copy_(
                dino_center_update(self.patch_center, outputs["teacher_patch_logits"], self.center_momentum)
            )
