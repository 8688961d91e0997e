"""Image-text contrastive loss (CLIP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision
from selfsup.nn.distributed import gather_with_grad, rank


@full_precision
def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    gather: bool = False,
    max_scale: float = 100.0,
) -> Tensor:
    """Compute CLIP's symmetric cross-entropy between paired image and text ``(B, D)``.

    ``logit_scale`` is the learnable scalar ``log(1 / temperature)`` (CLIP initialises it
    to ``log(1 / 0.07)``); logits are ``exp(logit_scale)`` times cosine similarities, the
    multiplier clipped at ``max_scale`` (100 in the paper) so training cannot make the
    softmax arbitrarily sharp. Image ``i`` must pick text ``i`` among all texts and vice
    versa; the two cross-entropies are averaged. With ``gather`` the candidates are the
    embeddings of every process (with gradient) and labels are offset by ``rank * B``.

    References: Radford et al. 2021, "Learning Transferable Visual Models From Natural
    Language Supervision" (CLIP), arXiv:2103.00020.
    """
    img = F.normalize(image_emb, dim=1)
    txt = F.normalize(text_emb, dim=1)
    scale = logit_scale.exp().clamp(max=max_scale)
    img_all = gather_with_grad(img) if gather else img
    txt_all = gather_with_grad(txt) if gather else txt
    offset = rank() * img.shape[0] if gather else 0
    labels = torch.arange(img.shape[0], device=img.device) + offset
    loss_img = F.cross_entropy(scale * img @ txt_all.T, labels)
    loss_txt = F.cross_entropy(scale * txt @ img_all.T, labels)
    return 0.5 * (loss_img + loss_txt)


CLIP_INIT_LOGIT_SCALE: float = math.log(1.0 / 0.07)
"""CLIP's initial value of ``logit_scale`` (temperature 0.07)."""
