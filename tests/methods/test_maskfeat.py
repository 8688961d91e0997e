"""MaskFeat: HOG targets per patch against a float64 loop, the masked MSE of the linear head,
blockwise masks, and a tiny run through the engine that learns without collapsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.maskfeat import MaskFeat, hog_patch_targets
from selfsup.monitors import feature_std
from selfsup.registry import BACKBONES
from tests.methods.test_masked_methods import vit_config

INFO = StepInfo(step=0, total_steps=10, epoch=0.0, lr=0.1)
# A 16 px ViT with 4 px patches: a 4x4 grid of L = 16 patches.
VIT = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def digits(n: int) -> Tensor:
    """The first ``n`` scikit-learn digits `(n, 1, 8, 8)`, standardised like the runs' views."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float().unsqueeze(1) / 16
    return (x - x.mean()) / x.std()


def vit(**kw: int) -> torch.nn.Module:
    return BACKBONES.build("vit_tiny", **{**VIT, **kw})


def ref_hog_patches(images: Tensor, patch: int, cell: int, bins: int = 9) -> Tensor:
    """Per channel: central differences on the whole image (zero on its border rows / columns),
    unsigned angle in degrees, each pixel's magnitude into bin floor(angle / (180 / bins)), the
    mean over each cell's pixels, then each patch's cells' histograms L2-normalised together
    (v / sqrt(|v|^2 + 1e-10)); written out with Python loops in float64."""
    b, c, h, w = images.shape
    x = images.double()
    per = patch // cell
    out = torch.zeros(b, (h // patch) * (w // patch), c * per * per * bins, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            hist = torch.zeros(h // cell, w // cell, bins, dtype=torch.float64)
            for r in range(h):
                for col in range(w):
                    gr = float(x[n, ch, r + 1, col] - x[n, ch, r - 1, col]) if 0 < r < h - 1 else 0.0
                    gc = float(x[n, ch, r, col + 1] - x[n, ch, r, col - 1]) if 0 < col < w - 1 else 0.0
                    angle = math.degrees(math.atan2(gr, gc)) % 180.0
                    k = min(int(angle // (180.0 / bins)), bins - 1)
                    hist[r // cell, col // cell, k] += math.hypot(gr, gc) / cell**2
            for pr in range(h // patch):
                for pc in range(w // patch):
                    v = hist[pr * per : (pr + 1) * per, pc * per : (pc + 1) * per].reshape(-1)
                    v = v / math.sqrt(float((v * v).sum()) + 1e-10)
                    size = per * per * bins
                    out[n, pr * (w // patch) + pc, ch * size : (ch + 1) * size] = v
    return out


@pytest.mark.parametrize(("patch", "cell"), [(4, 2), (4, 4)])
def test_hog_targets_match_a_float64_loop(patch: int, cell: int) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 8, 12, generator=g)  # 2 channels, a 2x3 patch grid
    got = hog_patch_targets(images, patch, cell)
    per = patch // cell
    assert got.shape == (2, 6, 2 * per * per * 9)
    torch.testing.assert_close(got.double(), ref_hog_patches(images, patch, cell), rtol=1e-5, atol=1e-6)
    # Every textured patch's histograms have unit L2 norm per channel; a flat image gives zeros.
    norms = got.reshape(2, 6, 2, -1).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-4, atol=1e-4)
    assert torch.all(hog_patch_targets(torch.full((1, 1, 8, 8), 0.3), patch, cell) == 0)
    # HOG ignores the views' per-channel normalisation (gradients only, then L2 per patch).
    torch.testing.assert_close(hog_patch_targets((images - 0.5) / 0.25, patch, cell), got, rtol=1e-4, atol=1e-5)


def test_loss_is_the_masked_mse_of_the_linear_head_on_hog() -> None:
    method = MaskFeat(vit(), in_channels=1)
    assert method.hog_cell_size == 2 and method.head.out_features == 4 * 9  # 2x2 cells of 9 bins
    assert method.backbone.mask_token is not None
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(2)
    loss = method.training_step(Batch(views=[x], index=torch.arange(4)), INFO)["loss"]
    loss.backward()
    assert method.backbone.mask_token.grad is not None and method.backbone.mask_token.grad.abs().sum() > 0
    torch.manual_seed(2)
    mask = method.sample_mask(4, x.device)
    pred = method.predict(x, mask).detach().double()
    target = ref_hog_patches(x, 4, 2)
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_blockwise_masks_and_bad_options() -> None:
    method = MaskFeat(vit(patch_size=2), in_channels=1)  # 8x8 grid, target round(0.4 * 64) = 26
    torch.manual_seed(0)
    mask = method.sample_mask(64, torch.device("cpu"))
    counts = mask.sum(1)
    assert mask.dtype == torch.bool and torch.all(counts <= 26) and torch.all(counts >= 26 - 4)
    assert abs(float(counts.float().mean()) / 64 - 0.4) < 0.03
    with pytest.raises(ValueError, match="hog_cell_size"):
        MaskFeat(vit(), in_channels=1, hog_cell_size=3)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskFeat(vit(), in_channels=1, mask_ratio=1.0)


def test_maskfeat_learns_through_the_engine_without_collapse(tmp_path: Path) -> None:
    """40 steps on digits (8 px, 2 px patches, one 9-bin HOG cell per patch): the loss falls and
    the encoder's tokens stay as spread over the batch as at initialisation."""
    cfg = vit_config(
        tmp_path,
        "maskfeat",
        "method.hog_cell_size=2",
        "train.epochs=10",
        "train.max_steps=40",
        "optim.lr=0.003",
        "optim.lr_scaling=none",
        "backbone.embed_dim=32",
    )
    trainer = PretrainRun(cfg)
    x = digits(256)
    with torch.no_grad():
        before = feature_std(trainer.method.backbone.forward_tokens(x)[:, 1:].flatten(0, 1))
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:5]) / 5, losses
    with torch.no_grad():
        after = feature_std(trainer.method.eval().backbone.forward_tokens(x)[:, 1:].flatten(0, 1))
    assert after > 0.5 * before, (before, after)
