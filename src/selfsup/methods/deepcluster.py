"""DeepCluster v2: k-means on the whole data set at each epoch start, then classify every view
into its image's cluster, with the centroids as a fixed cosine classifier.

References: Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised Learning of
Visual Features", ECCV 2018 (arXiv:1807.05520); DeepCluster v2: Caron, Misra, Mairal, Goyal,
Bojanowski & Joulin, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020 (arXiv:2006.09882; DeepCluster-v2 is described in its appendix).

Pseudocode (per epoch)::

    z_all = normalize(g(f(x_all)))                    # on_epoch_start: one pass, eval mode
    for h, K in enumerate(num_prototypes):            # several k-means heads (paper: 3 x 3000)
        C_h, a_h = spherical_kmeans(z_all, K, 10 iterations, seed=(seed, epoch, h))
        prototypes_h = C_h                            # fixed cosine classifier for the epoch
    for x, idx in loader:                              # training_step
        z = normalize(g(f(cat(crops(x)))))            # every crop, (V*B, D)
        loss = mean_h CE(prototypes_h(z) / tau, a_h[idx] for every crop)

Prototypes are never trained: the reference code freezes them for
``freeze_prototypes_niters=300000`` iterations, more than its 800-epoch run takes, so they are
only ever the centroids (here: frozen parameters, set at each epoch start).

Deviations from the reference code, and why: (1) the reference clusters the embeddings of the
two global training crops that it stored during the previous epoch (one memory bank per crop,
used by alternate heads); here the epoch hook's pass computes them on the un-augmented images
in eval mode, as the original DeepCluster did (a separate pass, which the loop provides and
times). (2) The reference leaves an empty cluster's centroid where it was; here it is re-seeded
by splitting a non-empty cluster, as DeepCluster (2018, Section 3.3) does, so every prototype
receives samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.errors import ConfigError, DataError
from selfsup.losses import deepcluster_loss
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.nn.multicrop import encode_by_resolution
from selfsup.registry import METHODS

__all__ = ["DeepClusterV2", "kmeans"]


def _assign(x: Tensor, centroids: Tensor, spherical: bool, chunk: int = 16384) -> Tensor:
    """``(N,)`` index of each row's nearest centroid: highest cosine (``spherical``, unit rows)
    or smallest squared Euclidean distance; chunked over ``N`` to bound the ``(N, K)`` memory."""
    out = []
    half_norms = 0.5 * (centroids * centroids).sum(dim=1)
    for rows in x.split(chunk):
        scores = rows @ centroids.T
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2); on the sphere |c| = 1 for every c.
        out.append((scores if spherical else scores - half_norms).argmax(dim=1))
    return torch.cat(out)


def _centroids(x: Tensor, assignments: Tensor, previous: Tensor, spherical: bool) -> Tensor:
    """M-step: the mean (unit-normalised if ``spherical``) of each cluster's rows; an empty
    cluster keeps its previous centroid (``_split_empty`` has removed empties beforehand)."""
    k = previous.shape[0]
    sums = torch.zeros_like(previous).index_add_(0, assignments, x)
    counts = torch.bincount(assignments, minlength=k).to(x.dtype).unsqueeze(1)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), previous)
    return F.normalize(means, dim=1) if spherical else means


def _split_empty(
    x: Tensor, assignments: Tensor, centroids: Tensor, spherical: bool, generator: torch.Generator, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Give every empty cluster samples by splitting a non-empty one (DeepCluster, 2018, 3.3).

    For each empty cluster: pick a donor cluster with at least two samples (probability
    proportional to its size minus one, as faiss does), perturb its centroid in opposite
    directions into the donor and the empty cluster, and reassign the donor's samples to the
    nearer of the two; if the perturbation separates nothing (identical samples), the donor's
    sample furthest along the perturbation moves. Both centroids become their new means.
    The loop runs over empty clusters only (rare), never over samples.
    """
    k = centroids.shape[0]
    centroids = centroids.clone()
    assignments = assignments.clone()
    counts = torch.bincount(assignments, minlength=k)
    for empty in (counts == 0).nonzero().flatten().tolist():
        weights = (counts - 1).clamp(min=0).double().cpu()
        donor = int(torch.multinomial(weights, 1, generator=generator))
        direction = torch.randn(centroids.shape[1], generator=generator, dtype=torch.float64).to(centroids)
        direction = eps * direction / direction.norm()
        members = (assignments == donor).nonzero().flatten()
        pair = torch.stack([centroids[donor] + direction, centroids[donor] - direction])
        if spherical:
            pair = F.normalize(pair, dim=1)
        moves = _assign(x[members], pair, spherical) == 0
        if bool(moves.all()) or not bool(moves.any()):  # nothing separated: move one sample
            moves = torch.zeros_like(moves)
            moves[(x[members] @ direction).argmax()] = True
        assignments[members[moves]] = empty
        counts[empty], counts[donor] = int(moves.sum()), int((~moves).sum())
        for cluster in (empty, donor):
            mean = x[assignments == cluster].mean(dim=0)
            centroids[cluster] = F.normalize(mean, dim=0) if spherical else mean
    return assignments, centroids


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    iterations: int = 10,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    spherical: bool = True,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the rows of ``x`` ``(N, D)`` into ``k`` clusters, on ``x``'s device.

    ``spherical=True`` is DeepCluster v2's: the rows are unit vectors, a sample goes to the
    centroid of highest cosine and centroids are re-normalised means. ``spherical=False`` is
    plain Euclidean k-means (scikit-learn's ``KMeans(algorithm="lloyd")``, DeepCluster 2018).
    ``iterations`` (E-step, M-step) rounds (reference code: 10), then a final E-step, so the
    assignments are those of the returned centroids. Initial centroids: ``init`` ``(k, D)``,
    else ``k`` distinct rows drawn with ``generator`` (as the reference code). Empty clusters
    are re-seeded after every E-step by splitting a non-empty one (see ``_split_empty``), so
    every cluster has at least one sample at the end.

    Returns:
        ``centroids (k, D)`` and ``assignments (N,)`` int64.

    References: Lloyd 1982, "Least squares quantization in PCM"; Caron et al. 2018,
    arXiv:1807.05520 (empty clusters, Section 3.3); Caron et al. 2020, arXiv:2006.09882.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise DataError(f"k-means with k={k} clusters needs at least k samples, got {n}: lower the number of clusters")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if init is None:
        init = x[torch.randperm(n, generator=generator)[:k].to(x.device)]
    centroids = init.to(x).clone()
    for iteration in range(iterations + 1):
        assignments = _assign(x, centroids, spherical)
        assignments, centroids = _split_empty(x, assignments, centroids, spherical, generator)
        if iteration == iterations:
            break
        centroids = _centroids(x, assignments, centroids, spherical)
    return centroids, assignments


@METHODS.register("deepcluster")
class DeepClusterV2(Method):
    """DeepCluster v2: multi-head spherical k-means targets, prototypes set from the centroids.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        num_samples: size of the pretraining set (engine fact): one assignment per sample and head.
        proj_hidden_dim: hidden width of the 2-layer projection MLP (paper: 2048).
        proj_dim: size of the L2-normalised embedding (paper: ``feat_dim`` 128).
        num_prototypes: ``K`` of each k-means head (paper: 3000, 3000, 3000); an int is one head.
        temperature: softmax temperature of the scores (paper: 0.1).
        kmeans_iterations: Lloyd iterations per epoch (reference code: 10).
        seed: seeds the k-means initialisation (with the epoch and the head).
    """

    view_recipe = "multi_crop"
    engine_facts = ("num_samples",)
    lr_scaling = "linear"

    assignments: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        num_prototypes: int | Sequence[int] = (3000, 3000, 3000),
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        heads = [num_prototypes] if isinstance(num_prototypes, int) else [int(k) for k in num_prototypes]
        if not heads or min(heads) < 1:
            raise ConfigError(f"method.num_prototypes must be one or more positive ints, got {num_prototypes!r}")
        if max(heads) > num_samples:
            raise ConfigError(
                f"method.num_prototypes={max(heads)} exceeds the {num_samples} pretraining images: k-means "
                "needs at least k samples; lower method.num_prototypes"
            )
        self.backbone = backbone
        self.projector = mlp_head(feature_dim(backbone), proj_hidden_dim, proj_dim, 2)
        self.prototypes = nn.ModuleList(nn.Linear(proj_dim, k, bias=False).requires_grad_(False) for k in heads)
        with torch.no_grad():
            for layer in self.heads():
                layer.weight.copy_(F.normalize(layer.weight, dim=1))
        self.num_samples = num_samples
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        # Until the first k-means pass (e.g. a step taken without the epoch hook) every sample
        # has a placeholder cluster: its index modulo K.
        placeholder = torch.stack([torch.arange(num_samples) % k for k in heads])
        self.register_buffer("assignments", placeholder)

    def heads(self) -> list[nn.Linear]:
        """The prototype layers, one per k-means head: ``(B, proj_dim) -> (B, K_h)``."""
        return [cast(nn.Linear, layer) for layer in self.prototypes]

    def project(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, proj_dim)`` unit-norm embeddings (what is clustered and scored)."""
        return F.normalize(self.projector(self.backbone(images)), dim=1)

    @torch.no_grad()
    def cluster(self, features: Tensor, epoch: int) -> None:
        """k-means of ``features`` ``(num_samples, proj_dim)`` for every head: set the
        prototypes to the centroids and ``assignments`` ``(H, num_samples)`` to the clusters."""
        if features.shape[0] != self.num_samples:
            raise DataError(f"the epoch pass gave {features.shape[0]} features for {self.num_samples} samples")
        device = self.assignments.device
        features = F.normalize(features.to(device).float(), dim=1)
        for head, layer in enumerate(self.heads()):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1_009 + head)
            centroids, assigned = kmeans(
                features, layer.out_features, self.kmeans_iterations, generator=generator, spherical=True
            )
            layer.weight.copy_(centroids)
            self.assignments[head].copy_(assigned)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        was_training = self.training
        self.eval()  # BN on running statistics: each image's embedding is its own
        try:
            features = ctx.encode(self.project)
        finally:
            self.train(was_training)
        self.cluster(features, ctx.epoch)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        views = batch.views
        z = F.normalize(self.projector(encode_by_resolution(self.backbone, views)), dim=1)
        scores = [layer(z).unflatten(0, (len(views), -1)) for layer in self.heads()]  # (V, B, K_h)
        loss = deepcluster_loss(scores, self.assignments[:, batch.index], temperature=self.temperature)
        return {"loss": loss, "z_std": feature_std_tensor(z[: views[0].shape[0]])}
