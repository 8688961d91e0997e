"""Class-balanced labelled subsets for the semi-supervised protocols (1% / 10% of the labels).

SimCLR (Chen et al. 2020, arXiv:2002.05709, sec. 4.2) and the semi-supervised literature it
follows sample a fixed, class-balanced fraction of the labelled training images and fine-tune
(or probe) on those alone. Here the subset is drawn from a seeded generator, so the same
``(labels, fraction, seed)`` gives the same images on every machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["balanced_label_subset"]


def balanced_label_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Indices of a class-balanced ``fraction`` of the labelled samples.

    Each class ``c`` with ``n_c`` labelled samples contributes ``max(1, round(fraction * n_c))``
    of them, chosen uniformly at random; unlabelled samples (label ``-1``) are never chosen.

    Args:
        labels: int64 ``(N,)`` labels, ``-1`` for unlabelled samples.
        fraction: in ``(0, 1]``; ``1`` returns every labelled index.
        seed: seeds the draw.

    Returns:
        int64 ``(M,)`` sorted indices into ``labels``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    labelled = torch.nonzero(labels >= 0).flatten()
    if fraction == 1.0 or labelled.numel() == 0:
        return labelled
    generator = torch.Generator().manual_seed(seed)
    # One random key per sample, then a stable sort by (class, key): the first k_c of each
    # class's run are a uniform draw without a Python loop over samples.
    keys = torch.rand(labelled.numel(), generator=generator, dtype=torch.float64)
    classes = labels[labelled]
    order = torch.argsort(keys)
    order = order[torch.argsort(classes[order], stable=True)]
    sorted_classes = classes[order]
    counts = torch.bincount(sorted_classes)
    starts = torch.cumsum(counts, 0) - counts
    keep_per_class = torch.clamp(torch.round(counts.double() * fraction).long(), min=1) * (counts > 0)
    rank_in_class = torch.arange(order.numel()) - starts[sorted_classes]
    chosen = order[rank_in_class < keep_per_class[sorted_classes]]
    return torch.sort(labelled[chosen]).values
