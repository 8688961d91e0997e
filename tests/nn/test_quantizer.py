"""VectorQuantizer: EMA codebook updates against a float64 recomputation of VQ-VAE's formulas,
nearest-code lookups (Euclidean and BEiT v2's cosine), the straight-through gradient, the
commitment loss, dead-code restarts and the perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from selfsup.nn.quantizer import VectorQuantizer, codebook_perplexity


def _state(q: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def _ema_reference(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    ids: torch.Tensor,
    decay: float,
    eps: float,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VQ-VAE Appendix A.1 with Laplace smoothing, code by code, in float64."""
    n, m, z = cluster_size.double().clone(), embed_sum.double().clone(), z.double()
    k_total = n.shape[0]
    for k in range(k_total):
        members = z[ids == k]
        n[k] = decay * n[k] + (1 - decay) * members.shape[0]
        m[k] = decay * m[k] + (1 - decay) * members.sum(0)
    total = n.sum()
    codebook = torch.empty_like(m)
    for k in range(k_total):
        smoothed = (n[k] + eps) / (total + k_total * eps) * total
        codebook[k] = m[k] / smoothed
        if cosine:
            codebook[k] = codebook[k] / codebook[k].norm()
    return n, m, codebook


def test_ema_update_matches_float64_recompute() -> None:
    for cosine in (False, True):
        torch.manual_seed(0)
        q = VectorQuantizer(codebook_size=6, dim=3, decay=0.9, eps=1e-5, cosine=cosine, dead_threshold=0.0)
        q.cluster_size.uniform_(0.5, 3.0)  # a state some steps into training
        q.embed_sum.normal_()
        z = torch.randn(40, 3)
        out = q(z)
        n, m, codebook = _ema_reference(q.cluster_size, q.embed_sum, out.encodings, out.ids, 0.9, 1e-5, cosine)
        q.ema_update(out.encodings.detach(), out.ids)
        torch.testing.assert_close(q.cluster_size, n.float())
        torch.testing.assert_close(q.embed_sum, m.float())
        torch.testing.assert_close(q.codebook, codebook.float())


def test_forward_changes_no_buffer_and_ids_are_the_nearest_codes() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, dim=4)
    before = _state(q)
    z = torch.randn(2, 5, 4) * 2
    out = q(z)
    assert out.ids.shape == (2, 5) and out.quantized.shape == (2, 5, 4)
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), key
    dist = ((z.double().unsqueeze(-2) - q.codebook.double()) ** 2).sum(-1)  # (2, 5, K)
    assert torch.equal(out.ids, dist.argmin(-1))
    torch.testing.assert_close(out.quantized, q.codebook[out.ids])
    assert torch.equal(q.tokenize(z), out.ids)


def test_l2_normalised_lookup_picks_the_max_cosine_code() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=32, dim=8, cosine=True)
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(32))
    z = torch.randn(64, 8) * torch.rand(64, 1) * 10  # any norms: only directions count
    cos = (z.double() @ q.codebook.double().t()) / z.double().norm(dim=1, keepdim=True)
    out = q(z)
    assert torch.equal(out.ids, cos.argmax(1))
    torch.testing.assert_close(out.encodings, F.normalize(z, dim=-1))
    assert torch.equal(q(z * torch.rand(64, 1)).ids, out.ids)  # scale-invariant


def test_straight_through_gradient_and_commitment_loss() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=4, beta=0.25)
    z = torch.randn(10, 4, requires_grad=True)
    out = q(z)
    weights = torch.randn(10, 4)
    (grad,) = torch.autograd.grad((out.quantized * weights).sum(), z)
    torch.testing.assert_close(grad, weights)  # d quantized / d z = identity
    codes = q.codebook[out.ids].double()
    expected = 0.25 * ((z.detach().double() - codes) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss.double(), expected)
    (grad,) = torch.autograd.grad(out.commitment_loss, z)
    torch.testing.assert_close(grad.double(), 0.25 * 2 * (z.detach().double() - codes) / z.numel())


def test_dead_codes_restart_at_batch_encodings_reproducibly() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=4, decay=0.99, dead_threshold=1.0)
    q.cluster_size.fill_(5.0)
    q.cluster_size[[2, 5]] = 0.5  # rarely used: dead
    z = torch.randn(30, 4) + 10  # far from every code: all go to one code
    out = q(z)
    twin = VectorQuantizer(codebook_size=8, dim=4, dead_threshold=1.0)
    twin.load_state_dict(q.state_dict())
    q.ema_update(out.encodings, out.ids, torch.Generator().manual_seed(3))
    twin.ema_update(out.encodings, out.ids, torch.Generator().manual_seed(3))
    assert float(q.dead_codes()) == 2.0
    for k in (2, 5):  # restarted at one of the batch's encodings (up to the Laplace smoothing)
        assert (q.codebook[k] - z).norm(dim=1).min() < 1e-3 * z.norm(dim=1).max()
        assert q.cluster_size[k] == 1.0
    for key, value in q.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_perplexity_counts_the_effectively_used_codes() -> None:
    assert math.isclose(float(codebook_perplexity(torch.tensor([0, 1, 2, 3] * 5), 16)), 4.0, rel_tol=1e-5)
    assert math.isclose(float(codebook_perplexity(torch.zeros(9, dtype=torch.long), 16)), 1.0, rel_tol=1e-6)


def _codebook_after_update(rank: int) -> dict[str, torch.Tensor]:
    """One EMA update on this rank's half of a batch (run on 2 gloo processes)."""
    q, z = _distributed_setup()
    half = z.shape[0] // 2
    out = q(z[rank * half : (rank + 1) * half])
    q.ema_update(out.encodings, out.ids, torch.Generator().manual_seed(7))
    return _state(q)


def _distributed_setup() -> tuple[VectorQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=4, decay=0.9, dead_threshold=1.0)
    q.cluster_size.uniform_(0.5, 3.0)  # some codes dead, some alive
    return q, torch.randn(12, 4)


def test_two_processes_with_half_batches_update_like_one_with_the_whole(tmp_path: Path) -> None:
    """Counts and sums are added over ranks and dead codes restart from the gathered encodings,
    so both ranks end with the single-process codebook of the concatenated batch."""
    from tests.multiprocess import results_on_ranks

    q, z = _distributed_setup()
    out = q(z)
    q.ema_update(out.encodings, out.ids, torch.Generator().manual_seed(7))
    assert float(q.dead_codes()) > 0
    for state in results_on_ranks(_codebook_after_update, 2, tmp_path):
        for key, value in q.state_dict().items():
            torch.testing.assert_close(state[key], value)
