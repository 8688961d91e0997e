"""DINOv2: DINO's class-token loss and iBOT's masked patch loss with Sinkhorn-Knopp centering,
KoLeo on the class token and separate heads.

References: Oquab, Darcet, Moutakanni et al., "DINOv2: Learning Robust Visual Features without
Supervision", TMLR 2024 (arXiv:2304.07193; code: github.com/facebookresearch/dinov2);
Darcet, Oquab, Mairal & Bojanowski, "Vision Transformers Need Registers", ICLR 2024
(arXiv:2309.16588).

Pseudocode (sec. 4 of the paper)::

    m = blockwise masks of the global crops (half unmasked, the rest r ~ U(0.1, 0.5))
    s = student ViT(global crops, masked) and (local crops); t = teacher ViT(global crops)
    L_dino = mean_{i global, v != i} H(SK(dino_head_t(t_cls_i) / tau_t), dino_head_s(s_cls_v) / tau_s)
    L_ibot = mean_views mean_images mean_{masked l} H(SK(ibot_head_t(t_patch_l) / tau_t),
                                                      ibot_head_s(s_patch_l) / tau_s)
    L_koleo = sum_{global crops} KoLeo(s_cls of that crop's batch)
    loss = L_dino + L_ibot + 0.1 * L_koleo
    teacher = EMA(student), momentum 0.992 -> 1; no drop path in the teacher

SK: Sinkhorn-Knopp, 3 iterations, over the global batch (class tokens) and over all masked
patches (patch tokens); no centres. Schedules: teacher temperature 0.04 -> 0.07 over the first
30 epochs, heads' last layers frozen for the first epoch, layer-wise lr decay 0.9, student
drop path. Register tokens are a backbone option (``backbone.num_registers``, the paper's 4):
the ViT drops them from its outputs, so they reach neither head.

The paper's loss weights are kept as written (1, 1, 0.1); its reference code rescales the two
distillation terms by crop counts (e.g. the iBOT term by ``1 / n_global_crops`` on top of the
per-image mean), which only changes their relative weight.
"""

from __future__ import annotations

from torch import nn

from selfsup.methods.ibot import IBOT
from selfsup.registry import METHODS


@METHODS.register("dinov2")
class DINOv2(IBOT):
    """DINOv2's recipe on the iBOT machinery (see :class:`IBOT` for every argument).

    The defaults are the paper's: heads of 65536 prototypes (hidden 2048, bottleneck 256),
    separate DINO and iBOT heads, Sinkhorn-Knopp centering (3 iterations), KoLeo weight 0.1 on
    the student's class tokens, masks with ratio ``U(0.1, 0.5)`` on half of the global
    image-views, teacher temperature 0.04 -> 0.07 over 30 epochs for both losses, student
    temperature 0.1, last layers frozen for 1 epoch, layer-wise lr decay 0.9, student drop
    path 0.1 (teacher: none), teacher momentum 0.992 -> 1.

    Args:
        backbone: ViT with the token API; ``num_registers`` adds register tokens.
        koleo_weight: KoLeo weight (paper: 0.1).
        dino_weight, ibot_weight: weights of the class and patch losses (paper: 1, 1).
        layer_decay: layer-wise lr decay (paper: 0.9).
        others: as for :class:`IBOT`, with DINOv2's defaults.
    """

    default_ema_momentum = (0.992, 1.0)

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        out_dim: int = 65536,
        patch_out_dim: int = 65536,
        norm_last_layer: bool = True,
        head_bn: bool = False,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        sinkhorn_iterations: int = 3,
        layer_decay: float = 0.9,
        drop_path_rate: float | None = 0.1,
        num_global_crops: int = 2,
        freeze_last_layer_epochs: float = 1.0,
        evaluate_teacher: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            proj_hidden_dim=proj_hidden_dim,
            proj_dim=proj_dim,
            out_dim=out_dim,
            patch_out_dim=patch_out_dim,
            shared_head=False,
            norm_last_layer=norm_last_layer,
            head_bn=head_bn,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            # One teacher temperature schedule for both losses (the reference code's).
            warmup_teacher_patch_temp=warmup_teacher_temp,
            teacher_patch_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            mask_ratio=mask_ratio,
            mask_probability=mask_probability,
            cls_weight=dino_weight,
            patch_weight=ibot_weight,
            num_global_crops=num_global_crops,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            evaluate_teacher=evaluate_teacher,
            drop_path_rate=drop_path_rate,
            centering="sinkhorn",
            sinkhorn_iterations=sinkhorn_iterations,
            koleo_weight=koleo_weight,
            layer_decay=layer_decay,
        )
