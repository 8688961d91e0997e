"""Tests for Colorful Image Colorization: the class-rebalanced loss against the paper's formula,
the lightness-only encoder, the running colour histogram, and a tiny run on colour scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.cli import main
from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError
from selfsup.losses import rebalanced_soft_cross_entropy
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.colorization import Colorization
from selfsup.registry import BACKBONES
from selfsup.transforms import ab_gamut_bins, lab_to_rgb, rgb_to_lab
from selfsup.transforms.color import smoothed_prior, soft_encode_ab_sparse
from tests.conftest import tiny_config

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _method(in_channels: int = 3, **kwargs: float) -> Colorization:
    backbone = BACKBONES.build("convnet", in_channels=in_channels, image_size=16, width=8)
    return Colorization(backbone, in_channels=in_channels, mean=MEAN, std=STD, hidden_dim=16, **kwargs)


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _smooth_rgb(n: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


def test_loss_equals_float64_class_rebalanced_soft_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    bins = ab_gamut_bins()
    q = bins.shape[0]
    ab = rgb_to_lab(torch.rand(2, 3, 3, 4, generator=g))[:, 1:]
    logits = torch.randn(2, q, 3, 4, generator=g) * 2
    weights = torch.rand(q, generator=g) + 0.5
    index, weight = soft_encode_ab_sparse(ab, bins)
    loss = rebalanced_soft_cross_entropy(logits, index, weight, weights)

    # Eq. 2 of the paper, written out in float64: Z = Gaussian (sigma 5) on the 5 nearest bins,
    # v(Z) = w[argmax Z], L = -sum_{h,w} v(Z_hw) sum_q Z_hwq log Zhat_hwq (here: mean over h, w).
    total, count = torch.tensor(0.0, dtype=torch.float64), 0
    centres = bins.double()
    for b in range(2):
        for i in range(3):
            for j in range(4):
                d = (centres - ab[b, :, i, j].double()).norm(dim=1)
                near = d.argsort()[:5]
                z = torch.zeros(q, dtype=torch.float64)
                z[near] = torch.exp(-(d[near] ** 2) / (2 * 25.0))
                z /= z.sum()
                s = logits[b, :, i, j].double()
                log_zhat = s - torch.log(torch.exp(s - s.max()).sum()) - s.max()
                total += -weights.double()[z.argmax()] * (z * log_zhat).sum()
                count += 1
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=1e-6)


def test_grayscale_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colour data") as err:
        _method(in_channels=1)
    assert "\n" not in str(err.value) and "scenes" in str(err.value)
    with pytest.raises(ConfigError, match="data.name=scenes"):
        PretrainRun(tiny_config(tmp_path, "colorization"))  # digits: 1 channel


def test_histogram_moves_only_in_on_step_end_and_weights_follow_it() -> None:
    method = _method()
    batch = Batch(views=[_normalise(_smooth_rgb(4))], index=torch.arange(4))
    info = StepInfo(step=0, total_steps=1, epoch=0.0)
    torch.testing.assert_close(method.class_weights(), torch.ones(ab_gamut_bins().shape[0]))
    out = method.training_step(batch, info)
    assert method.ab_counts.sum() == 0, "forward must not touch the histogram"
    method.on_step_end(info, {"ab_counts": out["ab_counts"]})
    assert method.ab_counts.sum() == 4 * 4 * 4  # B x (16 / out_stride)^2 target positions
    p = smoothed_prior(method.ab_counts, method.bins).double()
    w = method.class_weights().double()
    torch.testing.assert_close((p * w).sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    assert w.max() > 1.0 > w.min()


def test_encoder_sees_only_lightness_and_colorize_gives_images() -> None:
    method = _method().eval()
    rgb = _smooth_rgb(3, seed=1)
    lab = rgb_to_lab(rgb)
    gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
    torch.testing.assert_close(method.embed(_normalise(rgb)), method.embed(_normalise(gray)), atol=1e-3, rtol=1e-3)
    shown = method.colorize(_normalise(rgb))
    for image in shown:
        assert image.shape == rgb.shape and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(shown[2], rgb, atol=1e-5, rtol=0)


def test_tiny_run_on_colour_scenes_lowers_the_loss(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "colorization",
        "data.name=scenes",
        "data.limit=256",
        "method.hidden_dim=32",
        "views.crop_scale=[0.5, 1.0]",
        "optim.name=adamw",
        "optim.lr=0.003",
        "optim.lr_scaling=none",
        "train.epochs=4",
    )
    run = PretrainRun(cfg)
    run.fit()
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"loss"' in line]
    losses = [r["loss"] for r in records]
    accuracy = [r["bin_acc"] for r in records]
    # The rebalancing weights start uniform and then up-weight rare colours, which raises the
    # loss of a fixed prediction; it must fall anyway, and the hard-bin accuracy must rise.
    assert len(losses) >= 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert sum(accuracy[-3:]) > 3 * sum(accuracy[:3]) + 0.03, accuracy
    assert float(run.method.ab_counts.sum()) > 0

    # `selfsup visualize colorization RUN`: grayscale | predicted | truth for test images.
    assert main(["visualize", "colorization", str(run.run_dir), "--images", "0", "1"]) == 0
    assert (run.run_dir / "colorization.png").stat().st_size > 0


def test_lightness_encoder_spatial_features_are_those_of_the_lightness() -> None:
    """Dense probes read ``feature_map`` of the module that computes ``embed``: for colorization
    that is the backbone's map of the lightness input, pooled it gives ``embed``."""
    from selfsup.nn.backbones.protocol import feature_map
    from selfsup.registry import BACKBONES, METHODS

    backbone = BACKBONES.build("convnet", in_channels=3, image_size=16, width=8)
    method = METHODS.build("colorization", backbone=backbone, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3).eval()
    encoder, _ = method.embedder()
    images = torch.randn(3, 3, 16, 16)
    fmap = feature_map(encoder, images)
    torch.testing.assert_close(fmap.mean(dim=(-2, -1)), method.embed(images))
