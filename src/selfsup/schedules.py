"""Pure per-step schedules: every time-dependent value is a function of the step.

The engine evaluates these once per optimisation step and hands the values to the method in
``StepInfo`` (DESIGN principle 3: time comes in as arguments). A method declares its own
values in ``Method.schedules()`` as objects called ``schedule(step, total_steps, epoch) ->
float`` (``epoch`` fractional), such as :class:`WarmupThenConstant` and :class:`Cosine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_schedule(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine
    decay from ``start`` to ``end`` at ``total_steps``.

    References: Loshchilov & Hutter, SGDR, 2016 (arXiv:1608.03983); Goyal et al. 2017
    (arXiv:1706.02677) for the warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: float, warmup_steps: float, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``
    (DINO's teacher temperature warm-up)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def scaled_lr(base_lr: float, batch_size: int, rule: str, reference_batch: int = 256) -> float:
    """Scales a learning rate quoted for ``reference_batch`` to the effective batch.

    ``"linear"``: lr * B / 256 (Goyal et al. 2017); ``"sqrt"``: lr * sqrt(B / 256) (SimCLR's
    rule for LARS with small batches, Chen et al. 2020, appendix B.1); ``"none"``: unchanged.
    """
    if rule == "linear":
        return base_lr * batch_size / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / reference_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (linear, sqrt or none)")


@dataclass(frozen=True)
class WarmupThenConstant:
    """Linear ramp from ``start`` to ``end`` over ``warmup_epochs`` (fractional epochs count),
    then ``end`` (DINO's teacher temperature, 0.04 -> 0.07 over 30 epochs)."""

    start: float
    end: float
    warmup_epochs: float

    def __call__(self, step: int, total_steps: int, epoch: float) -> float:
        return linear_warmup(epoch, self.warmup_epochs, self.start, self.end)


@dataclass(frozen=True)
class Cosine:
    """Cosine from ``start`` at step 0 to ``end`` at the last step (e.g. a momentum or a
    mask-ratio schedule)."""

    start: float
    end: float

    def __call__(self, step: int, total_steps: int, epoch: float) -> float:
        return cosine_schedule(step, total_steps, self.start, self.end)
