"""iBOT's masked patch self-distillation loss against the paper's formula in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from selfsup.losses import ibot_patch_loss, masked_patch_cross_entropy

V, B, L, K = 2, 4, 9, 6  # two global views of four images, 3x3 patches, 6 prototypes


def ref_ibot_patch(
    student: Tensor, teacher: Tensor, masks: Tensor, center: Tensor, student_temp: float, teacher_temp: float
) -> float:
    """iBOT's L_MIM written out plainly in float64: for each global view v and image b,
    (1 / m_vb) * sum over masked patches l of -sum_k P_t(k) log P_s(k); images without a masked
    patch count 0; mean over the B images of a view, then over the views.

    student, teacher: (V, B, L, K) outputs at every patch; masks: (V, B, L) bool; center: (K,).
    """
    s, t, c = student.double().tolist(), teacher.double().tolist(), center.double().tolist()
    total = 0.0
    for v in range(student.shape[0]):
        view = 0.0
        for b in range(student.shape[1]):
            masked = [l for l in range(student.shape[2]) if bool(masks[v, b, l])]
            if not masked:
                continue
            image = 0.0
            for l in masked:
                t_logits = [(t[v][b][l][k] - c[k]) / teacher_temp for k in range(len(c))]
                s_logits = [s[v][b][l][k] / student_temp for k in range(len(c))]
                t_max, s_max = max(t_logits), max(s_logits)
                t_norm = sum(math.exp(x - t_max) for x in t_logits)
                s_lse = s_max + math.log(sum(math.exp(x - s_max) for x in s_logits))
                p_t = [math.exp(x - t_max) / t_norm for x in t_logits]
                image += -sum(p * (x - s_lse) for p, x in zip(p_t, s_logits))
            view += image / len(masked)
        total += view / student.shape[1]
    return total / student.shape[0]


def _data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(V, B, L, K, generator=g)
    teacher = torch.randn(V, B, L, K, generator=g)
    masks = torch.rand(V, B, L, generator=g) < 0.4
    masks[0, 1] = False  # an unmasked image (counts 0, still divides by B)
    masks[1, 2] = True  # a fully masked one
    center = 0.3 * torch.randn(K, generator=g)
    return student, teacher, masks, center


def test_ibot_patch_loss_matches_the_float64_formula_over_both_views() -> None:
    student, teacher, masks, center = _data()
    flat_mask = masks.reshape(V * B, L)  # the views concatenated along the batch
    s_masked = student.reshape(V * B, L, K)[flat_mask]
    t_masked = teacher.reshape(V * B, L, K)[flat_mask]
    for dtype in (torch.float64, torch.float32):
        got = ibot_patch_loss(s_masked.to(dtype), t_masked.to(dtype), flat_mask, center.to(dtype), 0.1, 0.07)
        expected = ref_ibot_patch(student, teacher, masks, center, 0.1, 0.07)
        assert got.dtype == dtype
        assert float(got) == pytest.approx(expected, rel=1e-10 if dtype == torch.float64 else 1e-5)
    # Each view on its own gives the per-view terms; the two-view loss is their mean.
    per_view = [
        ibot_patch_loss(student[v][masks[v]], teacher[v][masks[v]], masks[v], center, 0.1, 0.07) for v in range(V)
    ]
    joint = ibot_patch_loss(s_masked, t_masked, flat_mask, center, 0.1, 0.07)
    torch.testing.assert_close(joint, sum(per_view) / V)


def test_only_masked_positions_get_gradient_and_count() -> None:
    student, teacher, masks, center = _data(1)
    flat_mask = masks.reshape(V * B, L)
    full = student.reshape(V * B, L, K).clone().requires_grad_(True)
    loss = ibot_patch_loss(full[flat_mask], teacher.reshape(V * B, L, K)[flat_mask], flat_mask, center)
    loss.backward()
    assert full.grad is not None
    assert torch.all(full.grad[~flat_mask] == 0)
    assert torch.all(full.grad[flat_mask].abs().sum(dim=-1) > 0)
    # Changing the teacher at unmasked positions changes nothing (its rows there are never read).
    teacher_b = teacher.clone()
    teacher_b[~masks] = 100.0
    expected = ref_ibot_patch(student, teacher_b, masks, center, 0.1, 0.07)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_masked_patch_cross_entropy_equals_the_centred_loss_with_softmax_targets() -> None:
    student, teacher, masks, center = _data(2)
    flat_mask = masks.reshape(V * B, L)
    s_masked = student.reshape(V * B, L, K)[flat_mask]
    t_masked = teacher.reshape(V * B, L, K)[flat_mask]
    targets = torch.softmax((t_masked - center) / 0.05, dim=-1)
    torch.testing.assert_close(
        masked_patch_cross_entropy(s_masked, targets, flat_mask, student_temp=0.2),
        ibot_patch_loss(s_masked, t_masked, flat_mask, center, student_temp=0.2, teacher_temp=0.05),
    )
    # No masked patch at all: the loss is 0 (every image counts 0).
    none = torch.zeros(3, L, dtype=torch.bool)
    assert float(masked_patch_cross_entropy(torch.zeros(0, K), torch.zeros(0, K), none)) == 0.0


def test_patch_loss_rejects_misaligned_inputs() -> None:
    _, _, masks, _ = _data()
    flat_mask = masks.reshape(V * B, L)
    m = int(flat_mask.sum())
    with pytest.raises(ValueError, match="mask.sum"):
        masked_patch_cross_entropy(torch.zeros(m + 1, K), torch.zeros(m + 1, K), flat_mask)
    with pytest.raises(ValueError, match="bool"):
        masked_patch_cross_entropy(torch.zeros(m, K), torch.zeros(m, K), flat_mask.float())
