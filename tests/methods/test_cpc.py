"""CPC v2: the patch grid against plain slicing, the context network's receptive field (rows
below never reach a prediction), the evaluated feature, per-patch augmentations, bad grids, and
a tiny real run whose loss falls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError
from selfsup.methods.cpc import CPCv2, augment_patches, patch_grid
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config


def _method(image_size: int = 16, **kwargs: object) -> CPCv2:
    backbone = BACKBONES.build("convnet", in_channels=1, width=8, norm="gn")
    return CPCv2(backbone, image_size=image_size, context_dim=16, **kwargs)  # type: ignore[arg-type]


def test_patch_grid_equals_slicing_each_patch() -> None:
    images = torch.randn(2, 3, 11, 14)
    grid = patch_grid(images, 5, 3)  # rows: (11 - 5) // 3 + 1 = 3, columns: (14 - 5) // 3 + 1 = 4
    assert grid.shape == (2, 3, 4, 3, 5, 5)
    for i in range(3):
        for j in range(4):
            assert torch.equal(grid[:, i, j], images[:, :, 3 * i : 3 * i + 5, 3 * j : 3 * j + 5])


def test_default_grid_keeps_the_papers_proportions() -> None:
    method = _method(32)  # 8 px patches every 4 px: 7 x 7, as 64 px patches every 32 px of 256 px
    assert (method.patch_size, method.patch_stride, method.grid_size) == (8, 4, 7)
    method = _method(28)
    assert (method.patch_size, method.patch_stride, method.grid_size) == (7, 3, 8)


def test_context_never_sees_the_rows_it_predicts() -> None:
    """Changing every latent below row i leaves every prediction made from rows <= i unchanged
    (and does change those made from the rows below: the test can see a leak)."""
    torch.manual_seed(0)
    method = _method(context_blocks=3)
    rows = method.grid_size
    z = torch.randn(2, rows, rows, method.num_features)
    base = method.predict(z)
    for i in range(rows - 1):
        perturbed = z.clone()
        perturbed[:, i + 1 :] = torch.randn_like(perturbed[:, i + 1 :]) * 10
        out = method.predict(perturbed)
        for k, (p, q) in enumerate(zip(base, out), start=1):
            torch.testing.assert_close(q[:, : i + 1], p[:, : i + 1], rtol=0, atol=0)
            if i + 1 < rows - k:
                assert not torch.allclose(q[:, i + 1], p[:, i + 1])


def test_embed_is_the_mean_of_the_grids_patch_latents() -> None:
    torch.manual_seed(0)
    method = _method().eval()
    images = torch.rand(3, 1, 16, 16)
    p, s = method.patch_size, method.patch_stride
    expected = torch.stack(
        [
            F.layer_norm(method.backbone(images[:, :, s * i : s * i + p, s * j : s * j + p]), (method.num_features,))
            for i in range(method.grid_size)
            for j in range(method.grid_size)
        ]
    ).mean(dim=0)
    torch.testing.assert_close(method.embed(images), expected, rtol=1e-5, atol=1e-6)
    embedder, spec = method.embedder()
    assert spec is not None
    rebuilt = CPCv2.build_embedder(spec, lambda: method.backbone)
    torch.testing.assert_close(rebuilt(images), expected, rtol=1e-5, atol=1e-6)


def test_patch_augmentations_are_per_patch_and_keep_shapes() -> None:
    torch.manual_seed(0)
    patches = torch.rand(64, 3, 8, 8)
    assert torch.equal(augment_patches(patches, crop=0, flip_p=0.0, color_drop=False), patches)
    flipped = augment_patches(patches, crop=0, flip_p=0.5, color_drop=False)
    is_flipped = (flipped == patches.flip(-1)).flatten(1).all(dim=1)
    unchanged = (flipped == patches).flatten(1).all(dim=1)
    assert (is_flipped | unchanged).all() and 10 < int(is_flipped.sum()) < 54
    cropped = augment_patches(patches, crop=2, flip_p=0.0, color_drop=False)
    assert cropped.shape == patches.shape and not torch.equal(cropped, patches)
    dropped = augment_patches(patches, crop=0, flip_p=0.0, color_drop=True)
    kept = [(d - p).abs().flatten(1).max(dim=1).values < 1e-7 for d, p in zip(dropped, patches)]
    assert all(int(k.sum()) == 1 for k in kept), "colour dropping keeps exactly one channel per patch"


def test_grids_that_do_not_fit_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="method.patch_size=20 .* does not fit 16 px"):
        _method(16, patch_size=20)
    with pytest.raises(ConfigError, match="2x2 grid on 16 px images, too few rows .* prediction_steps=3"):
        _method(16, patch_size=8, patch_stride=8)


def _logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_cpc_loss_falls_in_a_tiny_run(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "cpc",
        "data.image_size=16",  # 7 x 7 grid of 4 px patches every 2 px
        "train.epochs=2",
        "train.batch_size=32",
        "backbone.norm=none",
        "backbone.depth=2",
        "backbone.width=16",
        "method.context_dim=32",
        "views.crop_scale=[0.7, 1.0]",
        "optim.name=adamw",
        "optim.lr=0.002",
        "optim.lr_scaling=none",
        "optim.warmup_epochs=0.25",
    )
    run = PretrainRun(cfg)
    run.fit()
    losses = _logged_losses(run.run_dir)
    chance = math.log(32 * 49)  # every patch latent of the batch equally likely
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.9 * first and last < 0.93 * chance, (first, last, chance, losses)
