"""Batch norm over groups of rows in one call: ``G`` sub-batches' statistics without ``G`` calls.

MoCo's shuffle BN (one BN group per GPU, emulated in one process) and SimSiam's per-view
passes (each view's BN statistics its own) both need training-mode batch norm whose
statistics come from groups of rows of the batch. Calling the network once per group gives
that but runs every layer ``G`` times on smaller inputs, and each weight gets ``G`` gradient
GEMMs plus their sum. :func:`batch_norm_groups` runs the network once: inside it, every
training-mode ``BatchNorm{1,2,3}d`` normalises each of ``G`` row groups of its input with
that group's own mean and (biased) variance, and updates its running statistics as the ``G``
successive per-group calls would. The results equal the per-group calls up to float rounding.

The groups are interleaved: group ``g`` holds rows ``g, g + G, g + 2G, ...`` (the caller
stacks its sub-batches along a new axis 1, ``torch.stack(parts, 1).flatten(0, 1)``). Then a
``(n * G, C, ...)`` input is, without a copy, the ``(n, G * C, ...)`` tensor whose channels
are the ``G * C`` (group, channel) pairs, so one call of the fused ``F.batch_norm`` (affine
parameters repeated ``G`` times) computes every group's statistics.

References: He et al. 2020, "Momentum Contrast" (shuffling BN, sec. 3.3), arXiv:1911.05722;
Chen & He 2021, "Exploring Simple Siamese Representation Learning", arXiv:2011.10566.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batch_norm_groups", "grouped_batch_norm"]


def grouped_batch_norm(bn: _BatchNorm, x: Tensor, groups: int) -> Tensor:
    """``bn`` applied to each of ``groups`` interleaved row groups of ``x`` ``(n * G, C, *)``
    (group ``g``: rows ``g, g + G, ...``) as one call per group computes it, running
    statistics included, in one fused call. Needs ``N % groups == 0``, a training-mode ``bn``
    and a momentum (not the cumulative average ``momentum=None``)."""
    n, c = x.shape[0] // groups, x.shape[1]
    if x.shape[0] % groups or not bn.training or bn.momentum is None:
        raise ValueError(
            f"grouped_batch_norm needs N % groups == 0 and a training BN with a momentum, got N={x.shape[0]}, "
            f"groups={groups}"
        )
    folded = x.reshape(n, groups * c, -1)  # a view for contiguous x: (group, channel) pairs
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    track = bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    mean = bn.running_mean.repeat(groups) if track else None  # type: ignore[union-attr]
    var = bn.running_var.repeat(groups) if track else None  # type: ignore[union-attr]
    y = F.batch_norm(folded, mean, var, weight, bias, True, bn.momentum, bn.eps)
    if track:
        assert mean is not None and var is not None  # for mypy: set together with track
        with torch.no_grad():
            # Each group's statistics updated a copy of the old ones: r_g = (1 - m) r + m s_g.
            # G successive calls give (1 - m)^G r + sum_g (1 - m)^(G - 1 - g) m s_g.
            keep = 1.0 - bn.momentum
            for running, per_group in ((bn.running_mean, mean), (bn.running_var, var)):
                assert isinstance(running, Tensor)
                shares = per_group.reshape(groups, c) - keep * running  # m s_g
                powers = keep ** torch.arange(groups - 1, -1, -1, dtype=running.dtype, device=running.device)
                running.mul_(keep**groups).add_((powers[:, None] * shares).sum(dim=0))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(groups)
    # Not a view of y for autograd (as reshape would be): an in-place op after the BN (ReLU)
    # on a view would make backward copy the whole gradient (CopySlices).
    return torch.ops.aten._unsafe_view(y, x.shape)


@contextlib.contextmanager
def batch_norm_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """Within the context, each training-mode batch norm of ``module`` with a momentum
    normalises ``groups`` interleaved row groups of its input separately (group ``g``: rows
    ``g, g + G, ...``; :func:`grouped_batch_norm`): one call of a row-wise ``module`` (convs,
    pooling, linear layers, BN) on ``n * G`` rows equals ``G`` calls on the groups.
    ``groups <= 1``, or a module without such batch norms, changes nothing; a batch whose
    size ``groups`` does not divide is an error at the first batch norm."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.momentum is not None]
    if groups <= 1 or not layers:
        yield
        return

    def grouped(bn: _BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            return grouped_batch_norm(bn, x, groups)

        return forward

    # An instance attribute shadows the class's forward for this context only.
    for bn in layers:
        bn.forward = grouped(bn)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for bn in layers:
            del bn.forward
