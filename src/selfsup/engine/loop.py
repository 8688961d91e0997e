"""The one training loop: optimisation steps of any ``Method``, nothing else.

It knows nothing of configs, run folders, logging or evaluation (``selfsup.engine.run`` wraps
it for ``selfsup pretrain``); pretraining, fine-tuning, the benchmarks and the tests all run
their steps through it. One optimisation step, at one place (:meth:`TrainingLoop.step`):

    set lr / wd -> for each micro-batch: views on the device, forward under autocast,
    finite-loss check, backward (``no_sync`` on all but the last micro-batch)
    -> method.on_after_backward -> clip, optimiser step, zero grad
    -> EMA for each (student, teacher) pair -> method.on_step_end(step, outputs)

and before the first step of every epoch, ``method.on_epoch_start``. The finite-loss check
runs before ``backward``, so a NaN never reaches the weights, the optimiser state or a
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.engine.optim import set_schedule
from selfsup.errors import TrainingError
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo
from selfsup.nn.ema import update_ema
from selfsup.schedules import cosine_schedule
from selfsup.transforms import to_float


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; names the step and every loss part."""

    def __init__(self, step: int, parts: dict[str, float]) -> None:
        self.step = step
        self.parts = parts
        shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        super().__init__(
            f"non-finite loss at step {step}: {shown}. Nothing was updated by this step; "
            "lower optim.lr, enable optim.clip_grad, or use train.precision=fp32."
        )


@dataclass
class DataBatch:
    """A batch as the data gives it, before augmentation.

    Attributes:
        images: ``(B, C, H, W)`` uint8 images.
        index: ``(B,)`` int64 sample indices in the data set.
        label: ``(B,)`` int64 labels (``-1`` = unknown), or ``None``.
        text: ``B`` captions (image-text data), or ``None``.
        mask: ``(B, H, W)`` int64 segmentation masks, or ``None``.
    """

    images: Tensor
    index: Tensor
    label: Tensor | None = None
    text: Sequence[str] | None = None
    mask: Tensor | None = None

    @classmethod
    def from_triple(cls, triple: tuple[Tensor, Tensor, Tensor]) -> DataBatch:
        """From the loaders' ``(images, labels, indices)``; all-``-1`` labels become ``None``."""
        images, labels, index = triple
        known = labels is not None and labels.numel() > 0 and bool((labels >= 0).all())
        return cls(images=images, index=index, label=labels if known else None)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def chunks(self, n: int) -> list[DataBatch]:
        """``n`` micro-batches of (nearly) equal size, in order."""
        sizes = [t.shape[0] for t in self.images.chunk(n)]
        out, start = [], 0
        for size in sizes:
            part = slice(start, start + size)
            out.append(
                DataBatch(
                    images=self.images[part],
                    index=self.index[part],
                    label=None if self.label is None else self.label[part],
                    text=None if self.text is None else list(self.text[part]),
                    mask=None if self.mask is None else self.mask[part],
                )
            )
            start += size
        return out


@dataclass(frozen=True)
class LoopSchedule:
    """The engine's own per-step values, as pure functions of the step.

    Attributes:
        total_steps: optimisation steps in the whole run.
        steps_per_epoch: optimisation steps in one pass over the data.
        peak_lr: lr after the warm-up; cosine decay to ``min_lr`` at ``total_steps``.
        min_lr: final lr.
        warmup_steps: linear lr warm-up from 0.
        weight_decay: ``(start, end)`` of a cosine weight-decay schedule (equal = constant).
        ema_momentum: ``(start, end)`` of the cosine teacher-momentum schedule.
    """

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: tuple[float, float] = (0.0, 0.0)
    ema_momentum: tuple[float, float] = (0.996, 1.0)

    def step_info(self, step: int, extra: Mapping[str, Callable[[int, int, float], float]] | None = None) -> StepInfo:
        """Every scheduled value at ``step``, the method's own (``extra``) included."""
        lr = cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, *self.weight_decay)
        momentum = cosine_schedule(step, self.total_steps, *self.ema_momentum)
        info = StepInfo(
            step=step,
            total_steps=self.total_steps,
            epoch=step / self.steps_per_epoch,
            lr=lr,
            weight_decay=wd,
            ema_momentum=momentum,
        )
        return info.with_schedules(extra or {})


def _concat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class TrainingLoop:
    """Optimisation steps of ``method`` with ``optimizer`` on batches of uint8 images.

    Args:
        method: the method to train.
        optimizer: over ``method.param_groups()`` (or any groups of its parameters).
        schedule: the engine's per-step values (lr, weight decay, EMA momentum).
        train_views: the view recipe, float images in ``[0, 1]`` ``(B, C, H, W)`` -> views.
        device: where the step runs.
        model: what the forward calls (``method`` or its ``DistributedDataParallel`` wrapper).
        accum_steps: micro-batches per optimisation step (gradient accumulation).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward; losses stay float32).
        channels_last: views in channels-last memory layout.
        clip_grad: max global gradient norm, 0 = no clipping.
        encode_pretrain: ``encode(fn) -> (N, D)`` over the whole pretraining set, for
            ``on_epoch_start`` (``None``: a method that asks for it gets a clear error).
        num_samples: size of the pretraining set (for ``EpochContext``).
    """

    def __init__(
        self,
        method: Method,
        optimizer: torch.optim.Optimizer,
        schedule: LoopSchedule,
        train_views: Callable[[Tensor], list[Tensor]],
        device: torch.device,
        *,
        model: nn.Module | None = None,
        accum_steps: int = 1,
        precision: str = "fp32",
        channels_last: bool = False,
        clip_grad: float = 0.0,
        encode_pretrain: Callable[[Callable[[Tensor], Tensor]], Tensor] | None = None,
        num_samples: int = 0,
    ) -> None:
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.method = method
        self.model = model if model is not None else method
        self.optimizer = optimizer
        self.schedule = schedule
        self.train_views = train_views
        self.device = device
        self.accum_steps = accum_steps
        self.precision = precision
        self.channels_last = channels_last
        self.clip_grad = clip_grad
        self.encode_pretrain = encode_pretrain
        self.num_samples = num_samples
        self._method_schedules = method.schedules()

    def step_info(self, step: int) -> StepInfo:
        return self.schedule.step_info(step, self._method_schedules)

    # ------------------------------------------------------------------ one step
    def _batch(self, data: DataBatch) -> Batch:
        """The method's ``Batch``: augmented views plus the optional fields it declared."""
        wanted = self.method.batch_fields
        fields: dict[str, Any] = {}
        for name in ("label", "text", "mask"):
            if name in wanted:
                value = getattr(data, name)
                if value is None:
                    raise ValueError(
                        f"{type(self.method).__name__} needs the batch field {name!r}, which this data does not provide"
                    )
                fields[name] = value.to(self.device) if isinstance(value, Tensor) else value
        x = to_float(data.images.to(self.device, non_blocking=True))
        views = self.train_views(x)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(views=views, index=data.index.to(self.device), images=x, **fields)

    def step(self, data: DataBatch, info: StepInfo) -> dict[str, float]:
        """One optimisation step on ``data``; returns the loss parts (mean over micro-batches)."""
        set_schedule(self.optimizer, info.lr, info.weight_decay)
        chunks = data.chunks(self.accum_steps)
        totals: dict[str, float] = {}
        products: dict[str, list[Tensor]] = {}
        for i, chunk in enumerate(chunks):
            batch = self._batch(chunk)
            last = i == len(chunks) - 1
            no_sync = getattr(self.model, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    out = self.model(batch, info)
                parts: dict[str, float] = {}
                for key, value in out.items():
                    if isinstance(value, Tensor) and value.ndim > 0:
                        products.setdefault(key, []).append(value.detach())
                    else:
                        parts[key] = float(value.detach()) if isinstance(value, Tensor) else float(value)
                if not math.isfinite(parts["loss"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(info.step, parts)
                (out["loss"] / len(chunks)).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / len(chunks)
        self.method.on_after_backward(info)
        if self.clip_grad > 0:
            params = [p for p in self.method.parameters() if p.grad is not None]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for student, teacher in self.method.ema_pairs():
                update_ema(student, teacher, info.ema_momentum)
        self.method.on_step_end(info, {key: _concat(parts) for key, parts in products.items()})
        return totals

    # ------------------------------------------------------------------ epochs
    def epoch_start(self, epoch: int, info: StepInfo) -> None:
        """Calls ``method.on_epoch_start`` with the pass over the pretraining set it may ask for."""

        def encode(fn: Callable[[Tensor], Tensor]) -> Tensor:
            if self.encode_pretrain is None:
                raise RuntimeError(
                    f"{type(self.method).__name__}.on_epoch_start asked for a feature pass, "
                    "but this loop was built without encode_pretrain"
                )
            return self.encode_pretrain(fn)

        self.method.on_epoch_start(EpochContext(epoch=epoch, step=info, num_samples=self.num_samples, encode=encode))

    def run(
        self,
        batches: Iterator[DataBatch],
        start_step: int = 0,
        end_step: int | None = None,
        on_step: Callable[[StepInfo, dict[str, float], int], None] | None = None,
    ) -> None:
        """Steps ``start_step .. end_step - 1`` (default: to ``schedule.total_steps``) on
        ``batches``, calling ``on_epoch_start`` at every epoch boundary and ``on_step(info,
        parts, images)`` after each step (``parts`` is empty and ``images`` 0 for a batch with
        fewer than 2 images, e.g. when every image of it failed to decode)."""
        end = self.schedule.total_steps if end_step is None else end_step
        for step in range(start_step, end):
            info = self.step_info(step)
            if step % self.schedule.steps_per_epoch == 0:
                self.epoch_start(step // self.schedule.steps_per_epoch, info)
            data = next(batches)
            if len(data) >= 2:
                parts, seen = self.step(data, info), len(data)
            else:
                parts, seen = {}, 0
            if on_step is not None:
                on_step(info, parts, seen)
