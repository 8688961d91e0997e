"""Rotation, jigsaw and relative location: each loss is the cross-entropy of its logits against
the generated labels (float64, written out), and a tiny run on digits learns its pretext task
without collapsing the encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.methods.jigsaw import Jigsaw
from selfsup.methods.relative_location import RelativeLocation
from selfsup.methods.rotation import Rotation
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config


def _convnet(channels: int = 1) -> nn.Module:
    return BACKBONES.build("convnet", in_channels=channels, image_size=30, width=8)


def _methods(channels: int = 1) -> dict[str, Method]:
    return {
        "rotation": Rotation(_convnet(channels), hidden_dim=16),
        "jigsaw": Jigsaw(_convnet(channels), image_size=30, num_permutations=12, fc6_dim=8, fc7_dim=16),
        "relative_location": RelativeLocation(_convnet(channels), image_size=30, fc6_dim=8, fc7_dim=16),
    }


def ref_cross_entropy(logits: Tensor, labels: Tensor) -> float:
    """Mean over samples of ``log sum_k exp(l_k) - l_y``, one sample at a time in float64."""
    total = 0.0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / len(labels)


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "relative_location"])
@pytest.mark.parametrize("channels", [1, 3])
def test_loss_is_cross_entropy_of_the_logits_against_the_generated_labels(name: str, channels: int) -> None:
    method = _methods(channels)[name]
    images = torch.randn(6, channels, 30, 30)
    batch = Batch(views=[images], index=torch.arange(6))
    step = StepInfo(step=0, total_steps=1, epoch=0.0)
    torch.manual_seed(5)
    out = method.training_step(batch, step)
    torch.manual_seed(5)  # the same targets again (global CPU generator)
    logits, labels, _ = method.logits_and_labels(images)
    expected_rows = {"rotation": 24, "jigsaw": 6, "relative_location": 6}[name]
    assert logits.shape[0] == labels.shape[0] == expected_rows
    assert float(out["loss"].detach()) == pytest.approx(ref_cross_entropy(logits, labels), rel=1e-5)
    correct = sum(int(row.argmax()) == y for row, y in zip(logits, labels.tolist()))
    assert float(out["pretext_acc"]) == pytest.approx(correct / len(labels))


def test_rotation_labels_follow_the_four_copies() -> None:
    method = _methods()["rotation"]
    _, labels, h = method.logits_and_labels(torch.randn(5, 1, 30, 30))
    assert labels.tolist() == [r for r in range(4) for _ in range(5)] and h.shape == (20, 64)


def test_jigsaw_permutation_set_is_a_buffer_and_tiles_share_one_encoder_call() -> None:
    method = _methods()["jigsaw"]
    assert "permutations" in dict(method.named_buffers()) and method.permutations.shape == (12, 9)
    assert method.tile_size == 10 * 64 // 75 and method.min_hamming_distance >= 6
    calls: list[tuple[int, ...]] = []
    method.backbone.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    method.logits_and_labels(torch.randn(4, 1, 30, 30))
    assert calls == [(36, 1, 8, 8)]


def test_relative_location_encodes_both_patches_in_one_call_and_drops_colour() -> None:
    method = _methods(3)["relative_location"]
    assert (method.patch_size, method.jitter) == (10 * 96 // 144, round(10 * 7 / 144))
    seen: list[Tensor] = []
    method.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    method.logits_and_labels(torch.randn(4, 3, 30, 30))
    (patches,) = seen
    assert patches.shape == (8, 3, 6, 6)
    # Colour dropping: per patch, two channels are faint noise (std ~1/100 of the kept one's).
    stds = patches.flatten(2).std(dim=2).sort(dim=1).values  # (8, 3) ascending
    assert torch.all(stds[:, 1] < 0.05 * stds[:, 2])


# ------------------------------------------------------------------------------ end to end
def _logged(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row and "step" in row]


HEADS = ["method.fc6_dim=32", "method.fc7_dim=64"]
ADAMW = ["optim.name=adamw", "optim.lr=0.003", "optim.lr_scaling=none", "optim.warmup_epochs=0"]
# Digits are 8 px: jigsaw and relative location resize them to 24 px (8 px cells).
TINY_RUNS = {
    # name: (overrides, chance, pretext accuracy the last steps must reach)
    "rotation": (["train.epochs=2"], 1 / 4, 0.4),
    "jigsaw": (["train.epochs=3", "data.image_size=24", "method.num_permutations=10", *HEADS], 1 / 10, 0.5),
    "relative_location": (["train.epochs=4", "data.image_size=24", *HEADS], 1 / 8, 0.25),
}


@pytest.mark.parametrize("name", list(TINY_RUNS))
def test_tiny_run_learns_the_pretext_task_without_collapse(tmp_path: Path, name: str) -> None:
    overrides, chance, target = TINY_RUNS[name]
    cfg = tiny_config(tmp_path, name, *overrides, *ADAMW, "views.crop_scale=[0.6, 1.0]")
    run = PretrainRun(cfg)
    run.fit()
    losses, accuracy = _logged(run.run_dir, "loss"), _logged(run.run_dir, "pretext_acc")
    # The first step is at initialisation: chance level; the last steps well above it.
    assert accuracy[0] < chance + 0.15 and sum(accuracy[-5:]) / 5 > target, accuracy
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3, losses

    splits, views = run.parts.splits, run.parts.eval_views
    metrics = evaluate_encoder(
        run.method.backbone,
        run.method,
        splits.train,
        splits.test,
        splits.num_classes,
        views,
        cfg.eval,
        run.device,
        linear=False,
    )
    assert metrics["feature_std"] > 0.02 and metrics["effective_rank"] > 2, metrics
    top1 = next(k for k in metrics if k.startswith("knn_top1"))
    assert metrics[top1] > 0.5, metrics  # chance is 0.1


def test_jigsaw_tile_features_are_the_encoder_on_each_centred_tile() -> None:
    """``eval_features="tiles"``: the encoder on the 3x3 centred tiles in raster order,
    concatenated, deterministic, and the random-init baseline rebuilds the same tiling."""
    from selfsup.methods.jigsaw import Jigsaw
    from selfsup.nn.tiles import TileEncoder, normalize_tiles

    backbone = BACKBONES.build("convnet", in_channels=1, image_size=10, width=4)
    method = Jigsaw(backbone, image_size=30, num_permutations=4, fc6_dim=8, fc7_dim=8, eval_features="tiles").eval()
    assert method.tile_size == 8
    images = torch.randn(2, 1, 31, 32)  # 10 px cells of the centred 30 px square: top 0, left 1
    tiles = TileEncoder(backbone, 8).tiles(images)
    for cell in range(9):
        r, c = divmod(cell, 3)
        torch.testing.assert_close(
            tiles[:, cell], images[:, :, 10 * r + 1 : 10 * r + 9, 1 + 10 * c + 1 : 1 + 10 * c + 9]
        )
    expected = torch.cat([backbone(normalize_tiles(tiles[:, i])) for i in range(9)], dim=1)
    torch.testing.assert_close(method.embed(images), expected, rtol=1e-4, atol=1e-5)
    assert method.embed(images).shape == (2, method.num_features) == (2, 9 * backbone.num_features)
    encoder, spec = method.embedder()
    assert spec is not None
    rebuilt = Jigsaw.build_embedder(spec, lambda: BACKBONES.build("convnet", in_channels=1, image_size=10, width=4))
    rebuilt.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(rebuilt.eval()(images), method.embed(images))


def test_relative_location_patch_features_are_the_encoder_on_each_centred_patch() -> None:
    from selfsup.methods.relative_location import RelativeLocation
    from selfsup.nn.tiles import TileEncoder

    backbone = BACKBONES.build("convnet", in_channels=1, image_size=8, width=4)
    method = RelativeLocation(backbone, image_size=36, fc6_dim=8, fc7_dim=8, eval_features="patches").eval()
    images = torch.randn(2, 1, 36, 36)
    patches = TileEncoder(backbone, method.patch_size, normalize=False).tiles(images)
    expected = torch.cat([backbone(patches[:, i]) for i in range(9)], dim=1)  # not normalised
    torch.testing.assert_close(method.embed(images), expected, rtol=1e-4, atol=1e-5)
    assert method.num_features == 9 * backbone.num_features
    with pytest.raises(ConfigError, match="eval_features"):
        RelativeLocation(backbone, image_size=36, eval_features="tiles")
