"""The classic metric-learning catalogue that contrastive self-supervision grew from."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses._utils import full_precision


def _pairwise_sq_dists(x: Tensor) -> Tensor:
    # Gram-matrix form: O(B^2) memory instead of O(B^2 D); rounding can go slightly
    # negative, hence the clamp.
    sq = x.pow(2).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


@full_precision
def contrastive_pair_loss(x1: Tensor, x2: Tensor, same: Tensor, margin: float = 1.0) -> Tensor:
    """Compute the margin contrastive loss of embedding pairs ``(B, D)`` labelled ``same (B,)``.

    With Euclidean distance ``d``, similar pairs cost ``d^2 / 2`` and dissimilar pairs
    ``max(0, margin - d)^2 / 2`` (only dissimilar pairs closer than the margin push apart).
    Mean over the ``B`` pairs.

    References: Hadsell, Chopra, LeCun 2006, "Dimensionality Reduction by Learning an
    Invariant Mapping", CVPR 2006 (no arXiv).
    """
    sq = (x1 - x2).pow(2).sum(dim=1)
    # sqrt of a clamped value keeps the gradient finite for coincident pairs.
    d = sq.clamp_min(1e-12).sqrt()
    similar = 0.5 * sq
    dissimilar = 0.5 * F.relu(margin - d).pow(2)
    return torch.where(same.to(torch.bool), similar, dissimilar).mean()


@full_precision
def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 0.2,
    normalize: bool = True,
) -> Tensor:
    """Compute FaceNet's triplet loss ``max(0, |a-p|^2 - |a-n|^2 + margin)`` over ``(B, D)``.

    Embeddings are L2-normalised first when ``normalize`` is set, because FaceNet's
    embedding lives on the unit hypersphere and its margin 0.2 (the default) is calibrated
    for it. Mean over the ``B`` triplets; triplet mining is the caller's job.

    References: Schroff, Kalenichenko, Philbin 2015, "FaceNet: A Unified Embedding for Face
    Recognition and Clustering", arXiv:1503.03832.
    """
    if normalize:
        anchor, positive, negative = (F.normalize(t, dim=1) for t in (anchor, positive, negative))
    d_pos = (anchor - positive).pow(2).sum(dim=1)
    d_neg = (anchor - negative).pow(2).sum(dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


@full_precision
def lifted_structured_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Compute the lifted structured embedding loss over all pairs of a batch ``(B, D)``.

    For each positive pair ``(i, j)`` (same label, ``i < j``), with Euclidean distances
    ``D``: ``J_ij = log(sum_{k: y_k != y_i} exp(margin - D_ik) + sum_{l: y_l != y_j}
    exp(margin - D_jl)) + D_ij`` (the smooth log-sum-exp bound of the paper's eq. 4), and
    ``loss = sum_{(i,j)} max(0, J_ij)^2 / (2 |P|)``. Pairs without any negative (a batch
    of one class) contribute 0; a batch without positive pairs gives 0.

    References: Oh Song, Xiang, Jegelka, Savarese 2016, "Deep Metric Learning via Lifted
    Structured Feature Embedding", arXiv:1511.06452.
    """
    labels = labels.reshape(-1)
    dist = _pairwise_sq_dists(embeddings).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    neg_terms = (margin - dist).masked_fill(same, float("-inf"))
    # log sum_k exp(margin - D_ik) over the negatives of each anchor, per row.
    neg_lse = torch.logsumexp(neg_terms, dim=1)
    b = labels.shape[0]
    upper = torch.triu(torch.ones(b, b, dtype=torch.bool, device=labels.device), diagonal=1)
    i, j = torch.nonzero(same & upper, as_tuple=True)
    num_pairs = i.numel()
    # Both members of a positive pair share a label, hence the same negatives; a class
    # filling the whole batch has none, and its pairs contribute nothing.
    keep = (~same[i]).any(dim=1)
    i, j = i[keep], j[keep]
    if i.numel() == 0:
        return embeddings.sum() * 0.0
    j_ij = torch.logaddexp(neg_lse[i], neg_lse[j]) + dist[i, j]
    return F.relu(j_ij).pow(2).sum() / (2.0 * num_pairs)


@full_precision
def n_pair_loss(anchors: Tensor, positives: Tensor) -> Tensor:
    """Compute the multi-class N-pair loss for ``B`` (anchor, positive) pairs of ``(B, D)``.

    Each anchor's positive competes with the other ``B - 1`` positives as negatives:
    ``log(1 + sum_{j != i} exp(f_i . f+_j - f_i . f+_i))``, i.e. softmax cross-entropy over
    inner products. Mean over anchors. The paper also penalises embedding norms (weight
    0.002); add that term at the call site if wanted.

    References: Sohn 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016 (no arXiv).
    """
    logits = anchors @ positives.T
    labels = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(logits, labels)


@full_precision
def nce_loss(scores_data: Tensor, scores_noise: Tensor, log_noise_prob: float) -> Tensor:
    """Compute binary noise-contrastive estimation from data ``(B,)`` and noise ``(B, M)`` scores.

    Scores are the model's unnormalised log-densities ``log p(i | v)`` (for InstDisc,
    ``v_i . f / tau - log Z`` with ``Z`` the estimated normaliser) of the true instance and
    of ``M`` noise draws per sample. Noise comes from ``P_n`` with ``log P_n(i) =
    log_noise_prob`` (InstDisc: ``-log N``, uniform). The posterior that a sample came from
    the data is ``h = p / (p + M P_n) = sigmoid(s - log(M P_n))`` and the loss is
    ``-log h(data) - sum_j log(1 - h(noise_j))``, averaged over the batch; written with
    ``softplus`` so large scores cannot overflow.

    References: Gutmann & Hyvärinen 2010, "Noise-contrastive estimation: A new estimation
    principle for unnormalized statistical models", AISTATS 2010 (no arXiv); Wu et al.
    2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
    arXiv:1805.01978.
    """
    if scores_noise.ndim != 2 or scores_data.shape != scores_noise.shape[:1]:
        raise ValueError(
            f"expected scores_data (B,) and scores_noise (B, M); got "
            f"{tuple(scores_data.shape)}, {tuple(scores_noise.shape)}"
        )
    shift = math.log(scores_noise.shape[1]) + log_noise_prob
    data_term = F.softplus(-(scores_data - shift))
    noise_term = F.softplus(scores_noise - shift).sum(dim=1)
    return (data_term + noise_term).mean()


class _ChunkedBankSoftmax(torch.autograd.Function):
    """Mean of ``logsumexp_j(f . v_j / T) - f . v_i / T`` over a bank scored chunk by chunk.

    The forward keeps only the per-row log-normaliser ``(B,)``; the backward scores the bank
    again chunk by chunk, so no ``(B, N)`` tensor outlives a chunk (ImageNet: 1.28M rows).
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, bank: Tensor, index: Tensor, temperature: float, chunk_size: int) -> Tensor:
        scaled = features / temperature  # 1/T folded into the (B, D) side: no pass over (B, N)
        lse = features.new_full((features.shape[0],), float("-inf"))
        for start in range(0, bank.shape[0], chunk_size):
            lse = torch.logaddexp(lse, torch.logsumexp(scaled @ bank[start : start + chunk_size].T, dim=1))
        positive = (scaled * bank[index]).sum(dim=1)
        ctx.save_for_backward(features, bank, index, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        features, bank, index, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_size
        # d/df [logsumexp_j(f.v_j/T) - f.v_i/T] = (sum_j p_j v_j - v_i) / T.
        scaled = features / t
        expected = torch.zeros_like(features)
        for start in range(0, bank.shape[0], chunk):
            rows = bank[start : start + chunk]
            expected += torch.exp(scaled @ rows.T - lse[:, None]) @ rows
        grad_features = (expected - bank[index]) * (grad / (t * features.shape[0]))
        return grad_features, None, None, None, None


@full_precision
def bank_softmax_loss(
    features: Tensor, bank: Tensor, index: Tensor, temperature: float = 0.07, chunk_size: int = 65536
) -> Tensor:
    """Compute InstDisc's non-parametric softmax cross-entropy of ``features (B, D)`` over a
    whole memory bank ``(N, D)``, the positive of row ``b`` being bank row ``index[b]``.

    ``P(i | f) = exp(v_i . f / T) / sum_{j=1..N} exp(v_j . f / T)`` (eq. 2 of the paper) and
    the loss is ``-mean_b log P(index_b | f_b)``. ``v_i`` is the bank's (last step's) entry of
    the image itself, not its current feature, as in the authors' code (``LinearAverage``:
    the current features score every bank row, cross-entropy with the sample's index). The
    bank is a constant (no gradient): it is updated by momentum after the step. Features and
    bank rows are used as given (normalise them beforehand). With ``N > chunk_size`` the
    bank is scored in chunks of ``chunk_size`` rows in the forward and again in the backward,
    so memory stays at ``B * chunk_size`` scores; otherwise in one ``(B, N)`` product.

    References: Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination", arXiv:1805.01978 (eq. 2, T = 0.07).
    """
    if features.ndim != 2 or bank.ndim != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(f"expected features (B, D) and bank (N, D); got {tuple(features.shape)}, {tuple(bank.shape)}")
    if index.shape != features.shape[:1]:
        raise ValueError(f"expected index ({features.shape[0]},), got {tuple(index.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bank = bank.detach().to(features.dtype)
    index = index.to(features.device, torch.long)
    if bank.shape[0] <= chunk_size:
        return F.cross_entropy((features / temperature) @ bank.T, index)
    loss: Tensor = _ChunkedBankSoftmax.apply(features, bank, index, temperature, chunk_size)
    return loss


@full_precision
def soft_nearest_neighbour_loss(x: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Compute the soft nearest neighbour loss of a labelled batch ``(B, D)``.

    ``-mean_i log( sum_{j != i, y_j = y_i} exp(-|x_i - x_j|^2 / T) / sum_{k != i}
    exp(-|x_i - x_k|^2 / T) )``: low when each point's soft neighbourhood is its own class
    (class entanglement is high when it is high). Anchors with no other sample of their
    class have an empty numerator and are left out of the mean; 0 if none remain.

    References: Frosst, Papernot, Hinton 2019, "Analyzing and Improving Representations
    with the Soft Nearest Neighbor Loss", arXiv:1902.01889.
    """
    labels = labels.reshape(-1)
    b = labels.shape[0]
    logits = -_pairwise_sq_dists(x) / temperature
    eye = torch.eye(b, dtype=torch.bool, device=x.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    log_num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    log_den = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    has_pos = same.any(dim=1)
    if not bool(has_pos.any()):
        return x.sum() * 0.0
    return -(log_num - log_den)[has_pos].mean()
