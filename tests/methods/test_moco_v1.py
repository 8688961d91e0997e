"""MoCo v1 (and MoCHi on MoCo v1/v2): the loss against float64 InfoNCE, the linear head, the
queue's divisibility, and tiny trainings through the real engine."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.engine.build import build_components
from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.losses import info_nce
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.moco_v1 import MoCoV1
from selfsup.methods.moco_v2 import MoCo, MoCoV2, mochi_sizes, moco_queue_size
from selfsup.registry import BACKBONES, METHODS
from tests.conftest import tiny_config


def _convnet() -> nn.Module:
    return BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)  # type: ignore[no-any-return]


def _batch(b: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        views=[torch.randn(b, 1, 16, 16, generator=g), torch.randn(b, 1, 16, 16, generator=g)], index=torch.arange(b)
    )


def _info(epoch: float = 0.0) -> StepInfo:
    return StepInfo(step=0, total_steps=10, epoch=epoch)


def test_defaults_are_the_papers() -> None:
    method = MoCoV1(_convnet())
    assert method.temperature == 0.07 and method.default_ema_momentum == (0.999, 0.999)
    assert method.queue.size == 65536 and method.queue.queue.shape[1] == 128  # K = 65536 at the default sizes
    assert method.mochi is None  # MoCHi is off unless asked for
    assert METHODS.get("moco_v1") is MoCoV1


def test_head_is_one_linear_layer_to_128_d() -> None:
    method = MoCoV1(_convnet(), num_samples=256, batch_size=8)
    layers = list(method.projector.modules())[1:]
    assert len(layers) == 1 and isinstance(layers[0], nn.Linear)
    assert layers[0].in_features == method.num_features and layers[0].out_features == 128
    # Affine: f(a x + (1 - a) y) = a f(x) + (1 - a) f(y).
    x, y = torch.randn(4, method.num_features), torch.randn(4, method.num_features)
    torch.testing.assert_close(
        method.projector(0.3 * x + 0.7 * y), 0.3 * method.projector(x) + 0.7 * method.projector(y)
    )
    assert isinstance(MoCoV2(_convnet(), num_samples=256, batch_size=8).projector[1], nn.ReLU)  # v2: MLP


def test_loss_equals_float64_infonce_with_the_queue_at_temperature_0_07() -> None:
    torch.manual_seed(0)
    method = MoCoV1(_convnet(), num_samples=256, batch_size=8).eval()  # eval: BN on running stats, so
    batch = _batch()  # the shuffle's sub-batches and permutation leave q and k unchanged
    with torch.no_grad():  # a queue of other images' keys: negatives as close as the positive
        others = torch.randn(method.queue.size, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        method.queue.enqueue(method._key(others))
    out = method.training_step(batch, _info())
    assert float(out["loss"].detach()) > 1.0
    with torch.no_grad():
        q = F.normalize(method.projector(method.backbone(batch.views[0])), dim=1).double()
        k = F.normalize(method.teacher_projector(method.teacher_backbone(batch.views[1])), dim=1).double()
    queue = method.queue.queue.double()
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[i]) / 0.07] + [float(q[i] @ n) / 0.07 for n in queue]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert float(out["loss"].detach()) == pytest.approx(total / q.shape[0], rel=1e-5)
    torch.testing.assert_close(out["keys"].double(), k, rtol=1e-5, atol=1e-6)


def test_queue_must_hold_whole_global_batches(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"method.queue_size=100 must be a positive multiple of the global batch 8"
    ) as err:
        MoCoV1(_convnet(), num_samples=256, batch_size=8, queue_size=100)
    assert "\n" not in str(err.value) and "method.queue_size=96 or 104" in str(err.value)
    assert MoCoV1(_convnet(), num_samples=256, batch_size=8, queue_size=96).queue.size == 96
    # Unset: the data-sized default, rounded down to whole batches.
    assert moco_queue_size(None, 1437, 64) == 320 and moco_queue_size(None, 10**7, 256) == 65536
    assert moco_queue_size(None, 100, 512) == 512  # at least one batch
    # Through a config: a one-line ConfigError naming the option.
    cfg = tiny_config(tmp_path, "moco_v1", "method.queue_size=1000")
    with pytest.raises(ConfigError, match=r"method.queue_size=1000 .* global batch 64") as config_err:
        build_components(cfg, torch.device("cpu"))
    assert "\n" not in str(config_err.value)


def test_mochi_sizes_scale_with_the_queue_and_are_checked() -> None:
    assert mochi_sizes(65536, None, None, None) == (s := mochi_sizes(65536, 1024, 1024, 256))
    assert (s.hardest, s.mixed, s.query_mixed) == (1024, 1024, 256)
    small = mochi_sizes(8192, None, None, None)
    assert (small.hardest, small.mixed, small.query_mixed) == (128, 128, 32)
    tiny = mochi_sizes(64, None, None, None)
    assert (tiny.hardest, tiny.mixed, tiny.query_mixed) == (2, 1, 1)
    with pytest.raises(ValueError, match=r"method.mochi_hardest=300 must be in \[1, 256\]"):
        mochi_sizes(256, 300, None, None)
    with pytest.raises(ValueError, match="method.mochi_mixed=-1"):
        mochi_sizes(256, 8, -1, None)


@pytest.mark.parametrize("cls", [MoCoV1, MoCoV2])
def test_mochi_adds_synthetic_negatives_after_its_start_epoch(cls: type) -> None:
    torch.manual_seed(0)
    plain = cls(_convnet(), num_samples=256, batch_size=8, proj_dim=16).eval()
    torch.manual_seed(0)
    mixing = cls(_convnet(), num_samples=256, batch_size=8, proj_dim=16, mochi=True, mochi_start_epoch=1.0).eval()
    assert mixing.mochi is not None and mixing.mochi.hardest == 4  # 1024 * 256 / 65536
    batch = _batch()
    before = mixing.training_step(batch, _info(epoch=0.5))["loss"]
    assert not mixing.mixing_at(_info(epoch=0.5)) and mixing.mixing_at(_info(epoch=1.0))
    assert torch.equal(before, plain.training_step(batch, _info(epoch=0.5))["loss"])  # warm-up: plain MoCo
    queue = mixing.queue.queue.clone()
    after = mixing.training_step(batch, _info(epoch=1.0))
    # Hard negatives only add to the denominator; forward and backward leave the queue alone.
    assert float(after["loss"].detach()) > float(before.detach())
    after["loss"].backward()
    assert torch.equal(mixing.queue.queue, queue)
    for name, p in mixing.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    mixing.on_step_end(_info(epoch=1.0), after)  # the keys go in after the step, oldest out
    assert torch.equal(mixing.queue.queue[:8], after["keys"]) and torch.equal(mixing.queue.queue[8:], queue[8:])


# ------------------------------------------------------------------------------ end to end
def _records(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines) if "loss" in r]


def _probe_loss(method: MoCo, run: PretrainRun, images: Tensor, negatives: Tensor) -> float:
    """The MoCo loss on fixed augmented views of ``images`` against the keys of other images
    (``negatives``, un-augmented) as the queue: the training loss on a fixed problem."""
    method.eval()
    torch.manual_seed(5)  # the same views for every call
    with torch.no_grad():
        x1, x2 = run.parts.train_views(images)
        queue = method._key(run.parts.eval_views(negatives)[0])
        return float(info_nce(method._query(x1), method._key(x2), queue, method.temperature))


@pytest.mark.parametrize("mochi", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "mochi"])
def test_tiny_training_on_digits_learns_without_collapse(tmp_path: Path, mochi: bool) -> None:
    cfg = tiny_config(
        tmp_path,
        "moco_v1",
        "train.epochs=4",
        "backbone.width=16",
        "views.crop_scale=[0.5, 1.0]",
        "views.blur_p=0.0",
        "method.proj_dim=64",
        f"method.mochi={str(mochi).lower()}",
        "optim.name=adamw",
        "optim.lr=0.002",
        "optim.lr_scaling=none",
        "optim.warmup_epochs=0",
        "train.ema_momentum=[0.99, 0.99]",
    )
    run = PretrainRun(cfg)
    assert isinstance(run.method, MoCoV1) and (run.method.mochi is not None) == mochi
    images = run.parts.splits.train.images
    probe = (images[320:576], images[:320])  # 256 queries, 320 other images as negatives
    before = _probe_loss(copy.deepcopy(run.method), run, *probe)
    run.fit()
    losses = [r["loss"] for r in _records(run.run_dir)]
    assert len(losses) == run.total_steps and all(math.isfinite(x) for x in losses)
    # Learning: the loss of a fixed problem falls clearly (chance is log(321) = 5.77).
    after = _probe_loss(run.method, run, *probe)
    assert after < before - 0.15, (before, after)

    splits, views = run.parts.splits, run.parts.eval_views
    torch.manual_seed(123)
    random_init = BACKBONES.build("convnet", in_channels=splits.in_channels, image_size=splits.image_size, width=16)

    def knn(encoder: nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, encoder, splits.train, splits.test, splits.num_classes, views, cfg.eval, run.device, linear=False
        )

    trained, baseline = knn(run.method.backbone), knn(random_init)
    # No collapse: the features spread over more directions than a random encoder's ...
    assert trained["effective_rank"] > 2 * baseline["effective_rank"], (trained, baseline)
    assert trained["feature_std"] > baseline["feature_std"], (trained, baseline)
    # ... and their neighbours share labels more often (k = 200 of 1437 images, 10 classes).
    assert trained["knn_top1@200"] > baseline["knn_top1@200"] + 0.03, (trained, baseline)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_shuffle_bn_in_one_call_equals_one_call_per_group_in_float64(groups: int) -> None:
    # Keys: BN statistics per sub-batch of a random permutation; queries: per sub-batch in
    # order. The single call with grouped BN gives the per-sub-batch calls' embeddings,
    # gradients and running statistics.
    torch.manual_seed(0)
    method = MoCoV2(_convnet(), num_samples=256, batch_size=8, proj_hidden_dim=16, shuffle_bn_groups=groups).double()
    reference = copy.deepcopy(method)
    x = _batch(8).views[0].double()

    def per_group(backbone: nn.Module, projector: nn.Module, images: Tensor, order: Tensor | None) -> Tensor:
        order = torch.arange(images.shape[0]) if order is None else order
        out = torch.cat([projector(backbone(chunk)) for chunk in images[order].chunk(groups)])
        return F.normalize(out[torch.argsort(order)], dim=1)

    torch.manual_seed(1)
    keys = method._key(x)
    torch.manual_seed(1)
    order = torch.randperm(8)
    with torch.no_grad():
        keys_expected = per_group(reference.teacher_backbone, reference.teacher_projector, x, order)
    torch.testing.assert_close(keys, keys_expected.float())  # keys are float32 for the queue
    queries = method._query(x)
    expected = per_group(reference.backbone, reference.projector, x, None)
    torch.testing.assert_close(queries, expected, rtol=1e-10, atol=1e-10)
    (queries * keys.double()).sum().backward()
    (expected * keys.double()).sum().backward()
    for p, q in zip(method.parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
    for a, b in zip(method.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
