"""The contract every method implements, and the data it is handed.

A method owns its heads, its loss and its per-step state updates; it owns no loop, optimiser,
logger or EMA timing. The loop (``selfsup.engine.loop``) calls:

    at each epoch start: ``on_epoch_start(EpochContext)`` (e.g. a feature pass for k-means)
    per optimisation step: for each micro-batch, forward under autocast -> ``training_step``
    -> backward; then ``on_after_backward`` -> clip, optimiser step -> EMA of each pair in
    ``ema_pairs()`` -> ``on_step_end(step, outputs)`` with the tensors the step returned.

What a method declares, once (the engine derives everything else from it):

* ``schedules()``: per-step values it needs beyond lr / weight decay / EMA momentum (e.g.
  DINO's teacher temperature); the engine evaluates them into ``StepInfo.extra``.
* ``ema_pairs()``: the (student, teacher) pairs; a method uses EMA iff it is non-empty.
* ``batch_fields``: optional ``Batch`` fields it reads (``"label"``, ``"text"``, ``"mask"``);
  the engine checks the data set provides them before the first step.
* ``engine_facts``: facts about the run its constructor takes (``num_samples``, ...).
* ``frozen_models``: constructor arguments that take a frozen model from an earlier run.

State that outlives a step lives in registered buffers (queues, centres, banks), so a
checkpoint of ``state_dict()`` restores it exactly; nothing is stashed on ``self`` between
``training_step`` and ``on_step_end``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One training batch.

    Attributes:
        views: augmented views, each ``(B, C, H, W)`` float; multi-crop recipes may give
            several resolutions (all global crops first, then local crops).
        index: ``(B,)`` int64 dataset indices of the samples (memory banks use them).
        label: ``(B,)`` int64 labels, handed only to methods that declare ``"label"`` in
            ``batch_fields`` (fine-tuning, semi-supervised), else ``None``.
        images: ``(B, C, H, W)`` the un-augmented images scaled to [0, 1] (for methods that
            make their own targets, e.g. pretext tasks), or ``None``.
        text: paired text of each image (image-text methods), or ``None``.
        mask: ``(B, H, W)`` int64 segmentation masks (dense methods), or ``None``.
    """

    views: list[Tensor]
    index: Tensor
    label: Tensor | None = None
    images: Tensor | None = None
    text: Any = None
    mask: Tensor | None = None


#: Facts about the run that a method may take in its constructor by declaring them in
#: ``engine_facts``: the pretraining set's size, image side and channels, the per-process
#: batch, the number of classes, the view recipe's number of global crops, and the data set's
#: normalisation ``mean`` / ``std`` (per-channel tuples; methods that need [0, 1] pixels from
#: the normalised views or ``embed`` inputs, e.g. colorization, undo it), and the pretraining
#: set's ``captions`` (every caption, image order; image-text methods train a tokenizer on them).
ENGINE_FACTS = (
    "num_samples",
    "image_size",
    "in_channels",
    "batch_size",
    "num_classes",
    "num_global_crops",
    "mean",
    "std",
    "captions",
)

#: What ``training_step`` returns: ``"loss"`` (scalar tensor), other scalars (logged), and any
#: non-scalar tensors the method needs after the optimiser step (keys to enqueue, teacher
#: outputs for a centre). The loop detaches the latter, concatenates them over the
#: micro-batches of an optimisation step along dim 0, and hands them to ``on_step_end``.
StepOutputs = Mapping[str, Tensor]


@dataclass
class EpochContext:
    """What ``on_epoch_start`` is handed.

    Attributes:
        epoch: the epoch about to start (0-based).
        step: the ``StepInfo`` of the epoch's first optimisation step.
        num_samples: size of the pretraining set.
        encode: ``encode(fn) -> (num_samples, D)``: runs ``fn`` over every pretraining image
            (un-augmented, normalised by the eval view, in eval mode is up to ``fn``), in
            dataset order (row ``i`` is sample ``i``), batched on the training device and
            gathered across processes.
    """

    epoch: int
    step: StepInfo
    num_samples: int
    encode: Callable[[Callable[[Tensor], Tensor]], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, and every scheduled value for this step.

    Attributes:
        step: global optimisation step, 0-based.
        total_steps: number of optimisation steps in the whole run.
        epoch: float epoch (``step / steps_per_epoch``).
        lr: learning rate of the base parameter group at this step.
        weight_decay: weight decay at this step.
        ema_momentum: momentum for teacher EMA updates at this step (``teacher = m * teacher
            + (1 - m) * student``).
        extra: the values of the method's own ``schedules()`` at this step (name -> value).
    """

    step: int
    total_steps: int
    epoch: float
    lr: float = 0.0
    weight_decay: float = 0.0
    ema_momentum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def with_schedules(self, schedules: Mapping[str, Callable[[int, int, float], float]]) -> StepInfo:
        """This step with each schedule's value at it in ``extra`` (see ``Method.schedules``)."""
        values = {name: float(fn(self.step, self.total_steps, self.epoch)) for name, fn in schedules.items()}
        return dataclasses.replace(self, extra={**self.extra, **values})

    def __getitem__(self, name: str) -> float:
        """A value the method declared in ``schedules()``: ``step["teacher_temp"]``."""
        try:
            return self.extra[name]
        except KeyError:
            raise KeyError(
                f"no scheduled value {name!r} in this step (declared: {sorted(self.extra)}); "
                "declare it in the method's schedules()"
            ) from None

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Base class of a self-supervised method.

    Subclasses set ``self.backbone`` (the encoder that is evaluated) and implement
    ``training_step``. Everything else has a sensible default. Capabilities are declared
    by what a method defines (``ema_pairs``, ``schedules``, ``batch_fields``), never by a
    flag kept in sync by hand.

    Class attributes:
        view_recipe: name of the default view recipe in ``selfsup.transforms`` (e.g.
            ``"two_views"``, ``"asymmetric"``, ``"multi_crop"``).
        batch_fields: optional ``Batch`` fields the method reads (``"label"``, ``"text"``,
            ``"mask"``); the engine hands only these and checks the data has them.
        engine_facts: run facts the constructor takes as keyword arguments, from
            ``ENGINE_FACTS`` (e.g. ``("num_samples",)`` to size a queue); users cannot set them.
        frozen_models: constructor arguments that take a frozen model from an earlier run: the
            config gives ``{run: runs/<name>}`` (or a ``backbone.safetensors`` path) and the
            engine passes the loaded, frozen backbone. A method keeps it in the attribute of
            the same name, which stays in eval mode when the method is put in training mode
            (a frozen model's BatchNorm statistics must not follow the new data).
        default_ema_momentum: ``(start, end)`` of the cosine momentum schedule.
        lr_scaling: default rule relating lr to batch size: ``"linear"`` (lr * B / 256),
            ``"sqrt"`` or ``"none"``.
        find_unused_parameters: set ``True`` when some trainable parameters may get no
            gradient in a step (e.g. a head used only on some steps): DistributedDataParallel
            must then search the graph for them each step, which costs time, so it is off
            by default.
        requires_token_backbone: the method needs a ViT-like backbone with the token API
            (``forward_tokens``, ``patch_size``, ``num_patches``, ``grid_size``,
            ``embed_dim``): masked image modelling (MAE, SimMIM) drops or replaces patch
            tokens, which a ConvNet cannot do. Tests and tools read it instead of names.
    """

    view_recipe: ClassVar[str] = "two_views"
    batch_fields: ClassVar[frozenset[str]] = frozenset()
    engine_facts: ClassVar[tuple[str, ...]] = ()
    frozen_models: ClassVar[tuple[str, ...]] = ()
    default_ema_momentum: tuple[float, float] = (0.996, 1.0)
    lr_scaling: str = "linear"
    find_unused_parameters: bool = False
    requires_token_backbone: bool = False

    backbone: nn.Module

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutputs:
        """Returns ``{"loss": total, "<part>_loss": ..., other monitored scalars, and tensors
        for on_step_end}`` (see ``StepOutputs``); ``loss`` is a scalar tensor."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: StepInfo) -> StepOutputs:
        """Calls ``training_step``: DistributedDataParallel hooks into ``forward``, so the
        engine calls the (possibly wrapped) module rather than ``training_step`` directly."""
        return self.training_step(batch, step)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(student, teacher)`` pairs that the engine updates by EMA after each step."""
        return []

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for name in self.frozen_models:
            frozen = getattr(self, name, None)
            if isinstance(frozen, nn.Module) and frozen is not self.backbone:
                frozen.eval()
        return self

    @property
    def uses_ema(self) -> bool:
        """Whether the engine schedules an EMA momentum: ``ema_pairs()`` is non-empty."""
        return bool(self.ema_pairs())

    def schedules(self) -> Mapping[str, Callable[[int, int, float], float]]:
        """Per-step values the method needs, ``name -> schedule(step, total_steps, epoch)``
        (see ``selfsup.schedules``); each step's values arrive in ``StepInfo.extra`` (read
        them as ``step[name]``)."""
        return {}

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Hook before the first step of each epoch (resumed runs included), e.g. DeepCluster's
        k-means over ``ctx.encode(self.backbone)``. Whatever it computes must land in buffers."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser: no weight decay (nor LARS adaptation) on
        norms and biases, per the common practice of SimCLR/BYOL/MoCo v3."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "name": "decay"},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, "lars_exclude": True},
        ]

    def on_after_backward(self, step: StepInfo) -> None:
        """Hook after ``backward`` and before the optimiser step (e.g. freeze a layer)."""

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        """Hook after the optimiser step and EMA (e.g. enqueue keys, update a bank), given the
        step's outputs (non-scalar tensors concatenated over the micro-batches)."""

    @property
    def eval_backbone(self) -> nn.Module:
        """The encoder that evaluation, fine-tuning and the exported weights use: the trained
        ``backbone`` unless a method's paper evaluates another one (DINO: the teacher)."""
        return self.backbone

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_features)`` features used for evaluation, computed by the
        ``embedder()`` module (``eval_backbone`` unless the method declares its own)."""
        return self.embedder()[0](images)

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """The module that computes ``embed`` (what ``backbone.safetensors``, exports,
        ``load_encoder`` and frozen teachers hold) and what rebuilds it: ``None`` when it is
        ``eval_backbone``, which the backbone config rebuilds; else a JSON-able spec for this
        class's ``build_embedder`` (a method whose encoder is not the configured backbone, or
        that transforms the images before it, overrides both)."""
        return self.eval_backbone, None

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        """An untrained ``embedder()`` module from its ``spec``; ``backbone()`` builds the
        configured backbone (what a saved file's weights then load into)."""
        raise NotImplementedError(f"{cls.__name__} records no embedder spec, so it has nothing to rebuild")

    def evaluate_tokens(self, batches: Iterable[Tensor]) -> dict[str, float]:
        """Metrics of a visual tokenizer over a whole split, ``{}`` for a method that is none
        (the default; ``batches`` is then not read). ``batches`` yields the split's images
        `(B, C, H, W)`, un-augmented and normalised as training's (the eval view), on the
        method's device. A tokenizer returns ``tokenizer_reconstruction`` (its own
        reconstruction objective, averaged over every image), ``codebook_usage`` (fraction of
        codes used at least once), ``codebook_perplexity`` (``exp`` of the entropy of the
        code histogram) and ``codebook_size``, computed in eval mode without gradients."""
        return {}

    @property
    def num_features(self) -> int:
        num_features: Any = self.backbone.num_features  # nn.Module.__getattr__ types it Tensor | Module
        return int(num_features)


def check_token_backbone(backbone: nn.Module, method: str) -> None:
    """Raise ``TypeError`` unless ``backbone`` implements the ViT token API that masked image
    modelling needs (``forward_tokens`` and the patch-grid attributes)."""
    needed = ("forward_tokens", "patch_size", "num_patches", "grid_size", "embed_dim")
    missing = [name for name in needed if not hasattr(backbone, name)]
    if missing:
        raise TypeError(
            f"{method} needs a Vision Transformer backbone with the token API (vit_tiny, vit_small, "
            f"vit_base); {type(backbone).__name__} lacks {', '.join(missing)}"
        )
