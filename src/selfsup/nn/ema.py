"""Exponential moving average of a student into a teacher, and BYOL's momentum schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def update_ema(student: nn.Module, teacher: nn.Module, momentum: float, copy_buffers: bool = True) -> None:
    """Move the teacher's parameters toward the student's: ``t = m * t + (1 - m) * s``.

    Parameters are paired in registration order and must have equal shapes (the teacher
    is normally a deep copy of the student). Buffers (BatchNorm running statistics) are
    copied from the student when ``copy_buffers`` is set, so that a teacher evaluated in
    eval mode normalises with the statistics of the data it currently sees; methods whose
    teacher tracks its own statistics in train mode pass ``copy_buffers=False``. Uses
    ``torch._foreach_*`` so the update is a handful of fused kernels, not one per tensor.

    References: Grill et al. 2020, "Bootstrap Your Own Latent" (BYOL), arXiv:2006.07733;
    He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    s_params: list[torch.Tensor] = list(student.parameters())
    t_params: list[torch.Tensor] = list(teacher.parameters())
    _check_pairs("parameters", s_params, t_params)
    if t_params:
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    if copy_buffers:
        s_bufs = list(student.buffers())
        t_bufs = list(teacher.buffers())
        _check_pairs("buffers", s_bufs, t_bufs)
        for s, t in zip(s_bufs, t_bufs):
            t.copy_(s)


def _check_pairs(kind: str, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} {kind}, teacher has {len(teacher)}")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"{kind} #{i}: student shape {tuple(s.shape)} != teacher {tuple(t.shape)}")


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Return the EMA momentum at ``step``, rising from ``base`` to ``final`` on a cosine.

    ``m = final - (final - base) * (cos(pi * k / K) + 1) / 2``; with ``final = 1`` this is
    BYOL's ``1 - (1 - base) * (cos(pi * k / K) + 1) / 2``. ``step`` is clamped to
    ``[0, total_steps]``; ``total_steps <= 0`` gives ``final``. Defaults are BYOL's
    (0.996 to 1).

    References: Grill et al. 2020, "Bootstrap Your Own Latent" (BYOL), arXiv:2006.07733.
    """
    if total_steps <= 0:
        return float(final)
    k = min(max(step, 0), total_steps)
    return float(final - (final - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0)
