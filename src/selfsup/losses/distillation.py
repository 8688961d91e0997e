"""Self-distillation losses: DINO's centred cross-entropy, its centre update, KoLeo, and SEED's
cross-entropy of similarity distributions over a queue."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.losses.clustering import swav_loss
from selfsup.nn.distributed import all_reduce_sum


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
    teacher's distributions as codes. ``center`` is ``(1, K)`` or ``(K,)``.
    Defaults are the paper's (0.1 and the final teacher temperature 0.04).

    References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO), arXiv:2104.14294.
    """
    center = center.detach()
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]
    return swav_loss(student_out, targets, temperature=student_temp)


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
