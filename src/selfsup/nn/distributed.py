"""Guarded ``torch.distributed`` helpers that reduce to no-ops in a single process.

Gradient convention (read this before writing a gathered loss):
    Every differentiable collective here (``gather_with_grad``, ``all_reduce_sum``,
    ``all_reduce_mean``) back-propagates on each rank the gradient of the *sum over ranks*
    of the per-rank losses. DDP then averages parameter gradients over ranks, so the
    effective objective is the *mean over ranks* of the per-rank losses. When every rank
    computes the mean loss over its own ``B`` samples (against globally gathered
    candidates), that mean over ranks is exactly the single-process mean over the global
    batch ``W * B``: world size ``W`` with batch ``B`` gives the same gradient as one process
    with batch ``W * B``. A loss that is itself global (every rank computes the same value,
    e.g. Barlow Twins on an all-reduced correlation) also comes out right, because its sum
    over ranks is ``W`` times it and DDP divides by ``W``.

    Consequence for code outside DDP: the raw ``.grad`` a rank sees on a gathered
    *input* is ``W`` times the gradient of the global mean loss; divide by ``W`` (as DDP does
    for parameters) to compare with a single-process run.

All collectives assume the same tensor shape on every rank (use ``drop_last=True``) and
must be reached by every rank in the same order, backward passes included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx


def is_dist() -> bool:
    """Return whether a ``torch.distributed`` process group is available and initialised.

    References: Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677.
    """
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Return the number of processes (1 when not distributed).

    References: Goyal et al. 2017, arXiv:1706.02677.
    """
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Return this process's rank (0 when not distributed).

    References: Goyal et al. 2017, arXiv:1706.02677.
    """
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    """Return whether this is rank 0, the process that logs and writes checkpoints.

    References: Goyal et al. 2017, arXiv:1706.02677.
    """
    return rank() == 0


def _all_gather_cat(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Gather ``(B, ...)`` from every rank into ``(W * B, ...)`` in rank order, without grad.

    For targets that must not receive gradients (MoCo keys entering a queue, memory-bank
    updates). In a single process it returns ``x.detach()``.

    References: He et al. 2020, "Momentum Contrast", arXiv:1911.05722.
    """
    if not is_dist() or world_size() == 1:
        return x.detach()
    return _all_gather_cat(x.detach())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns, to each rank, the rank-summed grad of its slice."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.local_batch = x.shape[0]  # type: ignore[attr-defined]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank used this rank's slice in its own loss; the slice's gradient of the
        # summed objective is the sum of those contributions.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        b = ctx.local_batch  # type: ignore[attr-defined]
        r = rank()
        return grad[r * b : (r + 1) * b]


def gather_with_grad(x: Tensor) -> Tensor:
    """Gather ``(B, ...)`` from every rank into ``(W * B, ...)`` keeping the autograd graph.

    Backward all-reduces (sums) the incoming ``(W * B, ...)`` gradient and returns this
    rank's ``(B, ...)`` slice, i.e. the gradient of the sum over ranks of the per-rank
    losses. With DDP's averaging this equals the single-process gradient on the global
    batch when each rank's loss is a mean over its local samples (see the module docstring).
    Identity in a single process.

    References: Chen et al. 2020, "A Simple Framework for Contrastive Learning" (SimCLR),
    arXiv:2002.05709.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Each rank's input feeds every rank's output, so its gradient sums all of them.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum a tensor of any shape over ranks, out of place and differentiably.

    Backward sums the gradients over ranks (same convention as ``gather_with_grad``), so a
    global statistic built from it (Barlow Twins' correlation, global batch moments) gets
    the single-process gradient after DDP's averaging. Returns ``x`` itself in a single
    process.

    References: Zbontar et al. 2021, "Barlow Twins", arXiv:2103.03230.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Average a tensor of any shape over ranks, out of place and differentiably.

    References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO, global teacher centre), arXiv:2104.14294.
    """
    if not is_dist() or world_size() == 1:
        return x
    return all_reduce_sum(x) / world_size()


@torch.no_grad()
def all_reduce_max(x: Tensor) -> Tensor:
    """Take the element-wise maximum of a tensor over ranks, out of place, without grad.

    References: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments" (SwAV, stable Sinkhorn), arXiv:2006.09882.
    """
    if not is_dist() or world_size() == 1:
        return x.detach()
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y
