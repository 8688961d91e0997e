"""CMC: the view splits (L vs ab, top vs bottom), half-width encoders and the concatenated
representation, the cross-view NCE, full-bank softmax and in-batch losses against float64
formulas, the banks' update in on_step_end, bad view splits, and learning on digits."""

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
from selfsup.errors import ConfigError
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.cmc import CMC
from selfsup.nn.backbones.convnet import ConvNet
from selfsup.registry import BACKBONES
from selfsup.transforms.color import rgb_to_lab
from tests.conftest import tiny_config
from tests.methods.test_instdisc import ref_nce
from tests.methods.test_instdisc_softmax import ref_softmax
from tests.multiprocess import assert_ranks_equal_one_process, results_on_ranks

N, M, T = 30, 5, 0.07
INFO = StepInfo(step=0, total_steps=10, epoch=0.0)


class FixedNoise(CMC):
    def __init__(self, noise: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fixed_noise = noise

    def noise_index(self, batch_size: int, device: torch.device) -> Tensor:
        return self.fixed_noise


def convnet(in_channels: int = 1, width: int = 8) -> nn.Module:
    return BACKBONES.build("convnet", in_channels=in_channels, image_size=16, width=width)


def make(in_channels: int = 1, **kwargs: Any) -> CMC:
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "backbone": convnet(in_channels, 32),
        "num_samples": N,
        "in_channels": in_channels,
        "image_size": 16,
        "mean": (0.5,) * in_channels,
        "std": (0.25,) * in_channels,
        "num_negatives": M,
        "temperature": T,
        "feat_dim": 8,
    }
    noise = kwargs.pop("noise", None)
    if noise is not None:
        return FixedNoise(noise, **(options | kwargs))
    return CMC(**(options | kwargs))


def test_lab_split_gives_normalised_l_and_ab_to_half_width_encoders() -> None:
    method = make(3)
    enc = method.backbone
    assert enc.views == "lab"
    assert isinstance(enc.encoder1, ConvNet) and isinstance(enc.encoder2, ConvNet)
    assert enc.encoder1.stages[0][0].in_channels == 1 and enc.encoder2.stages[0][0].in_channels == 2
    assert enc.encoder1.stages[0][0].out_channels == 16  # half of the configured width 32
    assert enc.num_features == method.num_features == 2 * enc.encoder1.num_features
    rgb = torch.rand(2, 3, 16, 16)
    l_view, ab_view = enc.split((rgb - 0.5) / 0.25)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(l_view, (lab[:, :1] - 50.0) / 50.0, rtol=1e-4, atol=1e-4)
    mean_a, half_a = (-86.183 + 98.233) / 2, (86.183 + 98.233) / 2
    torch.testing.assert_close(ab_view[:, :1], (lab[:, 1:2] - mean_a) / half_a, rtol=1e-4, atol=1e-4)
    method.eval()
    feats = method.embed((rgb - 0.5) / 0.25)
    expected = torch.cat([enc.encoder1(l_view), enc.encoder2(ab_view)], dim=1)
    torch.testing.assert_close(feats, expected)


def test_single_channel_views_are_top_and_bottom_halves_and_lab_is_refused() -> None:
    method = make(1)
    x = torch.randn(2, 1, 15, 16)
    top, bottom = method.backbone.split(x)
    assert torch.equal(torch.cat([top, bottom], dim=2), x) and top.shape[2] == 7
    with pytest.raises(ConfigError, match="views=lab.*3-channel.*halves"):
        make(1, views="lab")
    with pytest.raises(ConfigError, match="method.encoder"):
        CMC(nn.Sequential(), num_samples=N, in_channels=1)
    spec = make(1, encoder={"name": "convnet", "width": 4})
    assert spec.backbone.encoder1.stages[0][0].out_channels == 4


def test_cross_view_nce_matches_the_formula_and_banks_update_in_on_step_end() -> None:
    g = torch.Generator().manual_seed(3)
    noise = torch.randint(N, (2, 6, M), generator=g)
    method = make(1, noise=noise)
    x, index = torch.randn(6, 1, 16, 16, generator=g), torch.randperm(N, generator=g)[:6]
    bank1, bank2 = method.bank1.bank.clone(), method.bank2.bank.clone()
    out = method.training_step(Batch(views=[x], index=index), INFO)
    with torch.no_grad():
        z1, z2 = method.embeddings(x)
    loss12, log_z12 = ref_nce(z1, bank2, index, noise[0], None, n=N, t=T)  # view 1 vs view 2's bank
    loss21, log_z21 = ref_nce(z2, bank1, index, noise[1], None, n=N, t=T)
    torch.testing.assert_close(out["loss"].detach().double(), loss12 + loss21, rtol=1e-5, atol=1e-6)
    assert torch.equal(method.bank1.bank, bank1) and torch.equal(method.bank2.bank, bank2)
    method.on_step_end(INFO, {k: v.detach() for k, v in out.items() if v.ndim > 0})
    assert method.z_log.tolist() == pytest.approx([log_z12, log_z21], rel=1e-6)
    for bank, before, z in ((method.bank1.bank, bank1, z1), (method.bank2.bank, bank2, z2)):
        expected = F.normalize(0.5 * before[index].double() + 0.5 * z.double(), dim=1)
        torch.testing.assert_close(bank[index].double(), expected, rtol=1e-6, atol=1e-7)
        others = torch.ones(N, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank[others], before[others])


def test_in_batch_objective_is_infonce_in_both_directions() -> None:
    method = make(1, objective="infonce")
    x = torch.randn(5, 1, 16, 16)
    out = method.training_step(Batch(views=[x], index=torch.arange(5)), INFO)
    with torch.no_grad():
        z1, z2 = (z.double() for z in method.embeddings(x))

    def ce(q: Tensor, k: Tensor) -> float:
        total = 0.0
        for i in range(q.shape[0]):
            logits = [float(q[i] @ k[j]) / T for j in range(k.shape[0])]
            total += -logits[i] + math.log(sum(math.exp(s) for s in logits))
        return total / q.shape[0]

    assert float(out["loss"].detach()) == pytest.approx(ce(z1, z2) + ce(z2, z1), rel=1e-5)
    assert not hasattr(method, "bank1")


def test_softmax_objective_is_the_exact_softmax_over_the_other_views_bank() -> None:
    method = make(1, objective="softmax", chunk_size=7)  # 30 rows in 5 chunks
    g = torch.Generator().manual_seed(4)
    x, index = torch.randn(6, 1, 16, 16, generator=g), torch.randperm(N, generator=g)[:6]
    bank1, bank2 = method.bank1.bank.clone(), method.bank2.bank.clone()
    out = method.training_step(Batch(views=[x], index=index), INFO)
    with torch.no_grad():
        z1, z2 = method.embeddings(x)
    # -log [exp(z . bank[i] / T) / sum_j exp(z . bank[j] / T)], view 1 vs bank 2 and view 2 vs bank 1.
    expected = ref_softmax(z1, bank2, index, T) + ref_softmax(z2, bank1, index, T)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert "z_log" not in method.state_dict()
    method.on_step_end(INFO, {k: v.detach() for k, v in out.items() if v.ndim > 0})
    for bank, before, z in ((method.bank1.bank, bank1, z1), (method.bank2.bank, bank2, z2)):
        expected_rows = F.normalize(0.5 * before[index].double() + 0.5 * z.double(), dim=1)
        torch.testing.assert_close(bank[index].double(), expected_rows, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="objective.*'softmax'"):
        make(1, objective="full")


@pytest.mark.slow
def test_cmc_learns_on_digits(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "cmc",
        "train.epochs=5",
        "backbone.width=16",
        "method.num_negatives=512",
        "method.z_estimate=per_batch",
        "views.crop_scale=[0.5, 1.0]",
        "views.flip_p=0.0",
        "optim.name=adamw",
        "optim.lr=0.002",
        "optim.lr_scaling=none",
    )
    run = PretrainRun(cfg)
    run.fit()
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    per_epoch = len(losses) // 5
    # The banks hold random vectors during the first epoch and the loss peaks when they have
    # filled; compare the first steps after that with the last ones.
    assert sum(losses[-3:]) < 0.9 * sum(losses[per_epoch : per_epoch + 3]), losses
    splits, views = run.parts.splits, run.parts.eval_views
    torch.manual_seed(123)
    random_init = make(1, backbone=convnet(1, 16), num_samples=len(splits.pretrain.images)).backbone

    def knn(encoder: nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, encoder, splits.train, splits.test, splits.num_classes, views, cfg.eval, run.device, linear=False
        )

    trained, random = knn(run.method.backbone), knn(random_init)
    top1 = next(k for k in trained if k.startswith("knn_top1"))
    assert trained["feature_std"] > 0.02, trained
    assert trained[top1] >= random[top1], (trained, random)


# ------------------------------------------------------------------------ two processes
WORLD, B = 2, 3


def _ddp_step(r: int | None) -> dict[str, Any]:
    """One step and its bank updates on rank ``r``'s share (``None``: one process, all of it),
    with BatchNorm-free encoders so that splitting the batch changes no statistics."""
    g = torch.Generator().manual_seed(6)
    x, index = torch.randn(WORLD * B, 1, 16, 16, generator=g), torch.randperm(N, generator=g)[: WORLD * B]
    noise = torch.randint(N, (2, WORLD * B, M), generator=g)
    share = slice(None) if r is None else slice(r * B, (r + 1) * B)
    method = make(1, noise=noise[:, share], encoder={"name": "convnet", "width": 4, "norm": "none"})
    out = method.training_step(Batch(views=[x[share]], index=index[share]), INFO)
    out["loss"].backward()
    grads = [p.grad.clone() for p in method.parameters()]
    if r is not None:  # DDP's averaging of parameter gradients
        for grad in grads:
            dist.all_reduce(grad)
            grad /= WORLD
    method.on_step_end(INFO, {k: v.detach() for k, v in out.items() if v.ndim > 0})
    return {
        "loss": out["loss"].detach(),
        "grads": grads,
        "banks": (method.bank1.bank.clone(), method.bank2.bank.clone()),
        "z_log": method.z_log.clone(),
    }


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = results_on_ranks(_ddp_step, WORLD, tmp_path)
    ref = _ddp_step(None)
    assert_ranks_equal_one_process(ranks, ref, state_keys=("z_log", "banks"))
