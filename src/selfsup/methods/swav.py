"""SwAV: predict the cluster code of one view from the prototype scores of another view.

References: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments", NeurIPS 2020 (arXiv:2006.09882).

Pseudocode (Algorithm 1 of the paper, with multi-crop)::

    z = normalize(g(f(cat(crops))))                 # all crops, one backbone call per size
    scores = C(z)                                   # (V*B, K) cosine similarities
    with no_grad:                                   # codes from the global crops only,
        q_i = sinkhorn(cat(queue @ C.T, scores_i))[-B:]   # enlarged by a queue if small B
    loss = mean_{i global, v != i} CE(q_i, softmax(scores_v / tau))
    if iteration < freeze_prototypes: C.grad = None     # on_after_backward
    optimizer.step(); C.weight = normalize(C.weight)    # on_step_end: unit-norm prototypes
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import swav_loss
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.distributed import rank, world_size
from selfsup.nn.heads import maybe_frozen_linear, mlp_head
from selfsup.nn.memory import FIFOQueue
from selfsup.nn.multicrop import encode_by_resolution
from selfsup.nn.sinkhorn import sinkhorn_knopp
from selfsup.registry import METHODS


@METHODS.register("swav")
class SwAV(Method):
    """SwAV with multi-crop, the paper's prototypes, Sinkhorn settings and prototype freeze.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        proj_hidden_dim: hidden width of the 2-layer projection MLP (paper: 2048).
        proj_dim: size of the L2-normalised embedding (paper: 128).
        num_prototypes: ``K``, rows of the prototype matrix (paper: 3000 on ImageNet).
        temperature: softmax temperature of the swapped prediction (paper: 0.1).
        sinkhorn_epsilon: entropy regularisation of the codes (paper: 0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (paper: 3).
        num_global_crops: leading views that get codes (the engine passes the view recipe's
            ``num_global``; paper: 2).
        freeze_prototypes_steps: optimisation steps during which the prototypes are not
            updated (paper: the first epoch; 313 iterations of batch 4096 in the reference
            code).
        queue_length: stored past embeddings of the global crops whose scores enlarge the
            Sinkhorn batch (paper: 3840 for batches of 256); 0 disables the queue. Across
            processes it is the global length, each process using its own ``1 / W`` slice.
        epoch_queue_starts: epoch from which the queue is filled (paper: 15); it is used
            from the first step at which it is full.
    """

    view_recipe = "multi_crop"
    engine_facts = ("num_global_crops",)
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_global_crops: int = 2,
        freeze_prototypes_steps: int = 313,
        queue_length: int = 0,
        epoch_queue_starts: float = 15.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 2)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.num_global_crops = num_global_crops
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.epoch_queue_starts = epoch_queue_starts
        # One queue shared by the global crops (the reference code keeps one per crop): it
        # stores past embeddings, re-scored against the current prototypes at every step.
        self.queue = FIFOQueue(queue_length, proj_dim) if queue_length > 0 else None
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project every prototype (row of ``prototypes.weight``, ``(K, D)``) onto the unit
        sphere, so that scores are cosine similarities; idempotent."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def queued_embeddings(self) -> Tensor | None:
        """This process's slice ``(L / W, D)`` of the queue once it is full, else ``None``."""
        if self.queue is None or int(self.queue.filled) < self.queue.size:
            return None
        if self.queue.size % world_size():
            raise ValueError(f"queue_length {self.queue.size} must be divisible by the {world_size()} processes")
        # Every process holds the same global queue; disjoint slices keep the Sinkhorn batch
        # equal to the single-process one (L + W * B rows), not L * W + W * B.
        return self.queue.values().chunk(world_size())[rank()]

    @torch.no_grad()
    def codes(self, scores: Tensor, queued: Tensor | None = None) -> Tensor:
        """Equipartitioned soft codes ``(B, K)`` for the scores ``(B, K)`` of one global crop,
        computed with the scores of the ``queued`` embeddings ``(L, D)`` when given."""
        b = scores.shape[0]
        scores = scores.detach().float()  # float32 even under autocast: exp(score / 0.05)
        if queued is not None:
            weight = self.prototypes.weight.detach().float()
            scores = torch.cat([queued.float() @ weight.T, scores])
        return sinkhorn_knopp(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations)[-b:]

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        views = batch.views
        if len(views) < 2 or not 1 <= self.num_global_crops <= len(views):
            raise ValueError(
                f"SwAV needs at least 2 views, num_global_crops={self.num_global_crops} of "
                f"them global; got {len(views)}"
            )
        z = F.normalize(self.projector(encode_by_resolution(self.backbone, views)), dim=1)
        # Frozen prototypes enter as a constant: backward skips their (K x D) weight gradient.
        frozen = self.prototypes_frozen(step)
        scores = maybe_frozen_linear(z, lambda: self.prototypes.weight, frozen).chunk(len(views))
        b = views[0].shape[0]
        queued = self.queued_embeddings()
        codes = [self.codes(scores[i], queued) for i in range(self.num_global_crops)]
        loss = swav_loss(scores, codes, temperature=self.temperature)
        outputs = {"loss": loss, "z_std": feature_std_tensor(z[:b])}
        # Enqueued only in on_step_end: the forward never changes state.
        if self.queue is not None and step.epoch >= self.epoch_queue_starts:
            outputs["queue_embeddings"] = z[: self.num_global_crops * b]
        return outputs

    def prototypes_frozen(self, step: StepInfo) -> bool:
        """Whether the prototypes stay fixed at this step (the first ``freeze_prototypes_steps``)."""
        return step.step < self.freeze_prototypes_steps

    def on_after_backward(self, step: StepInfo) -> None:
        # Frozen prototypes get no gradient at all, not a zero one, so that neither weight
        # decay nor optimiser momentum moves them (as the reference code does); the forward
        # computed none, this clears any other path.
        if self.prototypes_frozen(step):
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        self.normalize_prototypes()
        if self.queue is not None and "queue_embeddings" in outputs:
            self.queue.enqueue(outputs["queue_embeddings"])
