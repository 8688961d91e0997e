"""Projection and prediction heads (MLPs) as used by the self-supervised papers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.nn.distributed import world_size

Norm = Literal["bn", "bn_noaffine", "none"]


def _norm(kind: Norm, dim: int) -> list[nn.Module]:
    if kind == "bn":
        return [nn.BatchNorm1d(dim)]
    if kind == "bn_noaffine":
        return [nn.BatchNorm1d(dim, affine=False)]
    if kind == "none":
        return []
    raise ValueError(f"unknown norm {kind!r} (bn, bn_noaffine or none)")


def mlp_head(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    hidden_norm: Norm = "bn",
    output_norm: Norm = "none",
) -> nn.Sequential:
    """An MLP ``(B, in_dim) -> (B, out_dim)``: ``num_layers`` linear layers, each hidden one
    followed by ``hidden_norm`` and ReLU, the last optionally by ``output_norm``.

    The papers' heads are instances of it:
      * SimCLR v1 (Chen et al. 2020, arXiv:2002.05709): "a MLP with one hidden layer"
        -> ``num_layers=2``; SimCLR v2 (arXiv:2006.10029) uses a 3-layer head.
      * MoCo v2 (Chen et al. 2020, arXiv:2003.04297): "a 2-layer MLP head (hidden layer
        2048-d, with ReLU)" -> ``hidden_norm="none"``.
      * BYOL (Grill et al. 2020, arXiv:2006.07733): "a linear layer with output size 4096
        followed by batch normalization, rectified linear units, and a final linear layer
        with output dimension 256" -> projector and predictor alike.
      * SimSiam / Barlow Twins: 3 layers with BN on the output.
    Linear layers followed by BN carry no bias (the BN shift makes it redundant).
    """
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [
            nn.Linear(dim, hidden_dim, bias=hidden_norm == "none"),
            *_norm(hidden_norm, hidden_dim),
            nn.ReLU(inplace=True),
        ]
        dim = hidden_dim
    layers += [nn.Linear(dim, out_dim, bias=output_norm == "none"), *_norm(output_norm, out_dim)]
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: a teacher / momentum encoder."""
    import copy

    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def maybe_frozen_linear(x: Tensor, weight: Callable[[], Tensor], frozen: bool = False) -> Tensor:
    """``F.linear(x, weight())``, ``(B, D) -> (B, K)`` for a ``(K, D)`` weight; with ``frozen``
    the weight enters as a constant (built without autograd), so backward still gives ``x``
    its gradient but skips the weight's (a ``K x D`` GEMM over the batch) instead of computing
    it for the method to throw away. For output layers held fixed early in training: DINO's,
    iBOT's and DINOv2's last head layer during the first epoch, SwAV's prototypes during the
    first iterations (the methods still clear that gradient in ``on_after_backward``, so no
    other path moves the layer either). Forward values are the same either way.

    Under several processes the weight's gradient is computed as usual (and cleared by the
    method): ``DistributedDataParallel`` waits for a gradient of every parameter it was not
    told may go unused, and fails at the next step when one never comes.

    References: Caron et al. 2021, DINO, arXiv:2104.14294 (reference code,
    ``cancel_gradients_last_layer``); Caron et al. 2020, SwAV, arXiv:2006.09882 (prototypes
    frozen during the first epoch).
    """
    if not frozen or world_size() > 1:
        return F.linear(x, weight())
    with torch.no_grad():
        fixed = weight().detach()
    return F.linear(x, fixed)
