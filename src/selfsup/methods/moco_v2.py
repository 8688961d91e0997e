"""MoCo v2, and the MoCo machinery it shares with MoCo v1 (``methods/moco_v1.py``).

``MoCo`` holds what both versions share: the momentum key encoder, shuffle BN, the FIFO
queue of negatives sized to the data and to the global batch, InfoNCE, and MoCHi's hard
negative mixing as an option. MoCo v1 and v2 differ only in the head and the defaults
(v2: MLP head, temperature 0.2; v1: linear head, temperature 0.07) and in the augmentation,
which is the view recipe's business (v2 adds blur).

References: He, Fan, Wu, Xie & Girshick, "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020 (arXiv:1911.05722); Chen, Fan, Girshick & He, "Improved
Baselines with Momentum Contrastive Learning", 2020 (arXiv:2003.04297); Kalantidis et al.,
"Hard Negative Mixing for Contrastive Learning" (MoCHi), NeurIPS 2020 (arXiv:2010.01028).

Pseudocode (Algorithm 1 of MoCo)::

    q = normalize(f_q(x_q))                       # queries: N x C
    k = normalize(f_k(x_k)).detach()              # keys, momentum encoder, shuffled BN
    l_pos = q . k        l_neg = q . queue        # N x 1, N x K
    loss = CE([l_pos, l_neg] / tau, label 0)      # positive at index 0
    f_k = m * f_k + (1 - m) * f_q                 # engine: ema_pairs()
    enqueue(k); dequeue oldest                    # engine: on_step_end()

With MoCHi, ``l_neg`` gets ``s + s'`` more columns per query: synthetic negatives mixed from
its ``N`` hardest queue entries (``selfsup.losses.hard_negatives``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import info_nce, mochi_info_nce
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.backbones.vit import without_drop_path
from selfsup.nn.distributed import shuffle_across_processes, unshuffle_across_processes, world_size
from selfsup.nn.grouped_bn import batch_norm_groups
from selfsup.nn.heads import frozen_copy, mlp_head
from selfsup.nn.memory import FIFOQueue
from selfsup.registry import METHODS


def default_queue_size(num_samples: int) -> int:
    """The paper's 65536 keys, capped at a quarter of the dataset so that a small dataset's
    queue does not hold many stale keys of each query's own image."""
    return max(256, min(65536, num_samples // 4))


def moco_queue_size(queue_size: int | None, num_samples: int, global_batch: int) -> int:
    """The queue size MoCo runs with: ``queue_size``, or ``default_queue_size`` rounded down to
    a multiple of the global batch (at least one batch).

    The paper's implementation enqueues whole global batches and requires ``K % batch == 0``
    (each enqueue then replaces exactly the oldest batch), so an explicit size that does not
    divide raises a one-line ``ValueError`` naming the option and the fix.

    References: He et al. 2020, "Momentum Contrast", arXiv:1911.05722, Algorithm 1.
    """
    if global_batch < 1:
        raise ValueError(f"the global batch must be >= 1, got {global_batch}")
    if queue_size is None:
        return max(global_batch, default_queue_size(num_samples) // global_batch * global_batch)
    if queue_size < 1 or queue_size % global_batch:
        lower = max(global_batch, queue_size // global_batch * global_batch)
        raise ValueError(
            f"method.queue_size={queue_size} must be a positive multiple of the global batch {global_batch} "
            f"(train.batch_size x processes: MoCo enqueues whole batches); set method.queue_size={lower} "
            f"or {lower + global_batch}, or leave it unset to size it to the data"
        )
    return queue_size


@dataclass(frozen=True)
class MoCHiSizes:
    """MoCHi's ``(N, s, s')``: hardest negatives kept, pairs mixed, query mixes (per query)."""

    hardest: int
    mixed: int
    query_mixed: int


#: The paper's queue and ``(N, s, s')`` at that queue (ImageNet, ``K = 65536``).
MOCHI_PAPER_QUEUE = 65536
MOCHI_PAPER_SIZES = MoCHiSizes(1024, 1024, 256)


def mochi_sizes(queue_size: int, hardest: int | None, mixed: int | None, query_mixed: int | None) -> MoCHiSizes:
    """MoCHi's sizes for a queue of ``queue_size``: each unset one is the paper's value scaled
    by ``queue_size / 65536`` (the same fraction of the queue; e.g. (128, 128, 32) for an
    8192-key queue), with ``N >= 2`` and ``s, s' >= 1``. Explicit values are checked.

    References: Kalantidis et al. 2020, MoCHi, arXiv:2010.01028, Section 4.1.
    """
    scale = queue_size / MOCHI_PAPER_QUEUE
    paper = MOCHI_PAPER_SIZES

    def scaled(value: int | None, default: int, least: int) -> int:
        return value if value is not None else max(least, round(default * scale))

    sizes = MoCHiSizes(
        scaled(hardest, paper.hardest, 2), scaled(mixed, paper.mixed, 1), scaled(query_mixed, paper.query_mixed, 1)
    )
    if not 1 <= sizes.hardest <= queue_size:
        raise ValueError(
            f"method.mochi_hardest={sizes.hardest} must be in [1, {queue_size}] (the queue size); lower it"
        )
    if sizes.mixed > 0 and sizes.hardest < 2:
        raise ValueError(
            "method.mochi_hardest must be >= 2 to mix pairs of hard negatives (or set method.mochi_mixed=0)"
        )
    if sizes.mixed < 0 or sizes.query_mixed < 0:
        raise ValueError(
            f"method.mochi_mixed={sizes.mixed} and method.mochi_query_mixed={sizes.query_mixed} must be >= 0"
        )
    return sizes


class MoCo(Method):
    """What MoCo v1 and v2 share: momentum key encoder, shuffle BN, queue, InfoNCE, MoCHi.

    Not registered: ``MoCoV1`` and ``MoCoV2`` build the head and set the defaults, then hand
    over here. Options (documented on the subclasses) are keyword-only.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        projector: head ``(B, num_features) -> (B, proj_dim)`` (the key encoder copies it).
        proj_dim: width of the head's output (and of the queue's rows).
    """

    view_recipe = "two_views"
    engine_facts = ("num_samples", "batch_size")
    default_ema_momentum = (0.999, 0.999)
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        proj_dim: int,
        *,
        num_samples: int,
        batch_size: int,
        temperature: float,
        queue_size: int | None,
        shuffle_bn_groups: int,
        symmetric: bool,
        mochi: bool,
        mochi_hardest: int | None,
        mochi_mixed: int | None,
        mochi_query_mixed: int | None,
        mochi_start_epoch: float,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        # The teacher's targets come from the whole network: no stochastic depth (iBOT/DINOv2).
        self.teacher_backbone = without_drop_path(frozen_copy(backbone))
        self.teacher_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.shuffle_bn_groups = shuffle_bn_groups
        self.symmetric = symmetric
        # The per-process batch is the engine's fact; every process enqueues its keys, so the
        # queue advances by the global batch per enqueue.
        size = moco_queue_size(queue_size, num_samples, batch_size * world_size())
        self.queue = FIFOQueue(size, proj_dim)
        self.mochi = mochi_sizes(size, mochi_hardest, mochi_mixed, mochi_query_mixed) if mochi else None
        self.mochi_start_epoch = mochi_start_epoch

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def _grouped(self, backbone: nn.Module, projector: nn.Module, x: Tensor, order: Tensor | None = None) -> Tensor:
        """Encodes ``x`` with BN statistics per ``shuffle_bn_groups`` sub-batch (the chunks of
        ``x[order]``, or of ``x``), returns embeddings in the original order. With several
        processes the process is the group. One call with per-group BN
        (``batch_norm_groups``, groups interleaved) computes what one call per sub-batch
        computes; uneven sub-batches fall back to those calls."""
        groups = max(1, self.shuffle_bn_groups) if world_size() == 1 else 1
        if order is None:
            if groups == 1:
                return projector(backbone(x))
            order = torch.arange(x.shape[0], device=x.device)
        if x.shape[0] % groups:
            out = torch.cat([projector(backbone(chunk)) for chunk in x[order].chunk(groups)])
        else:
            # Row i * G + g of the call is row i of sub-batch g.
            order = order.reshape(groups, -1).T.reshape(-1)
            with batch_norm_groups(backbone, groups), batch_norm_groups(projector, groups):
                out = projector(backbone(x[order]))
        return out[torch.argsort(order)]

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self._grouped(self.backbone, self.projector, x), dim=1)

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        if world_size() > 1:
            shuffled, perm = shuffle_across_processes(x)
            k = unshuffle_across_processes(self.teacher_projector(self.teacher_backbone(shuffled)), perm)
        else:
            order = torch.randperm(x.shape[0], device=x.device)
            k = self._grouped(self.teacher_backbone, self.teacher_projector, x, order)
        return F.normalize(k.float(), dim=1)

    def mixing_at(self, step: StepInfo) -> bool:
        """Whether MoCHi mixes at this step: switched on and past ``mochi_start_epoch``."""
        return self.mochi is not None and step.epoch >= self.mochi_start_epoch

    def _contrast(self, q: Tensor, k: Tensor, negatives: Tensor, step: StepInfo) -> Tensor:
        if self.mochi is None or not self.mixing_at(step):
            return info_nce(q, k, negatives=negatives, temperature=self.temperature)
        sizes = self.mochi
        return mochi_info_nce(q, k, negatives, self.temperature, sizes.hardest, sizes.mixed, sizes.query_mixed)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x1, x2 = batch.views[0], batch.views[1]
        # The whole queue from step 0: MoCo starts it with random unit vectors, so early
        # steps still see K negatives (only-filled rows would make the first loss trivially 0).
        negatives = self.queue.values(only_filled=False)
        q1, k2 = self._query(x1), self._key(x2)
        loss = self._contrast(q1, k2, negatives, step)
        outputs = {"loss": loss, "z_std": feature_std_tensor(q1), "keys": k2}
        if self.symmetric:
            q2, k1 = self._query(x2), self._key(x1)
            outputs["loss"] = 0.5 * (loss + self._contrast(q2, k1, negatives, step))
            outputs["swapped_keys"] = k1
        return outputs

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # The queue changes only here, after the optimiser step, never inside the forward.
        self.queue.enqueue(outputs["keys"])
        if "swapped_keys" in outputs:
            self.queue.enqueue(outputs["swapped_keys"])


@METHODS.register("moco_v2")
class MoCoV2(MoCo):
    """MoCo v2: MLP head, temperature 0.2, momentum 0.999, 65536-key queue (paper values).

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        num_samples: size of the pretraining set (set by the engine; sizes the queue).
        batch_size: per-process batch (set by the engine; the queue must hold whole global
            batches).
        proj_hidden_dim, proj_dim: MLP head, "hidden layer 2048-d, with ReLU", 128-d output.
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        queue_size: number of negative keys, a multiple of the global batch (``batch_size``
            x processes); ``None`` = ``default_queue_size(num_samples)`` rounded down to one.
        shuffle_bn_groups: BN groups to emulate shuffling BN in one process: keys and queries
            are each computed in this many sub-batches, the keys on a random permutation, so
            a query and its key never share batch statistics (MoCo section 3.3). With several
            processes each process is one BN group and the keys are shuffled across processes
            (the paper's implementation), so this is unused; one process with
            ``shuffle_bn_groups=W`` and batch ``W * B`` computes what ``W`` processes with batch
            ``B`` compute. Leave ``train.sync_batchnorm`` off for MoCo: global statistics would
            undo the shuffle.
        symmetric: also swap the roles of the two views (a common MoCo v2 variant).
        mochi: add MoCHi's synthetic hard negatives (Kalantidis et al. 2020; off by default).
        mochi_hardest, mochi_mixed, mochi_query_mixed: MoCHi's ``(N, s, s')``; ``None`` = the
            paper's (1024, 1024, 256) at K = 65536 scaled by ``queue_size / 65536``.
        mochi_start_epoch: epoch from which MoCHi mixes (the paper can start after a warm-up
            of a few epochs, e.g. 15 of 200); 0 mixes from the first step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 65536 * 4,
        batch_size: int = 256,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int | None = None,
        shuffle_bn_groups: int = 2,
        symmetric: bool = False,
        mochi: bool = False,
        mochi_hardest: int | None = None,
        mochi_mixed: int | None = None,
        mochi_query_mixed: int | None = None,
        mochi_start_epoch: float = 0.0,
    ) -> None:
        projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 2, hidden_norm="none")
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
