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
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm


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
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        ctx.local_batch = x.shape[0]  # type: ignore[attr-defined]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
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
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
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


# ---------------------------------------------------------------------------- shuffle BN
@torch.no_grad()
def shuffle_across_processes(x: Tensor) -> tuple[Tensor, Tensor]:
    """This process's share ``(B, ...)`` of a random shuffle of every process's ``x (B, ...)``,
    and the global permutation ``(W * B,)`` that :func:`unshuffle_across_processes` undoes.

    The first half of shuffling BN: the key encoder then normalises each key with statistics
    of a random subset of the global batch, not of the sub-batch its query came from, so a
    query and its positive key cannot share batch statistics ("cheat the pretext task").
    Every process draws a permutation (so all consume their RNG alike) and rank 0's is
    broadcast. All processes need the same ``B``. In a single process it is a plain shuffle.

    References: He et al. 2020, "Momentum Contrast", arXiv:1911.05722, section 3.3 and
    Algorithm 1 (the official ``_batch_shuffle_ddp``).
    """
    b = x.shape[0]
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if is_dist():
        dist.broadcast(perm, src=0)
    r = rank()
    return x_all[perm[r * b : (r + 1) * b]], perm


@torch.no_grad()
def unshuffle_across_processes(y: Tensor, perm: Tensor) -> Tensor:
    """The outputs ``(B, ...)`` for this process's original samples, from every process's
    outputs ``y (B, ...)`` on its share of the shuffle ``perm`` (see
    :func:`shuffle_across_processes`): position ``j`` of the gathered outputs holds sample
    ``perm[j]``, so sample ``i`` sits at ``argsort(perm)[i]``.

    References: He et al. 2020, "Momentum Contrast", arXiv:1911.05722, Algorithm 1 (the
    official ``_batch_unshuffle_ddp``).
    """
    b = y.shape[0]
    y_all = concat_all_gather(y)
    r = rank()
    return y_all[torch.argsort(perm)[r * b : (r + 1) * b]]


# ---------------------------------------------------------------------------- BatchNorm
class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics cover the batches of every process.

    The device-agnostic counterpart of ``torch.nn.SyncBatchNorm``, which refuses CPU
    tensors: it makes ``train.sync_batchnorm`` work with gloo on CPU. Per channel, the
    mean is ``sum_r sum(x_r) / N`` and the variance ``sum_r sum((x_r - mean)^2) / N`` over the
    ``N`` values of all processes (two all-reduces; the two-pass variance avoids the
    cancellation of ``E[x^2] - E[x]^2`` in float32). Both all-reduces are differentiable with
    the gradient convention of ``selfsup.nn.distributed`` (each process receives the gradient
    of the sum of all processes' losses), the same convention as ``torch.nn.SyncBatchNorm``,
    so after DDP's averaging the gradients equal one process's BatchNorm over the global batch.
    Running statistics follow ``F.batch_norm`` (unbiased running variance). In eval mode, or
    without a process group, it is plain BatchNorm. Any input with channels on dim 1 works
    (``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, ...); the state dict keys are those of
    ``nn.BatchNorm*d``, so checkpoints move freely between the two.

    References: Ioffe & Szegedy 2015, "Batch Normalization", arXiv:1502.03167; Zhang et al.
    2018, "Context Encoding for Semantic Segmentation" (cross-GPU BatchNorm), arXiv:1803.08904.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and world_size() > 1):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float()  # statistics in float32 even under autocast
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_count = x.new_tensor([x.numel() / x.shape[1]])
        sums = all_reduce_sum(torch.cat([x.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centered = x - mean.view(shape)
        var = all_reduce_sum(centered.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _to_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a :class:`GlobalBatchNorm` sharing its
    parameters and buffers (the same tensors: an optimiser built before or after sees them)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in ``module`` computes its statistics over all processes' batches.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels); elsewhere (gloo on CPU) it is
    :class:`GlobalBatchNorm`. Either way the BN parameters and buffers are the same tensor
    objects as before, so call it before building the optimiser and before DDP wrapping
    (DDP registers the parameters it sees at construction).

    References: Zhang et al. 2018, arXiv:1803.08904; Chen et al. 2020 (SimCLR, "global BN"),
    arXiv:2002.05709.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)
