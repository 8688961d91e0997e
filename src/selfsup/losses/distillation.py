"""Self-distillation losses: DINO's centred cross-entropy, its centre update, iBOT's masked
patch cross-entropy, KoLeo, and SEED's cross-entropy of similarity distributions over a queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import all_reduce_sum


def _summed_targets(codes: Sequence[Tensor], num_views: int) -> list[Tensor | None]:
    """Each student view's summed target ``sum_{i != v} q_i`` over the code views ``q_i``
    ``(B, K)`` (``v < len(codes)``: the other code views; ``v >= len(codes)``: all of them);
    ``None`` where no code view pairs with ``v`` (a single code view and ``v = 0``)."""
    total = codes[0] if len(codes) == 1 else torch.stack(list(codes)).sum(dim=0)
    summed: list[Tensor | None] = []
    for v in range(num_views):
        if v >= len(codes):
            summed.append(total)
        elif len(codes) == 1:
            summed.append(None)
        elif len(codes) == 2:
            summed.append(codes[1 - v])
        else:
            summed.append(total - codes[v])
    return summed


class _CrossViewCrossEntropy(torch.autograd.Function):
    """Forward and backward of :func:`cross_view_cross_entropy` over one ``(V * B, K)`` buffer.

    Forward: one ``log_softmax`` of all student rows and one dot product per view. Backward:
    ``d/ds_v = (rowsum(T_v) * softmax(s_v / tau) - T_v) / (tau * B * terms)``, built in place
    on one ``(V * B, K)`` buffer (the saved log-probabilities stay intact, so a retained
    graph can be differentiated again)."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, targets: Tensor, num_views: int, temperature: float) -> Tensor:
        batch = student.shape[0] // num_views
        codes = targets.chunk(targets.shape[0] // batch)
        summed = _summed_targets(codes, num_views)
        log_p = torch.log_softmax(student / temperature, dim=1)
        total = log_p.new_zeros(())
        for target, log_p_v in zip(summed, log_p.chunk(num_views)):
            if target is not None:
                total = total - torch.dot(target.reshape(-1), log_p_v.reshape(-1))
        scale = 1.0 / (batch * len(codes) * (num_views - 1))
        ctx.save_for_backward(log_p)
        ctx.summed, ctx.num_views, ctx.scale, ctx.temperature = summed, num_views, scale, temperature
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        (log_p,) = ctx.saved_tensors
        grad = log_p.exp()  # softmax(s / tau), then the gradient in place
        for target, grad_v in zip(ctx.summed, grad.chunk(ctx.num_views)):
            if target is None:
                grad_v.zero_()
            else:
                grad_v.mul_(target.sum(dim=1, keepdim=True)).sub_(target)
        return grad.mul_(grad_out * (ctx.scale / ctx.temperature)), None, None, None


@full_precision
def cross_view_cross_entropy(student_out: Tensor, targets: Tensor, num_views: int, temperature: float = 0.1) -> Tensor:
    """Compute DINO's (and SwAV's) cross-view cross-entropy on concatenated views.

    ``student_out`` ``(V * B, K)`` holds the student's outputs of ``V`` views (``B`` rows
    each, view-major), ``targets`` ``(G * B, K)`` the (detached) target distributions of the
    first ``G`` of them. The loss is ``-sum_{i < G} sum_{v != i} mean_b q_i . log
    softmax(s_v / temperature)`` divided by the ``G * (V - 1)`` pairs: exactly
    ``swav_loss(student_out.chunk(V), targets.chunk(G), temperature)``.

    Cross-entropy is linear in the target, so each student view needs one product with the
    sum of the targets it is paired with (``sum_{i != v} q_i``) instead of ``G`` products,
    and the gradient ``(rowsum(T_v) softmax(s_v / tau) - T_v) / tau`` is written in place
    (a custom backward): about 3x less element-wise work over ``(V * B, K)`` than
    ``swav_loss`` for DINO's 2 + 6 crops at ``K = 65536``. Targets get no gradient.

    References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO), arXiv:2104.14294; Caron et al. 2020, SwAV, arXiv:2006.09882.
    """
    if student_out.ndim != 2 or targets.ndim != 2 or student_out.shape[1] != targets.shape[1]:
        raise ValueError(
            f"student_out and targets must be (V * B, K) and (G * B, K), got {tuple(student_out.shape)} "
            f"and {tuple(targets.shape)}"
        )
    batch = student_out.shape[0] // num_views if num_views > 0 else 0
    if num_views < 2 or batch < 1 or student_out.shape[0] != num_views * batch or targets.shape[0] % batch:
        raise ValueError(
            f"need num_views >= 2 views of B rows and G <= num_views target views of B rows, got "
            f"{tuple(student_out.shape)} for {num_views} views and targets {tuple(targets.shape)}"
        )
    if not 1 <= targets.shape[0] // batch <= num_views:
        raise ValueError(f"need 1 <= G <= {num_views} target views, got {targets.shape[0] // batch}")
    loss: Tensor = _CrossViewCrossEntropy.apply(student_out, targets.detach(), num_views, temperature)
    return loss


@full_precision
def dino_loss(
    student_out: Sequence[Tensor],
    teacher_out: Sequence[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    """Compute DINO's cross-entropy between teacher and student crop outputs ``(B, K)``.

    ``teacher_out`` holds the teacher's outputs for the global crops, ``student_out`` the
    student's for every crop, global crops first in the same order. The teacher's
    targets are ``softmax((t - center) / teacher_temp)`` (detached: the teacher learns by
    EMA only), the student's predictions ``log_softmax(s / student_temp)``; the loss is
    ``-sum_k P_t log P_s`` averaged over the batch and over every pair (teacher crop ``i``,
    student crop ``v``) with ``v != i``: SwAV's swapped prediction (``swav_loss``) with the
    teacher's distributions as codes, computed by :func:`cross_view_cross_entropy`.
    ``center`` is ``(1, K)`` or ``(K,)``.
    Defaults are the paper's (0.1 and the final teacher temperature 0.04).

    References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO), arXiv:2104.14294.
    """
    targets = F.softmax((torch.cat(list(teacher_out)).detach() - center.detach()) / teacher_temp, dim=-1)
    return cross_view_cross_entropy(torch.cat(list(student_out)), targets, len(student_out), student_temp)


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out_cat: Tensor, momentum: float = 0.9) -> Tensor:
    """Return the new DINO centre ``(1, K)``: ``m * center + (1 - m) * mean(teacher_out)``.

    ``teacher_out_cat (N, K)`` is the teacher's output for all global crops of the local
    batch, concatenated; the mean is over the global batch (sums and counts all-reduced,
    so unequal local batch sizes are fine). Pure: ``center`` is not modified. Default
    momentum 0.9 is the paper's.

    References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO), arXiv:2104.14294.
    """
    t = teacher_out_cat.detach().to(torch.promote_types(teacher_out_cat.dtype, torch.float32))
    stats = torch.cat([t.sum(dim=0), t.new_full((1,), float(t.shape[0]))])
    stats = all_reduce_sum(stats)
    batch_center = (stats[:-1] / stats[-1]).reshape(1, -1)
    return momentum * center.reshape(1, -1).to(t.dtype) + (1.0 - momentum) * batch_center


@full_precision
def masked_patch_cross_entropy(student_out: Tensor, targets: Tensor, mask: Tensor, student_temp: float = 0.1) -> Tensor:
    """Compute iBOT's masked-patch cross-entropy against given teacher distributions.

    ``mask`` `(N, L)` bool (True = masked) covers ``N`` image-views of ``L`` patches;
    ``student_out`` `(M, K)` holds the student's head outputs at the ``M = mask.sum()``
    masked positions and ``targets`` `(M, K)` the teacher's distributions there (rows sum to
    1, detached), both in the row-major order of ``mask`` (``tokens[mask]``). Per image-view
    ``n`` with ``m_n > 0`` masked patches the loss is ``(1 / m_n) sum_{masked l}
    -sum_k P_t log softmax(s / student_temp)``; the result is the sum over image-views divided
    by ``N``: images left unmasked count as 0, as in the iBOT and DINOv2 reference code. With
    the global views concatenated (each ``B`` images), this is the mean over views of the
    per-view mean over images.

    References: Zhou et al. 2021, "iBOT: Image BERT Pre-Training with Online Tokenizer",
    arXiv:2111.07832; Oquab et al. 2023, "DINOv2", arXiv:2304.07193.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be an (N, L) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    num_masked = int(mask.sum())
    if student_out.shape != targets.shape or student_out.ndim != 2 or student_out.shape[0] != num_masked:
        raise ValueError(
            f"student_out and targets must be (M, K) with M = mask.sum() = {num_masked}, got "
            f"{tuple(student_out.shape)} and {tuple(targets.shape)}"
        )
    per_patch = -(targets.detach() * F.log_softmax(student_out / student_temp, dim=-1)).sum(dim=-1)
    # Each masked patch weighs 1 / (masked patches of its image-view).
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1).to(per_patch.dtype)
    weights = (1.0 / counts).expand(mask.shape)[mask]
    return (per_patch * weights).sum() / mask.shape[0]


@full_precision
def ibot_patch_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    mask: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
) -> Tensor:
    """Compute iBOT's masked patch self-distillation loss (MIM with an online tokenizer).

    The student saw the image-views with the ``mask`` `(N, L)` patches (True = masked)
    replaced by a mask token, the teacher saw them intact. ``student_out`` and
    ``teacher_out`` `(M, K)` are their patch-head outputs at the ``M = mask.sum()`` masked
    positions, in the row-major order of ``mask`` (``tokens[mask]``). Targets are the
    teacher's centred, sharpened ``softmax((t - center) / teacher_temp)`` (detached, with
    iBOT's separate patch centre ``(1, K)``), and the loss is
    :func:`masked_patch_cross_entropy`: averaged over the masked patches of each image-view,
    then over all ``N`` image-views (unmasked ones count as 0). Defaults are the paper's
    (student 0.1, the final teacher patch temperature 0.07).

    Conventions where lightly's ``IBOTPatchLoss`` differs: lightly is a module that keeps
    its centre and updates it inside ``forward`` (a side effect), from the masked teacher
    tokens it was given; here the loss is pure and the patch centre is updated by the caller
    with :func:`dino_center_update` over every patch (iBOT's ``center2``: the mean of each
    image's patch outputs). lightly takes the mask as ``(B, H, W)`` and one view per call;
    here it is ``(N, L)`` over the flattened grid, views concatenated along ``N`` (same
    row-major selection order, same ``1 / m_n`` weights and division by the number of
    images, so a single view gives the same value). lightly's default teacher temperature is
    0.04 (DINOv2's warm-up start), this one iBOT's final 0.07.

    References: Zhou et al. 2021, "iBOT: Image BERT Pre-Training with Online Tokenizer",
    arXiv:2111.07832 (reference code: github.com/bytedance/ibot).
    """
    targets = F.softmax((teacher_out.detach() - center.detach().reshape(1, -1)) / teacher_temp, dim=-1)
    return masked_patch_cross_entropy(student_out, targets, mask, student_temp)


@full_precision
def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Compute the KoLeo regulariser ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)``, ``(B, D)``.

    Rows are L2-normalised first; the nearest neighbour of each row is found without
    gradient (maximal dot product), and the distance to it is differentiated. Minimising
    it spreads the batch uniformly over the sphere (a Kozachenko-Leonenko differential
    entropy estimate), as DINOv2 uses on the class token.

    References: Sablayrolles et al. 2019, "Spreading vectors for similarity search",
    arXiv:1806.03198; Oquab et al. 2023, "DINOv2", arXiv:2304.07193.
    """
    if x.shape[0] < 2:
        raise ValueError("koleo_loss needs at least two rows")
    x = F.normalize(x, dim=1)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        nearest = sim.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=1)
    return -torch.log(distances + eps).mean()


@full_precision
def seed_loss(
    student: Tensor,
    teacher: Tensor,
    queue: Tensor,
    student_temperature: float = 0.2,
    teacher_temperature: float = 1e-4,
) -> Tensor:
    """Compute SEED's cross-entropy between teacher and student similarity distributions.

    Each sample's scores are taken over ``D+ = [t_i; queue]``, its own teacher embedding first:
    ``p_T = softmax([t_i . t_i, t_i . Q] / teacher_temperature)`` (detached: the teacher is
    frozen) and ``log p_S = log_softmax([s_i . t_i, s_i . Q] / student_temperature)``; the loss
    is ``-sum_j p_T log p_S`` averaged over the batch. As ``teacher_temperature -> 0`` and with
    no queue row near ``t_i``, ``p_T`` is one-hot on ``t_i`` and the loss is InfoNCE of ``s_i``
    against its teacher embedding with the queue as negatives.

    Args:
        student: ``(B, D)`` L2-normalised student embeddings (after the projection head).
        teacher: ``(B, D)`` L2-normalised teacher embeddings of the same images.
        queue: ``(K, D)`` L2-normalised past teacher embeddings (``K >= 0``).
        student_temperature: ``tau_S``; default 0.2, the authors' code (``--temp``).
        teacher_temperature: ``tau_T``; default 1e-4, the authors' code (``--distill-t``).

    References: Fang et al. 2021, "SEED: Self-supervised Distillation For Visual
    Representation", ICLR 2021, arXiv:2101.04731 (code: github.com/jacobswan1/SEED).
    """
    if student.ndim != 2 or student.shape != teacher.shape or queue.ndim != 2 or queue.shape[1] != student.shape[1]:
        raise ValueError(
            f"student and teacher must be (B, D) and queue (K, D), got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}, {tuple(queue.shape)}"
        )
    teacher, queue = teacher.detach(), queue.detach()
    teacher_logits = torch.cat([(teacher * teacher).sum(dim=1, keepdim=True), teacher @ queue.T], dim=1)
    student_logits = torch.cat([(student * teacher).sum(dim=1, keepdim=True), student @ queue.T], dim=1)
    targets = F.softmax(teacher_logits / teacher_temperature, dim=1)
    return -(targets * F.log_softmax(student_logits / student_temperature, dim=1)).sum(dim=1).mean()


@full_precision
def soft_target_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Compute SimCLR v2's distillation loss between class logits ``(B, K)``.

    ``L = -mean_i sum_y P_T(y | x_i; tau) log P_S(y | x_i; tau)`` with ``P(y | x; tau) =
    softmax(logits / tau)`` for the teacher (detached: it is fixed) and the student alike
    (eq. 2 of the paper, without Hinton's ``tau^2`` factor and without the optional
    labelled-data term). Default ``tau = 1``, which the paper's self-distillation uses.

    References: Chen, Kornblith, Swersky, Norouzi & Hinton 2020, "Big Self-Supervised Models
    are Strong Semi-Supervised Learners" (SimCLR v2), arXiv:2006.10029; Hinton, Vinyals &
    Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (B, K), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    targets = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()
