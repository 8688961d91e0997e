"""InstDisc's exact non-parametric softmax (eq. 2): the loss against the formula written out in
float64 (one-pass and chunked, values and gradients), the method's softmax objective (positive =
the image's bank entry, bank and Z handling, proximal term), bad options, learning on digits,
and two processes x B equal to one process x 2B."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.losses import bank_softmax_loss
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.instdisc import InstDisc
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config
from tests.methods.test_instdisc import Flat
from tests.multiprocess import assert_ranks_equal_one_process, results_on_ranks

N, FEAT, T = 40, 6, 0.07


def ref_softmax(features: Tensor, bank: Tensor, index: Tensor, t: float = T) -> float:
    """``-mean_b log( exp(v_{i_b} . f_b / T) / sum_{j=1..N} exp(v_j . f_b / T) )`` in float64,
    one sample and one bank row at a time."""
    f, v = features.double(), bank.double()
    total = 0.0
    for b in range(f.shape[0]):
        scores = [float(f[b] @ v[j]) / t for j in range(v.shape[0])]
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_z - scores[int(index[b])]
    return total / f.shape[0]


def unit(*shape: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("chunk_size", [65536, 40, 7, 1])
def test_bank_softmax_matches_the_formula_one_pass_and_chunked(chunk_size: int) -> None:
    f, bank = unit(5, FEAT, seed=0), unit(N, FEAT, seed=1)
    index = torch.tensor([3, 0, 39, 17, 3])
    got = bank_softmax_loss(f, bank, index, T, chunk_size=chunk_size)
    assert float(got) == pytest.approx(ref_softmax(f, bank, index), rel=1e-5)


def test_chunked_gradient_equals_the_float64_gradient_and_the_bank_gets_none() -> None:
    f0, bank = unit(6, FEAT, seed=2), unit(N, FEAT, seed=3)
    index = torch.randperm(N, generator=torch.Generator().manual_seed(4))[:6]
    f64 = f0.double().requires_grad_(True)
    logits = f64 @ bank.double().T / T
    (-(logits.gather(1, index[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)).mean()).backward()
    for chunk in (65536, 9):
        f = f0.clone().requires_grad_(True)
        bank_softmax_loss(f, bank, index, T, chunk_size=chunk).backward()
        assert f.grad is not None
        torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)
    # The loss is a constant in the bank (a buffer updated by momentum, not by gradient).
    trainable_bank = bank.clone().requires_grad_(True)
    bank_softmax_loss(f0.clone().requires_grad_(True), trainable_bank, index, T, chunk_size=9).backward()
    assert trainable_bank.grad is None


def test_bank_softmax_rejects_bad_shapes() -> None:
    f, bank = unit(3, FEAT, seed=0), unit(N, FEAT, seed=1)
    with pytest.raises(ValueError, match=r"features \(B, D\) and bank \(N, D\)"):
        bank_softmax_loss(f, bank[:, :4], torch.arange(3))
    with pytest.raises(ValueError, match="index"):
        bank_softmax_loss(f, bank, torch.arange(4))
    with pytest.raises(ValueError, match="chunk_size"):
        bank_softmax_loss(f, bank, torch.arange(3), chunk_size=0)


# ------------------------------------------------------------------------ the method
def info(step: int = 0) -> StepInfo:
    return StepInfo(step=step, total_steps=10, epoch=0.0, lr=0.1)


def make(seed: int = 0, **kwargs: Any) -> InstDisc:
    torch.manual_seed(seed)
    options: dict[str, Any] = {"num_samples": N, "feat_dim": FEAT, "temperature": T, "objective": "softmax"}
    return InstDisc(Flat(), **(options | kwargs))


def data(b: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 2, 6, generator=g), torch.randperm(N, generator=g)[:b]


def test_softmax_objective_scores_the_whole_bank_with_the_bank_entry_as_positive() -> None:
    x, index = data(8)
    method = make(chunk_size=16)  # 40 rows in 3 chunks
    bank0 = method.bank.bank.clone()
    out = method.training_step(Batch(views=[x], index=index), info())
    v = method.embedding(x).detach()
    assert float(out["loss"].detach()) == pytest.approx(ref_softmax(v, bank0, index), rel=1e-5)
    # Not the current feature as positive: that would be a different (smaller) loss.
    with_current = bank0.clone()
    with_current[index] = v
    assert abs(ref_softmax(v, with_current, index) - float(out["loss"].detach())) > 0.1
    assert "z_log" not in out and torch.equal(method.bank.bank, bank0)
    method.on_step_end(info(), {k: t.detach() for k, t in out.items() if t.ndim > 0})
    expected = F.normalize(0.5 * bank0[index].double() + 0.5 * v.double(), dim=1)
    torch.testing.assert_close(method.bank.bank[index].double(), expected, rtol=1e-6, atol=1e-7)
    assert "z_log" not in method.state_dict() and not method.z_estimated, "the exact softmax has no Z"
    # The second step's positives are the updated bank entries.
    bank1 = method.bank.bank.clone()
    out2 = method.training_step(Batch(views=[x], index=index), info(1))
    assert float(out2["loss"].detach()) == pytest.approx(
        ref_softmax(method.embedding(x).detach(), bank1, index), rel=1e-5
    )


def test_softmax_objective_keeps_the_proximal_term() -> None:
    x, index = data(8)
    plain, prox = make(), make(proximal=30.0)
    a = plain.training_step(Batch(views=[x], index=index), info())
    b = prox.training_step(Batch(views=[x], index=index), info())
    v = prox.embedding(x).detach().double()
    expected = 30.0 * (v - prox.bank.bank[index].double()).square().sum(1).mean()
    torch.testing.assert_close((b["loss"] - a["loss"]).double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_objective_and_chunk_size_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="objective must be 'nce'.*'softmax'"):
        make(objective="infonce")
    with pytest.raises(ValueError, match="chunk_size"):
        make(chunk_size=0)


# ------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_softmax_instdisc_learns_on_digits(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "instdisc",
        "train.epochs=4",
        "backbone.width=16",
        "method.objective=softmax",
        "views.crop_scale=[0.5, 1.0]",
    )
    run = PretrainRun(cfg)
    run.fit()
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    per_epoch = len(losses) // 4
    # The bank holds random vectors for the first epoch; compare the second with the last.
    assert sum(losses[-per_epoch:]) < sum(losses[per_epoch : 2 * per_epoch]), losses
    splits, views = run.parts.splits, run.parts.eval_views
    torch.manual_seed(123)
    random_init = BACKBONES.build("convnet", in_channels=splits.in_channels, image_size=splits.image_size, width=16)

    def knn(encoder: torch.nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, encoder, splits.train, splits.test, splits.num_classes, views, cfg.eval, run.device, linear=False
        )

    trained, random = knn(run.method.backbone), knn(random_init)
    top1 = next(k for k in trained if k.startswith("knn_top1"))
    assert trained["feature_std"] > 0.02, trained
    assert trained[top1] >= random[top1], (trained, random)


# ------------------------------------------------------------------------ two processes
WORLD, B = 2, 4


def _ddp_step(r: int | None) -> dict[str, Any]:
    """One softmax step and its bank update on rank ``r``'s share (``None``: all of it)."""
    x, index = data(WORLD * B, seed=5)
    share = slice(None) if r is None else slice(r * B, (r + 1) * B)
    method = make(seed=3, chunk_size=16)
    out = method.training_step(Batch(views=[x[share]], index=index[share]), info())
    out["loss"].backward()
    grads = [p.grad.clone() for p in method.parameters()]
    if r is not None:  # DDP's averaging of parameter gradients
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
    method.on_step_end(info(), {k: t.detach() for k, t in out.items() if t.ndim > 0})
    out2 = method.training_step(Batch(views=[x[share]], index=index[share]), info(1))
    return {"loss": out["loss"].detach(), "loss2": out2["loss"].detach(), "grads": grads, "bank": method.bank.bank}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = results_on_ranks(_ddp_step, WORLD, tmp_path)
    ref = _ddp_step(None)
    assert_ranks_equal_one_process(ranks, ref, mean_keys=("loss", "loss2"), state_keys=("bank",))
