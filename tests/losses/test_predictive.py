"""CPC's InfoNCE over a patch grid against a float64 loop over offsets and positions, its
closed form, and two processes x B equal to one process x 2B."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.losses import cpc_loss
from tests.multiprocess import results_on_ranks


def ref_cpc(predictions: list[Tensor], latents: Tensor) -> float:
    """The paper's InfoNCE written out: for each offset k, each image b and position (i, j)
    with i + k < G, -log softmax over every patch latent of the batch at the target z[b, i+k, j];
    mean over positions, then over offsets."""
    b, rows, cols, _ = latents.shape
    everything = [latents[n, r, c] for n in range(b) for r in range(rows) for c in range(cols)]
    per_offset = []
    for k, p in enumerate(predictions, start=1):
        terms = []
        for n in range(b):
            for i in range(rows - k):
                for j in range(cols):
                    scores = [float(p[n, i, j] @ z) for z in everything]
                    positive = float(p[n, i, j] @ latents[n, i + k, j])
                    m = max(scores)
                    terms.append(m + math.log(sum(math.exp(s - m) for s in scores)) - positive)
        per_offset.append(sum(terms) / len(terms))
    return sum(per_offset) / len(per_offset)


def test_cpc_loss_matches_a_float64_loop_over_offsets_and_positions() -> None:
    b, rows, cols, d = 2, 4, 3, 5
    latents = torch.randn(b, rows, cols, d, dtype=torch.float64)
    predictions = [torch.randn(b, rows - k, cols, d, dtype=torch.float64) for k in (1, 2, 3)]
    got = cpc_loss(predictions, latents)
    assert float(got) == pytest.approx(ref_cpc(predictions, latents), rel=1e-10)


def test_cpc_loss_closed_forms() -> None:
    latents = torch.randn(3, 4, 4, 6)
    # Predictions carrying no information score every one of the B*G*G' patches alike.
    zeros = [torch.zeros(3, 4 - k, 4, 6) for k in (1, 2)]
    assert float(cpc_loss(zeros, latents)) == pytest.approx(math.log(3 * 16), rel=1e-6)
    # A perfect, confident prediction of orthonormal latents costs nothing.
    basis = torch.eye(48).view(3, 4, 4, 48)
    perfect = [50 * basis[:, k:] for k in (1, 2)]
    assert float(cpc_loss(perfect, basis)) < 1e-6


def test_cpc_loss_gives_gradients_to_predictions_and_latents() -> None:
    latents = torch.randn(2, 3, 3, 4, requires_grad=True)
    predictions = [torch.randn(2, 2, 3, 4, requires_grad=True)]
    cpc_loss(predictions, latents).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert predictions[0].grad is not None and predictions[0].grad.abs().sum() > 0


def test_bad_prediction_shapes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"predictions\[0\] must be \(2, 2, 3, 4\)"):
        cpc_loss([torch.randn(2, 3, 3, 4)], torch.randn(2, 3, 3, 4))


def _two_process_case(rank: int, world_size: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)
    predictions = [torch.randn(4, 3 - k, 2, 5, generator=g, dtype=torch.float64) for k in (1, 2)]
    local = slice(rank * 2, rank * 2 + 2) if world_size > 1 else slice(0, 4)
    z = latents[local].clone().requires_grad_(True)
    p = [q[local].clone().requires_grad_(True) for q in predictions]
    loss = cpc_loss(p, z, gather=True)
    loss.backward()
    assert z.grad is not None
    return {"loss": loss.detach(), "z_grad": z.grad / world_size}


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = results_on_ranks(_two_process_case, 2, tmp_path)
    single = _two_process_case(0, 1)
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, single["loss"])
    # Each rank's share of the latents' gradient: the single-process gradient of its images.
    torch.testing.assert_close(torch.cat([ranks[0]["z_grad"], ranks[1]["z_grad"]]), single["z_grad"])
