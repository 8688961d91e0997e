"""Dense linear probe: mIoU against a plain float64 loop, the probe on features that do / do
not determine the masks, and ``selfsup eval dense`` on a tiny scenes run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfsup.cli import main
from selfsup.data import build_data
from selfsup.engine.dense import check_masks
from selfsup.engine.run import pretrain
from selfsup.errors import ConfigError
from selfsup.eval.dense import confusion_matrix, dense_linear_probe, mean_iou, segmentation_scores
from tests.conftest import tiny_config


def _reference_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int) -> tuple[float, float]:
    """mIoU over classes with a non-empty union, and pixel accuracy, one class at a time."""
    p = pred.reshape(-1).tolist()
    t = target.reshape(-1).tolist()
    ious = []
    for k in range(num_classes):
        tp = fp = fn = 0.0
        for pi, ti in zip(p, t):
            if ti == ignore:
                continue
            tp += float(pi == k and ti == k)
            fp += float(pi == k and ti != k)
            fn += float(pi != k and ti == k)
        if tp + fp + fn > 0:
            ious.append(tp / (tp + fp + fn))
    valid = [(pi, ti) for pi, ti in zip(p, t) if ti != ignore]
    accuracy = sum(float(pi == ti) for pi, ti in valid) / len(valid)
    return sum(ious) / len(ious), accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_iou_matches_a_per_class_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = 6
    target = torch.randint(0, k - 1, (3, 9, 7), generator=g)  # class 5 never in the target
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.6, target, torch.randint(0, k, target.shape, generator=g)
    )
    pred[pred == 4] = 3  # class 4 never predicted
    target[torch.rand(target.shape, generator=g) < 0.1] = -1  # ignored pixels
    miou, acc = _reference_scores(pred.double(), target.double(), k, -1)
    assert mean_iou(pred, target, k, ignore_index=-1) == pytest.approx(miou, abs=1e-12)
    scores = segmentation_scores(confusion_matrix(pred, target, k, ignore_index=-1))
    assert scores["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert torch.equal(
        confusion_matrix(target.clamp_min(0), target.clamp_min(0), k).diagonal().sum(), torch.tensor(target.numel())
    )
    assert mean_iou(target, target, k, ignore_index=-1) == 1.0
    with pytest.raises(ValueError, match="target classes"):
        mean_iou(pred, target + 10, k, ignore_index=-1)


def _blocks(n: int, num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class maps on a 4x4 grid ``(n, 4, 4)`` and their 16x16 masks (4x4 pixel blocks)."""
    grid = torch.randint(0, num_classes, (n, 4, 4), generator=g)
    return grid, grid.repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_probe_learns_masks_its_features_determine_and_not_random_ones() -> None:
    g = torch.Generator().manual_seed(0)
    k, d = 4, 12
    codes = torch.randn(k, d, generator=g) * 2  # class -> feature vector
    grid, masks = _blocks(320, k, g)
    features = codes[grid].permute(0, 3, 1, 2) + 0.3 * torch.randn(320, d, 4, 4, generator=g)
    schedule = {"epochs": 20, "min_steps": 0, "batch_size": 64, "seed": 0}
    scores = dense_linear_probe(features[:256], masks[:256], features[256:], masks[256:], k, **schedule)
    assert float(scores["miou"]) > 0.75
    assert float(scores["pixel_accuracy"]) > 0.85
    noise = torch.randn(320, d, 4, 4, generator=g)
    chance = dense_linear_probe(noise[:256], masks[:256], noise[256:], masks[256:], k, **schedule)
    assert float(chance["miou"]) < 0.35
    # Logits upsampled from a coarser grid: a 2x2 feature map still predicts 16x16 masks.
    coarse = F.avg_pool2d(features, 2)
    coarse_scores = dense_linear_probe(
        coarse[:256], masks[:256], coarse[256:], masks[256:], k, **{**schedule, "epochs": 2}
    )
    assert math.isfinite(float(coarse_scores["miou"]))


def test_eval_dense_on_a_tiny_scenes_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path, "simclr", "data.name=scenes", "data.num_train=96", "data.num_test=48")
    pretrain(cfg)
    capsys.readouterr()
    args = [str(tmp_path / "tiny"), "eval.dense_epochs=1", "eval.dense_min_steps=60"]
    assert main(["eval", "dense", *args, "--baselines", "--json"]) == 0
    out = capsys.readouterr().out
    assert "dense_miou" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert set(rows) == {"simclr (convnet)", "random-init convnet", "raw pixels"}
    for metrics in rows.values():
        assert 0.0 < metrics["dense_miou"] <= 1.0 and 0.0 < metrics["dense_pixel_acc"] <= 1.0
    # Raw pixels separate the coloured objects from the dark background: far above chance.
    assert rows["raw pixels"]["dense_pixel_acc"] > 0.7


def test_dense_needs_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="dense needs a data set with masks"):
        check_masks(build_data("digits", limit=50))
    assert check_masks(build_data("scenes", num_train=8, num_test=8)) == 6
    pretrain(tiny_config(tmp_path, "simclr", "data.limit=64"))
    capsys.readouterr()
    assert main(["eval", "dense", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dense needs a data set with masks") and "\n" not in err
