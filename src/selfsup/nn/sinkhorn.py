"""Sinkhorn-Knopp equipartitioned soft assignments (SwAV codes), distributed-aware."""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.nn.distributed import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Turn prototype scores ``(B, K)`` into equipartitioned soft codes ``(B, K)``.

    Solves the entropy-regularised transport problem of SwAV: ``Q = exp(scores / epsilon)``
    is scaled so its total mass is 1, then alternately each prototype (column of
    ``scores``) is given mass ``1 / K`` and each sample (row) mass ``1 / B_global``, where
    the per-prototype sums over samples are summed across processes so the partition is
    over the global batch. Each row of the result sums to 1 (the final ``* B_global`` of
    the paper), and with enough iterations each prototype receives ``B_global / K`` of the
    total mass. Computed in float32 (float64 inputs stay float64) without grad; the
    maximum score over all processes is subtracted before ``exp`` so small ``epsilon``
    cannot overflow, which leaves the normalised result unchanged; the score range divided
    by ``epsilon`` must stay below about 80 so that no prototype's column underflows to
    zero in float32 (SwAV's scores are cosine similarities: a range of 2 / 0.05 = 40).
    Processes may hold different numbers of rows (the global count is all-reduced).
    Defaults are the paper's (epsilon 0.05, 3 iterations).

    References: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments" (SwAV), arXiv:2006.09882; Cuturi 2013, arXiv:1306.0895.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s = scores.detach().to(dtype)
    # Rows may differ between processes (e.g. masked patches, DINOv2's iBOT targets): count them.
    batch_global = int(all_reduce_sum(s.new_tensor(float(s.shape[0]))).item())
    num_prototypes = s.shape[1]

    s = s - all_reduce_max(s.max())
    q = torch.exp(s / epsilon)
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=0, keepdim=True)) / num_prototypes
        # A sample's row lives on one process, so the row sums need no communication.
        q = q / q.sum(dim=1, keepdim=True) / batch_global
    return q * batch_global
