"""Labelled subsets of the semi-supervised protocol: 1% and 10% of the labels, class-balanced.

SimCLR (Chen et al. 2020, arXiv:2002.05709, sec. 4.2) fine-tunes on a class-balanced 1% and
10% of ImageNet's labels and compares with the same recipe from random initialisation (SimCLR
v2, Chen et al. 2020, arXiv:2006.10029, sec. 3 uses the same splits). The subsets are drawn by
:func:`~selfsup.eval.label_subset.balanced_label_subset`; here a fraction that would round a
class down to no label at all is refused instead of silently rounded up, since such a
"1%" subset would in fact be larger and no longer the protocol's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfsup.eval.label_subset import balanced_label_subset

__all__ = ["DEFAULT_LABEL_FRACTIONS", "fraction_name", "semi_supervised_subsets"]

#: The fractions of SimCLR's semi-supervised table (1% and 10% of the labels).
DEFAULT_LABEL_FRACTIONS: tuple[float, ...] = (0.01, 0.1)


def fraction_name(fraction: float) -> str:
    """``0.01 -> "1%"``, ``0.1 -> "10%"``, ``0.025 -> "2.5%"`` (results.json keys)."""
    return f"{100 * fraction:.6g}%"


def semi_supervised_subsets(
    labels: Tensor, fractions: Sequence[float] = DEFAULT_LABEL_FRACTIONS, seed: int = 0
) -> dict[float, Tensor]:
    """The class-balanced, seeded labelled subset of each fraction.

    Class ``c`` with ``n_c`` labels keeps ``round(fraction * n_c)`` of them, drawn by a
    generator seeded with ``seed`` (the same subset on every machine).

    Args:
        labels: ``(N,)`` int labels, ``-1`` for unlabelled samples.
        fractions: each in ``(0, 1]``.
        seed: seeds every draw.

    Returns:
        ``{fraction: (M,) sorted int64 indices into labels}``.

    Raises:
        ValueError: a fraction outside ``(0, 1]``, no labels, or a fraction that leaves a
            class without a label (the message names the smallest fraction that does not).
    """
    counts = torch.bincount(labels[labels >= 0].long()) if labels.numel() else torch.zeros(0, dtype=torch.long)
    present = counts[counts > 0]
    if present.numel() == 0:
        raise ValueError("the semi-supervised protocol needs labels, and this split has none")
    smallest = int(present.min())
    out: dict[float, Tensor] = {}
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
        if round(fraction * smallest) < 1:
            rarest = int(torch.nonzero(counts == smallest).flatten()[0])
            raise ValueError(
                f"{fraction_name(fraction)} of the labels leaves class {rarest} ({smallest} labelled samples) "
                f"without a label (use a fraction above {0.5 / smallest:.4g})"
            )
        out[fraction] = balanced_label_subset(labels, fraction, seed)
    return out
