"""SimCLR v2's semi-supervised recipe: fine-tune on few labels, then distil (``selfsup distill``).

For each label fraction of ``eval.semi_fractions`` (class-balanced, seeded subsets of the
training labels, ``selfsup.eval.semi_supervised``)::

    scratch = finetune(random-init encoder, labelled subset)          # supervised baseline
    teacher = finetune(pretrained encoder, labelled subset)           # SimCLR v2: from the
                                                                      # head's middle layer
    student = new encoder + linear head (same or another architecture)
    for x in the whole training set, labels never read:               # the unlabelled data
        loss = -sum_y P_T(y|t(x); tau) log P_S(y|t(x); tau)           # eq. 2 of the paper
    report test top-1 of scratch, teacher and student

Every training runs on the shared loop (:class:`~selfsup.engine.loop.TrainingLoop`); the
teacher is the distillation method's frozen model (``frozen_models``: kept in eval mode, no
gradient), labelling each augmented batch on the fly, as the paper's teacher does.

References: Chen, Kornblith, Swersky, Norouzi & Hinton 2020, "Big Self-Supervised Models are
Strong Semi-Supervised Learners" (SimCLR v2), arXiv:2006.10029, sec. 2 and 3.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selfsup.data.loader import iterate_batches
from selfsup.engine.build import build_backbone, build_views, random_init_encoder
from selfsup.engine.finetune import adamw_epoch_loop, finetune_encoder, finetune_model, finetune_recipe, top1
from selfsup.engine.loop import DataBatch
from selfsup.engine.protocols import encoder_row_names, semi_supervised_splits
from selfsup.eval.semi_supervised import fraction_name
from selfsup.losses import soft_target_distillation_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.methods.finetune import FineTune
from selfsup.nn.backbones.protocol import feature_dim

if TYPE_CHECKING:
    from selfsup.config import Config
    from selfsup.data.base import DataSplits, ImageDataset

__all__ = ["SoftTargetDistillation", "distill_rows", "distill_student"]

#: Temperature of both softmaxes; 1 (plain soft labels, Hinton et al.'s baseline) is what the
#: SimCLR v2 distillation runs use as we read the paper; ``--temperature`` changes it.
PAPER_TEMPERATURE = 1.0


class SoftTargetDistillation(Method):
    """A student classifier trained on a frozen teacher classifier's soft labels.

    Args:
        student: the student (an encoder with a linear head), trained.
        teacher: the fine-tuned teacher, frozen (no gradient, eval mode).
        temperature: ``tau`` of both softmaxes (paper: 1).
    """

    view_recipe = "single_view"
    frozen_models = ("teacher",)
    lr_scaling = "none"

    def __init__(self, student: FineTune, teacher: FineTune, temperature: float = PAPER_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        self.student = student
        self.backbone = student.backbone
        self.teacher = teacher.requires_grad_(False).eval()
        self.temperature = temperature

    def param_groups(self) -> list[dict[str, Any]]:
        return self.student.param_groups()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        with torch.no_grad():
            teacher_logits = self.teacher.classify(x)
        student_logits = self.student.classify(x)
        loss = soft_target_distillation_loss(student_logits, teacher_logits, self.temperature)
        with torch.no_grad():
            agreement = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
        return {"loss": loss, "teacher_agreement": agreement}


def distill_student(
    teacher: FineTune,
    student_encoder: nn.Module,
    unlabelled: ImageDataset,
    num_classes: int,
    *,
    train_views: nn.Module,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    temperature: float = PAPER_TEMPERATURE,
    device: torch.device | str = "cpu",
    seed: int = 0,
    precision: str = "fp32",
) -> FineTune:
    """Train ``student_encoder`` plus a new linear head on ``teacher``'s soft targets over
    ``unlabelled`` (its labels are never read) on the shared loop; return the student."""
    device = torch.device(device)
    torch.manual_seed(seed)
    student = FineTune(student_encoder, num_classes, label_smoothing=0.0, layer_decay=1.0)
    method = SoftTargetDistillation(student, teacher, temperature).to(device)
    loop, sampler = adamw_epoch_loop(
        method,
        len(unlabelled),
        train_views,
        device,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        precision=precision,
    )

    def batches() -> Iterator[DataBatch]:
        for epoch in range(epochs):
            for images, _, index in iterate_batches(unlabelled, sampler, epoch):
                yield DataBatch(images=images, index=index)  # unlabelled: no labels handed on

    method.train()
    loop.run(batches())
    return student.eval()


def _student_encoder(
    method: Method, cfg: Config, splits: DataSplits, student_backbone: Mapping[str, Any] | None
) -> tuple[nn.Module, str]:
    """``(untrained student encoder, its description)``: the teacher's encoder architecture
    rebuilt from ``cfg.train.seed``, or the backbone ``student_backbone`` describes."""
    if student_backbone is None:
        return random_init_encoder(cfg, splits, method), cfg.backbone["name"]
    student_cfg = copy.deepcopy(cfg)
    student_cfg.backbone = dict(student_backbone)
    torch.manual_seed(cfg.train.seed)
    encoder = build_backbone(student_cfg, splits)
    options = ", ".join(f"{k}={v}" for k, v in student_backbone.items() if k != "name")
    return encoder, f"{student_backbone['name']}{f' {options}' if options else ''}"


def distill_rows(
    method: Method,
    cfg: Config,
    splits: DataSplits,
    eval_views: nn.Module,
    device: torch.device,
    *,
    precision: str,
    student_backbone: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    temperature: float = PAPER_TEMPERATURE,
    lr: float | None = None,
) -> dict[str, dict[str, float]]:
    """SimCLR v2's table for each of ``eval.semi_fractions`` (see the module doc).

    Fine-tuning (teacher and scratch) uses the ``eval.finetune_*`` recipe; distillation uses
    its batch size, weight decay and warm-up, with ``epochs`` (default
    ``eval.finetune_epochs``) over the whole unlabelled training split and ``lr`` (default
    ``eval.finetune_lr``). All three trainings run at ``precision``, ``train.precision``
    resolved for the device (``Components.precision``).

    Returns:
        ``{row: {"semi_top1@1%": ..., "semi_top1@10%": ...}}`` for the rows
        ``supervised from scratch (...)``, ``<method> fine-tuned (...)`` and
        ``<method> distilled into <student>``.

    Raises:
        ConfigError: the training split has no labels, or a fraction leaves a class without a
            label.
    """
    subsets = semi_supervised_splits(cfg, splits)
    e = cfg.eval
    epochs = e.finetune_epochs if epochs is None else epochs
    lr = e.finetune_lr if lr is None else lr
    if epochs < 1 or lr <= 0:
        raise ValueError(f"distillation needs --epochs >= 1 and --lr > 0, got {epochs} and {lr}")
    train_views = build_views(cfg, splits, "single_view").to(device)
    run_row, _ = encoder_row_names(cfg, method)
    name, backbone = cfg.method["name"], cfg.backbone["name"]
    rows: dict[str, dict[str, float]] = {}
    for fraction, indices in subsets.items():
        key = f"semi_top1@{fraction_name(fraction)}"
        labelled = splits.train.subset(indices)
        # The random-init baseline, then the pretrained encoder fine-tuned: the teacher.
        for row, from_scratch in ((f"supervised from scratch ({backbone})", True), (f"{run_row} fine-tuned", False)):
            model, _ = finetune_model(
                finetune_encoder(method, cfg, splits, from_scratch=from_scratch),
                method.num_features,
                labelled,
                splits.num_classes,
                train_views=train_views,
                device=device,
                **finetune_recipe(cfg, precision),
            )
            rows.setdefault(row, {})[key] = top1(model, splits.test, eval_views, device, e.finetune_batch_size)
        teacher = model
        encoder, student_name = _student_encoder(method, cfg, splits, student_backbone)
        feature_dim(encoder)  # a backbone without num_features fails here, before training
        student = distill_student(
            teacher,
            encoder.to(device),
            splits.train,
            splits.num_classes,
            train_views=train_views,
            epochs=epochs,
            batch_size=e.finetune_batch_size,
            lr=lr,
            weight_decay=e.finetune_weight_decay,
            warmup_epochs=e.finetune_warmup_epochs,
            temperature=temperature,
            device=device,
            seed=cfg.train.seed,
            precision=precision,
        )
        rows.setdefault(f"{name} distilled into {student_name}", {})[key] = top1(
            student, splits.test, eval_views, device, e.finetune_batch_size
        )
    return rows
