"""Vector quantisation with an EMA codebook: the discrete bottleneck of visual tokenizers.

``VectorQuantizer`` maps encodings `(..., D)` to the nearest of ``K`` code vectors and gives
back the code ids `(...)`, the straight-through quantised vectors and the commitment loss. The
codebook is not trained by gradients: it follows exponential moving averages of the encodings
assigned to each code (VQ-VAE's Appendix A.1, VQ-VAE-2):

    n_k <- decay * n_k + (1 - decay) * |{i : id_i = k}|          # cluster size
    m_k <- decay * m_k + (1 - decay) * sum_{i : id_i = k} z_i     # embedding sum
    n~_k = (n_k + eps) / (sum_j n_j + K * eps) * sum_j n_j        # Laplace smoothing
    e_k  = m_k / n~_k                                             # (l2-normalised for cosine)

Codes whose EMA cluster size falls below ``dead_threshold`` (they won fewer than that many
encodings per step on average) are restarted at random encodings of the batch, as in Jukebox,
so the codebook does not shrink to a few live codes.

``cosine=True`` is BEiT v2's lookup: encodings and codes are l2-normalised and the nearest code
is the one of largest cosine similarity; the EMA mean of the (unit) encodings of a code is
l2-normalised again.

Nothing here changes state in ``forward``: the codebook moves only in :meth:`ema_update`,
which a method calls from ``on_step_end`` with the encodings and ids its step returned. All
state (codebook, cluster sizes, embedding sums) lives in persistent buffers (exact resume).

References: van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning"
(VQ-VAE), NeurIPS 2017, arXiv:1711.00937; Razavi, van den Oord & Vinyals, "Generating Diverse
High-Fidelity Images with VQ-VAE-2", arXiv:1906.00446; Dhariwal et al. 2020, "Jukebox",
arXiv:2005.00341 (dead-code restarts); Peng et al. 2022, "BEiT v2", arXiv:2208.06366
(l2-normalised codebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.distributed import all_reduce_sum, concat_all_gather

__all__ = ["Quantized", "VectorQuantizer", "codebook_perplexity"]


@dataclass
class Quantized:
    """What :meth:`VectorQuantizer.forward` returns.

    Attributes:
        quantized: `(..., D)` the chosen code vectors in the forward pass, with the gradient of
            ``encodings`` in the backward pass (straight-through estimator).
        ids: `(...)` int64 code ids.
        encodings: `(..., D)` float32 encodings as compared with the codebook (l2-normalised
            under ``cosine``), with their graph: pass them, detached and flattened, to
            :meth:`VectorQuantizer.ema_update`.
        commitment_loss: scalar ``beta * mean((encodings - sg[quantized])^2)``.
        perplexity: scalar ``exp(entropy)`` of the batch's code usage (1 = a single code, ``K``
            = uniform use of every code).
    """

    quantized: Tensor
    ids: Tensor
    encodings: Tensor
    commitment_loss: Tensor
    perplexity: Tensor


def codebook_perplexity(ids: Tensor, codebook_size: int) -> Tensor:
    """``exp(-sum_k p_k log p_k)`` of the code frequencies ``p`` of ``ids`` (any shape)."""
    counts = torch.bincount(ids.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with an EMA-updated codebook.

    Args:
        codebook_size: number of codes ``K`` (BEiT's dVAE and BEiT v2's VQ-KD: 8192).
        dim: code dimension ``D`` (BEiT v2: 32).
        decay: EMA decay of cluster sizes and embedding sums (VQ-VAE, BEiT v2: 0.99).
        beta: commitment weight (VQ-VAE: 0.25; BEiT v2's VQ-KD: 1.0).
        eps: Laplace smoothing of the cluster sizes (VQ-VAE-2's reference: 1e-5).
        cosine: BEiT v2's l2-normalised lookup (largest cosine similarity).
        dead_threshold: codes whose EMA cluster size falls below it are restarted at batch
            encodings (Jukebox: 1.0); ``0`` turns restarts off.

    Buffers: ``codebook`` `(K, D)`, ``cluster_size`` `(K,)`, ``embed_sum`` `(K, D)`, and
    ``last_dead`` (a scalar: dead codes found by the last update, for the logs). Each code
    starts with a pseudo-count of one at its own position (``cluster_size = 1``, ``embed_sum =
    codebook``), so the first EMA steps move codes gradually rather than dividing a decayed
    initial sum by a near-zero count.
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    last_dead: Tensor

    def __init__(
        self,
        codebook_size: int = 8192,
        dim: int = 32,
        decay: float = 0.99,
        beta: float = 0.25,
        eps: float = 1e-5,
        cosine: bool = False,
        dead_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.beta = beta
        self.eps = eps
        self.cosine = cosine
        self.dead_threshold = dead_threshold
        codebook = torch.randn(codebook_size, dim)
        codebook = F.normalize(codebook, dim=-1) if cosine else codebook
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        # How many codes the last EMA update found dead (and restarted), for the logs.
        self.register_buffer("last_dead", torch.zeros(()))

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, decay={self.decay}, cosine={self.cosine}"

    def lookup(self, z: Tensor) -> Tensor:
        """Nearest code ids `(N,)` of flat encodings `(N, D)` (already normalised under
        ``cosine``): largest cosine similarity, or smallest squared distance. In float32 even
        under autocast: a bfloat16 matmul would pick the wrong one of two close codes."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, codebook = z.float(), self.codebook.float()
            if self.cosine:
                return (z @ codebook.t()).argmax(dim=1)
            dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)
            return dist.argmin(dim=1)

    def forward(self, z: Tensor) -> Quantized:
        """Quantise encodings `(..., D)`; leaves every buffer unchanged."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"encodings have dimension {z.shape[-1]}, the codebook {self.dim}")
        # Distances and the EMA statistics in float32 even under autocast.
        z = z.float()
        if self.cosine:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.dim)
        with torch.no_grad():
            ids = self.lookup(flat.detach())
        codes = self.codebook[ids].reshape(z.shape)
        commitment = self.beta * F.mse_loss(z, codes)
        quantized = z + (codes - z).detach()
        return Quantized(
            quantized=quantized,
            ids=ids.reshape(z.shape[:-1]),
            encodings=z,
            commitment_loss=commitment,
            perplexity=codebook_perplexity(ids, self.codebook_size),
        )

    @torch.no_grad()
    def tokenize(self, z: Tensor) -> Tensor:
        """Code ids `(...)` of encodings `(..., D)`."""
        z = z.float()
        z = F.normalize(z, dim=-1) if self.cosine else z
        return self.lookup(z.reshape(-1, self.dim)).reshape(z.shape[:-1])

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Code vectors `(..., D)` of ids `(...)`."""
        return self.codebook[ids]

    def dead_codes(self) -> Tensor:
        """Scalar count of the codes the last :meth:`ema_update` found dead: EMA cluster size
        below ``dead_threshold`` (counted before their restart)."""
        return self.last_dead.clone()

    @torch.no_grad()
    def ema_update(self, encodings: Tensor, ids: Tensor, generator: torch.Generator | None = None) -> None:
        """One EMA step of the codebook from a step's encodings `(N, D)` and their ids `(N,)`.

        Counts and sums are added over processes, so every rank keeps the same codebook. Dead
        codes are restarted at encodings drawn (with ``generator``, which must be seeded alike
        on every rank, e.g. from the step) from the encodings of all processes.
        """
        encodings = encodings.reshape(-1, self.dim).float()
        ids = ids.reshape(-1)
        onehot = F.one_hot(ids, self.codebook_size).to(encodings.dtype)  # (N, K)
        counts = all_reduce_sum(onehot.sum(0))
        sums = all_reduce_sum(onehot.t() @ encodings)
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        dead = self.cluster_size < self.dead_threshold
        num_dead = int(dead.sum())
        self.last_dead.fill_(num_dead)
        if num_dead:
            pool = concat_all_gather(encodings)
            pick = torch.randint(pool.shape[0], (num_dead,), generator=generator, device="cpu")
            fresh = pool[pick.to(pool.device)]
            # A restarted code counts as having seen one encoding, itself, per step: enough to
            # stay alive until the next steps assign it encodings of its own.
            count = max(1.0, self.dead_threshold)
            self.cluster_size[dead] = count
            self.embed_sum[dead] = fresh * count
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codebook, dim=-1) if self.cosine else codebook)
