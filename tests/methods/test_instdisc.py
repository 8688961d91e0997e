"""InstDisc: NCE with the estimated Z against the paper's formulas in float64, the bank's
momentum update at the batch's indices in on_step_end, bad input, learning on digits, and
two processes x B equal to one process x 2B (loss, gradients, Z and bank)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError, DataError
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.instdisc import InstDisc, bank_scores
from selfsup.nn.memory import check_bank_fits
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config
from tests.multiprocess import assert_ranks_equal_one_process, results_on_ranks

N, M, D_IN, FEAT, T = 40, 7, 12, 6, 0.07


class Flat(nn.Module):
    """A BatchNorm-free backbone ``(B, 1, 2, 6) -> (B, 5)``: per-sample, so any batch split
    gives the same features (the DDP comparison needs that)."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D_IN, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x.flatten(1)))


class FixedNoise(InstDisc):
    """InstDisc whose noise draws are given (rows of ``self.noise`` in call order)."""

    def __init__(self, noise: list[Tensor], **kwargs: Any) -> None:
        super().__init__(Flat(), **kwargs)
        self.queue_of_noise = noise

    def noise_index(self, batch_size: int, device: torch.device) -> Tensor:
        return self.queue_of_noise.pop(0)


def info(step: int = 0) -> StepInfo:
    return StepInfo(step=step, total_steps=10, epoch=0.0, lr=0.1)


def make(noise: list[Tensor], seed: int = 0, **kwargs: Any) -> FixedNoise:
    torch.manual_seed(seed)
    options: dict[str, Any] = {"num_samples": N, "feat_dim": FEAT, "num_negatives": M, "temperature": T}
    return FixedNoise(noise, **(options | kwargs))


def ref_nce(
    v: Tensor, bank: Tensor, index: Tensor, noise: Tensor, log_z: float | None, n: int = N, t: float = T
) -> tuple[Tensor, float]:
    """The paper's NCE (section 3.2) in float64, written out: ``P(i|v) = exp(v_i.v/T) / Z``,
    ``h = P / (P + m/N)``, ``J = -mean_b[log h(pos) + sum_j log(1 - h(noise_j))]``; ``Z`` from this
    batch as ``N * mean(exp(scores))`` over positive and noise columns unless given."""
    v, bank = v.double(), bank.double()
    m = noise.shape[1]
    pos = torch.exp((bank[index] * v).sum(1) / t)  # (B,)
    neg = torch.exp(torch.einsum("bd,bkd->bk", v, bank[noise]) / t)  # (B, m)
    if log_z is None:
        z = n * torch.cat([pos[:, None], neg], dim=1).mean()
        log_z = math.log(float(z))
    z = math.exp(log_z)
    p_pos, p_neg = pos / z, neg / z
    pn = 1.0 / n
    h_pos = p_pos / (p_pos + m * pn)
    h_neg = p_neg / (p_neg + m * pn)
    loss = -(torch.log(h_pos) + torch.log(1 - h_neg).sum(1)).mean()
    return loss, log_z


def batch(x: Tensor, index: Tensor) -> Batch:
    return Batch(views=[x], index=index)


def data(b: int, seed: int = 1) -> tuple[Tensor, Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 2, 6, generator=g)
    index = torch.randperm(N, generator=g)[:b]
    noise = [torch.randint(N, (b, M), generator=g) for _ in range(3)]
    return x, index, noise


def test_nce_with_estimated_z_matches_the_papers_formula_and_z_is_then_fixed() -> None:
    x, index, noise = data(8)
    method = make([n.clone() for n in noise])
    bank0 = method.bank.bank.clone()
    out = method.training_step(batch(x, index), info())
    v = method.embedding(x).detach()
    loss, log_z = ref_nce(v, bank0, index, noise[0], None)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    assert not method.z_estimated, "Z is stored in on_step_end, not in the forward"
    method.on_step_end(info(), {k: v.detach() for k, v in out.items() if v.ndim > 0})
    assert method.z_estimated and float(method.z_log) == pytest.approx(log_z, rel=1e-6)
    # Second step: Z stays the first batch's estimate, the positives come from the updated bank.
    bank1 = method.bank.bank.clone()
    out2 = method.training_step(batch(x, index), info(1))
    loss2, _ = ref_nce(method.embedding(x).detach(), bank1, index, noise[1], log_z)
    torch.testing.assert_close(out2["loss"].double(), loss2, rtol=1e-5, atol=1e-6)
    assert float(method.z_log) == pytest.approx(log_z, rel=1e-6)


def test_per_batch_z_is_re_estimated_from_each_batch() -> None:
    x, index, noise = data(8)
    method = make([n.clone() for n in noise], z_estimate="per_batch")
    out = method.training_step(batch(x, index), info())
    method.on_step_end(info(), {k: v.detach() for k, v in out.items() if v.ndim > 0})
    bank1 = method.bank.bank.clone()
    out2 = method.training_step(batch(x, index), info(1))
    loss2, _ = ref_nce(method.embedding(x).detach(), bank1, index, noise[1], None)
    torch.testing.assert_close(out2["loss"].double(), loss2, rtol=1e-5, atol=1e-6)


def test_proximal_term_adds_lambda_times_the_squared_distance_to_the_bank_entry() -> None:
    x, index, noise = data(8)
    plain = make([n.clone() for n in noise])
    prox = make([n.clone() for n in noise], proximal=30.0)
    bank = prox.bank.bank.clone()
    a = plain.training_step(batch(x, index), info())
    b = prox.training_step(batch(x, index), info())
    v = prox.embedding(x).detach().double()
    expected = 30.0 * (v - bank[index].double()).square().sum(1).mean()
    torch.testing.assert_close((b["loss"] - a["loss"]).double(), expected, rtol=1e-5, atol=1e-6)


def test_bank_moves_only_at_the_batch_indices_with_momentum_half_in_on_step_end() -> None:
    x, index, noise = data(8)
    method = make(noise)
    before = method.bank.bank.clone()
    out = method.training_step(batch(x, index), info())
    assert torch.equal(method.bank.bank, before), "the forward must not touch the bank"
    method.on_step_end(info(), {k: v.detach() for k, v in out.items() if v.ndim > 0})
    f = out["features"].double()
    expected = F.normalize(0.5 * before[index].double() + 0.5 * f, dim=1)
    torch.testing.assert_close(method.bank.bank[index].double(), expected, rtol=1e-6, atol=1e-7)
    others = torch.ones(N, dtype=torch.bool)
    others[index] = False
    assert torch.equal(method.bank.bank[others], before[others])
    assert torch.allclose(method.bank.bank.norm(dim=1), torch.ones(N))


def test_bank_scores_gather_and_full_paths_agree() -> None:
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    small = F.normalize(torch.randn(30, 16, generator=g), dim=1)  # N <= K * D / 8: full scores
    idx = torch.randint(30, (5, 20), generator=g)
    full = bank_scores(f, small, idx, T)
    gathered = torch.einsum("bd,bkd->bk", f, small[idx]) / T
    torch.testing.assert_close(full, gathered)
    big = F.normalize(torch.randn(500, 16, generator=g), dim=1)  # N > K * D / 8: gather
    idx = torch.randint(500, (5, 20), generator=g)
    torch.testing.assert_close(bank_scores(f, big, idx, T), (f @ big.T).gather(1, idx) / T)


def test_bad_indices_and_oversized_banks_are_one_line_errors() -> None:
    x, index, noise = data(4)
    method = make(noise)
    with pytest.raises(DataError, match="outside the memory bank"):
        method.training_step(batch(x, torch.tensor([0, 1, 2, N])), info())
    with pytest.raises(DataError, match="data-set index"):
        method.training_step(batch(x, torch.arange(3)), info())
    with pytest.raises(ConfigError, match="memory bank.*GiB"):
        check_bank_fits(10**13, 128, "cpu")


# ------------------------------------------------------------------------ end to end
def _logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_instdisc_learns_on_digits(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "instdisc",
        "train.epochs=5",
        "backbone.width=16",
        "method.num_negatives=512",
        "method.z_estimate=per_batch",
        "views.crop_scale=[0.5, 1.0]",
    )
    run = PretrainRun(cfg)
    run.fit()
    losses = _logged_losses(run.run_dir)
    # The bank holds random vectors until every row has been written once (one epoch); the
    # loss rises while it fills, so compare the second epoch with the last.
    per_epoch = len(losses) // 5
    second, last = losses[per_epoch : 2 * per_epoch], losses[-per_epoch:]
    assert sum(last) < 0.9 * sum(second), losses
    splits, views = run.parts.splits, run.parts.eval_views
    torch.manual_seed(123)
    random_init = BACKBONES.build("convnet", in_channels=splits.in_channels, image_size=splits.image_size, width=16)

    def knn(encoder: nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, encoder, splits.train, splits.test, splits.num_classes, views, cfg.eval, run.device, linear=False
        )

    trained, random = knn(run.method.backbone), knn(random_init)
    top1 = next(k for k in trained if k.startswith("knn_top1"))
    assert trained["feature_std"] > 0.02, trained  # not collapsed
    assert trained[top1] >= random[top1], (trained, random)


# ------------------------------------------------------------------------ two processes
WORLD, B = 2, 4


def _ddp_step(r: int | None) -> dict[str, Any]:
    """One step and its bank update on rank ``r``'s share (``None``: one process, all of it)."""
    x, index, noise = data(WORLD * B, seed=5)
    share = slice(None) if r is None else slice(r * B, (r + 1) * B)
    method = make([n[share] for n in noise], seed=3)
    out = method.training_step(batch(x[share], index[share]), info())
    out["loss"].backward()
    grads = [p.grad.clone() for p in method.parameters()]
    if r is not None:  # DDP's averaging of parameter gradients
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
    method.on_step_end(info(), {k: v.detach() for k, v in out.items() if v.ndim > 0})
    out2 = method.training_step(batch(x[share], index[share]), info(1))
    return {
        "loss": out["loss"].detach(),
        "loss2": out2["loss"].detach(),
        "grads": grads,
        "bank": method.bank.bank.clone(),
        "z_log": method.z_log.clone(),
    }


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = results_on_ranks(_ddp_step, WORLD, tmp_path)
    ref = _ddp_step(None)
    assert_ranks_equal_one_process(ranks, ref, mean_keys=("loss", "loss2"), state_keys=("z_log", "bank"))
    assert all(torch.equal(out["bank"], ranks[0]["bank"]) for out in ranks)
