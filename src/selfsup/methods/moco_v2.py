"""MoCo v2: InfoNCE between queries and momentum-encoded keys, with a FIFO queue of negatives.

References: He, Fan, Wu, Xie & Girshick, "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020 (arXiv:1911.05722); Chen, Fan, Girshick & He, "Improved
Baselines with Momentum Contrastive Learning", 2020 (arXiv:2003.04297).

Pseudocode (Algorithm 1 of MoCo)::

    q = normalize(f_q(x_q))                       # queries: N x C
    k = normalize(f_k(x_k)).detach()              # keys, momentum encoder, shuffled BN
    l_pos = q . k        l_neg = q . queue        # N x 1, N x K
    loss = CE([l_pos, l_neg] / tau, label 0)      # positive at index 0
    f_k = m * f_k + (1 - m) * f_q                 # engine: ema_pairs()
    enqueue(k); dequeue oldest                    # engine: on_step_end()
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import info_nce
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.distributed import shuffle_across_processes, unshuffle_across_processes, world_size
from selfsup.nn.heads import frozen_copy, mlp_head
from selfsup.nn.memory import FIFOQueue
from selfsup.registry import METHODS


def default_queue_size(num_samples: int) -> int:
    """The paper's 65536 keys, capped at a quarter of the dataset so that a small dataset's
    queue does not hold many stale keys of each query's own image."""
    return max(256, min(65536, num_samples // 4))


@METHODS.register("moco_v2")
class MoCoV2(Method):
    """MoCo v2: MLP head, temperature 0.2, momentum 0.999, 65536-key queue (paper values).

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        num_samples: size of the pretraining set (set by the engine; sizes the queue).
        proj_hidden_dim, proj_dim: MLP head, "hidden layer 2048-d, with ReLU", 128-d output.
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        queue_size: number of negative keys; ``None`` = ``default_queue_size(num_samples)``.
        shuffle_bn_groups: BN groups to emulate shuffling BN in one process: keys and queries
            are each computed in this many sub-batches, the keys on a random permutation, so
            a query and its key never share batch statistics (MoCo section 3.3). With several
            processes each process is one BN group and the keys are shuffled across processes
            (the paper's implementation), so this is unused; one process with
            ``shuffle_bn_groups=W`` and batch ``W * B`` computes what ``W`` processes with batch
            ``B`` compute. Leave ``train.sync_batchnorm`` off for MoCo: global statistics would
            undo the shuffle.
        symmetric: also swap the roles of the two views (a common MoCo v2 variant).
    """

    view_recipe = "two_views"
    engine_facts = ("num_samples",)
    default_ema_momentum = (0.999, 0.999)
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 65536 * 4,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int | None = None,
        shuffle_bn_groups: int = 2,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 2, hidden_norm="none")
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.shuffle_bn_groups = shuffle_bn_groups
        self.symmetric = symmetric
        self.queue = FIFOQueue(queue_size or default_queue_size(num_samples), proj_dim)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def _grouped(self, encoder: Callable[[Tensor], Tensor], x: Tensor, order: Tensor | None = None) -> Tensor:
        """Encodes ``x`` in ``shuffle_bn_groups`` sub-batches (in ``order`` if given), returns
        embeddings in the original order. With several processes the process is the group."""
        if order is not None:
            x = x[order]
        groups = max(1, self.shuffle_bn_groups) if world_size() == 1 else 1
        out = torch.cat([encoder(chunk) for chunk in x.chunk(groups)])
        if order is not None:
            out = out[torch.argsort(order)]
        return out

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self._grouped(lambda v: self.projector(self.backbone(v)), x), dim=1)

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        def encoder(v: Tensor) -> Tensor:
            return self.teacher_projector(self.teacher_backbone(v))

        if world_size() > 1:
            shuffled, perm = shuffle_across_processes(x)
            k = unshuffle_across_processes(encoder(shuffled), perm)
        else:
            k = self._grouped(encoder, x, torch.randperm(x.shape[0], device=x.device))
        return F.normalize(k.float(), dim=1)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x1, x2 = batch.views[0], batch.views[1]
        # The whole queue from step 0: MoCo starts it with random unit vectors, so early
        # steps still see K negatives (only-filled rows would make the first loss trivially 0).
        negatives = self.queue.values(only_filled=False)
        q1, k2 = self._query(x1), self._key(x2)
        loss = info_nce(q1, k2, negatives=negatives, temperature=self.temperature)
        outputs = {"loss": loss, "z_std": feature_std_tensor(q1), "keys": k2}
        if self.symmetric:
            q2, k1 = self._query(x2), self._key(x1)
            outputs["loss"] = 0.5 * (loss + info_nce(q2, k1, negatives=negatives, temperature=self.temperature))
            outputs["swapped_keys"] = k1
        return outputs

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # The queue changes only here, after the optimiser step, never inside the forward.
        self.queue.enqueue(outputs["keys"])
        if "swapped_keys" in outputs:
            self.queue.enqueue(outputs["swapped_keys"])
