"""EMA update of a teacher and BYOL's cosine momentum schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from selfsup.nn.ema import cosine_momentum, update_ema


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_ema_formula_and_buffers() -> None:
    student = _net()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.data.normal_()
    student.train()(torch.randn(8, 3))  # move the student's BN running stats
    before = [p.clone() for p in teacher.parameters()]
    update_ema(student, teacher, momentum=0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(tb, sb)


def test_update_ema_moves_teacher_toward_student() -> None:
    student, teacher = _net(), _net()

    def gap() -> float:
        pairs = zip(student.parameters(), teacher.parameters())
        return sum(float((s - t).detach().norm()) for s, t in pairs)

    g0 = gap()
    update_ema(student, teacher, momentum=0.5)
    assert gap() == pytest.approx(0.5 * g0, rel=1e-5)
    update_ema(student, teacher, momentum=1.0)
    assert gap() == pytest.approx(0.5 * g0, rel=1e-5)
    update_ema(student, teacher, momentum=0.0)
    assert gap() == 0.0


def test_update_ema_can_keep_teacher_buffers_and_checks_structure() -> None:
    student, teacher = _net(), _net()
    student.train()(torch.randn(8, 3))
    teacher_stats = teacher[1].running_mean.clone()
    update_ema(student, teacher, 0.9, copy_buffers=False)
    assert torch.equal(teacher[1].running_mean, teacher_stats)
    with pytest.raises(ValueError):
        update_ema(student, nn.Linear(3, 4), 0.9)
    with pytest.raises(ValueError):
        update_ema(student, teacher, 1.5)


def test_update_ema_records_no_graph() -> None:
    student, teacher = _net(), _net()
    update_ema(student, teacher, 0.99)
    assert all(p.grad_fn is None for p in teacher.parameters())


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(50, 100) == pytest.approx(1 - 0.004 * 0.5)
    k, total = 30, 100
    assert cosine_momentum(k, total, base=0.99) == pytest.approx(
        1 - (1 - 0.99) * (math.cos(math.pi * k / total) + 1) / 2
    )
    values = [cosine_momentum(s, 20, base=0.9, final=0.99) for s in range(21)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(500, 100) == 1.0 and cosine_momentum(-3, 100) == pytest.approx(0.996)
    assert cosine_momentum(0, 0) == 1.0
