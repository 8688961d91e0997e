"""InvaSpread: the method's loss is the paper's on its embeddings, it learns on digits without
collapse, and two processes x B (gathered negatives) equal one process x 2B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.invaspread import InvaSpread
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config
from tests.losses.test_instance import ref_invaspread
from tests.methods.test_instdisc import Flat
from tests.multiprocess import assert_ranks_equal_one_process, results_on_ranks

INFO = StepInfo(step=0, total_steps=10, epoch=0.0)


def test_training_step_is_the_papers_loss_on_the_normalised_linear_embeddings() -> None:
    torch.manual_seed(0)
    method = InvaSpread(Flat(), feat_dim=6)
    x, x_hat = torch.randn(5, 1, 2, 6), torch.randn(5, 1, 2, 6)
    out = method.training_step(Batch(views=[x, x_hat], index=torch.arange(5)), INFO)
    with torch.no_grad():
        f, f_hat = method.head(method.backbone(x)), method.head(method.backbone(x_hat))
    assert float(out["loss"].detach()) == pytest.approx(ref_invaspread(f, f_hat, 0.1), rel=1e-5)


@pytest.mark.slow
def test_invaspread_learns_on_digits(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "invaspread", "train.epochs=4", "backbone.width=16", "views.crop_scale=[0.5, 1.0]")
    run = PretrainRun(cfg)
    run.fit()
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
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


WORLD, B = 2, 3


def _step(r: int | None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    x, x_hat = torch.randn(WORLD * B, 1, 2, 6, generator=g), torch.randn(WORLD * B, 1, 2, 6, generator=g)
    share = slice(None) if r is None else slice(r * B, (r + 1) * B)
    torch.manual_seed(2)
    method = InvaSpread(Flat(), feat_dim=6)
    out = method.training_step(Batch(views=[x[share], x_hat[share]], index=torch.arange(B)), INFO)
    out["loss"].backward()
    grads = [p.grad.clone() for p in method.parameters()]
    if r is not None:  # DDP's averaging
        for grad in grads:
            dist.all_reduce(grad)
            grad /= WORLD
    return {"loss": out["loss"].detach(), "grads": grads}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = results_on_ranks(_step, WORLD, tmp_path)
    ref = _step(None)
    assert_ranks_equal_one_process(ranks, ref)


def test_embeddings_are_unit_norm() -> None:
    method = InvaSpread(Flat(), feat_dim=6)
    z = F.normalize(method.head(method.backbone(torch.randn(4, 1, 2, 6))), dim=1)
    assert torch.allclose(z.norm(dim=1), torch.ones(4))
