"""The loss of the classic pretext tasks: classify a generated label (rotation, permutation,
neighbour position) with cross-entropy, and how often the classifier is right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pretext_classification(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(cross-entropy, accuracy)`` of ``logits (N, K)`` against generated ``labels (N,)``.

    The loss is computed in float32 even under autocast; the accuracy (a monitor, no
    gradient) is the fraction of rows whose arg-max is the label.

    References: Gidaris et al. 2018 (arXiv:1803.07728), Noroozi & Favaro 2016
    (arXiv:1603.09246), Doersch et al. 2015 (arXiv:1505.05192): each trains its pretext
    classifier with the softmax cross-entropy.
    """
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy
