"""Encode multi-crop views with one encoder call per resolution, not one per crop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def encode_by_resolution(encoder: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> Tensor:
    """Encode ``views`` (each ``(B, C, H_v, W_v)``) into ``(V * B, D)``, rows in view order.

    Consecutive views of the same spatial size are concatenated and encoded in a single call,
    so a multi-crop batch (all global crops first, then all local crops) costs two encoder
    calls instead of ``V``: bigger batches run faster, and BatchNorm statistics cover every
    crop of a resolution, as in the SwAV and DINO reference code (``unique_consecutive`` over
    the crop sizes).

    References: Caron et al. 2020, SwAV, arXiv:2006.09882; Caron et al. 2021, DINO,
    arXiv:2104.14294.
    """
    if not views:
        raise ValueError("need at least one view")
    outputs: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.append(encoder(torch.cat(list(views[start:end]))))
        start = end
    return torch.cat(outputs)
