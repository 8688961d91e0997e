"""MoCo v1: a linear 128-d head, temperature 0.07, momentum 0.999, a 65536-key queue.

MoCo as first published: the query encoder ``f_q`` is the backbone with its classifier
replaced by a linear 128-d layer ("the fc layer ... has a fixed-dimensional output (128-D)"),
followed by L2 normalisation; the key encoder ``f_k`` is its momentum copy (m = 0.999); keys
are computed with shuffled BN; a queue of K = 65536 keys serves as negatives; InfoNCE at
tau = 0.07. Everything but the head and the defaults is shared with MoCo v2
(``methods.moco_v2.MoCo``): Algorithm 1 there is this paper's pseudocode.

Augmentation: v1's is weaker than v2's: random resized crop, colour jitter, grayscale and
flip, no Gaussian blur (MoCo v2 adds blur and an MLP head). The view recipe is the shared
``two_views``; its blur is switched off in ``configs/moco_v1/*.yaml`` (``views.blur_p: 0``).

References: He, Fan, Wu, Xie & Girshick, "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020 (arXiv:1911.05722); hard negative mixing: Kalantidis et
al., "Hard Negative Mixing for Contrastive Learning" (MoCHi), NeurIPS 2020 (arXiv:2010.01028).
"""

from __future__ import annotations

from torch import nn

from selfsup.methods.moco_v2 import MoCo
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS


@METHODS.register("moco_v1")
class MoCoV1(MoCo):
    """MoCo v1: linear head to 128-d, temperature 0.07, momentum 0.999, 65536 keys (paper values).

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        num_samples: size of the pretraining set (set by the engine; sizes the queue).
        batch_size: per-process batch (set by the engine; the queue must hold whole global
            batches, as the paper's ``K % batch_size == 0``).
        proj_dim: output of the linear head, "128-D".
        temperature: InfoNCE temperature, "tau = 0.07".
        queue_size: number of negative keys (paper: 65536), a multiple of the global batch;
            ``None`` = ``default_queue_size(num_samples)`` rounded down to one (the paper's
            65536 capped at a quarter of the data set).
        shuffle_bn_groups: BN groups that emulate shuffle BN in one process (see ``MoCoV2``).
        symmetric: also swap the roles of the two views (not in the paper; off).
        mochi: add MoCHi's synthetic hard negatives (Kalantidis et al. 2020; off by default).
        mochi_hardest, mochi_mixed, mochi_query_mixed: MoCHi's ``(N, s, s')``; ``None`` = the
            paper's (1024, 1024, 256) at K = 65536 scaled by ``queue_size / 65536``.
        mochi_start_epoch: epoch from which MoCHi mixes (0: from the first step).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 65536 * 4,
        batch_size: int = 256,
        proj_dim: int = 128,
        temperature: float = 0.07,
        queue_size: int | None = None,
        shuffle_bn_groups: int = 2,
        symmetric: bool = False,
        mochi: bool = False,
        mochi_hardest: int | None = None,
        mochi_mixed: int | None = None,
        mochi_query_mixed: int | None = None,
        mochi_start_epoch: float = 0.0,
    ) -> None:
        # One linear layer: the paper's fc replaced by a 128-d output, no hidden layer.
        projector = mlp_head(feature_dim(backbone), proj_dim, proj_dim, num_layers=1)
        super().__init__(
            backbone,
            projector,
            proj_dim,
            num_samples=num_samples,
            batch_size=batch_size,
            temperature=temperature,
            queue_size=queue_size,
            shuffle_bn_groups=shuffle_bn_groups,
            symmetric=symmetric,
            mochi=mochi,
            mochi_hardest=mochi_hardest,
            mochi_mixed=mochi_mixed,
            mochi_query_mixed=mochi_query_mixed,
            mochi_start_epoch=mochi_start_epoch,
        )
