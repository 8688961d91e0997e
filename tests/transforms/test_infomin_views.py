"""InfoMin's view recipe: builds for 1 and 3 channels with the documented ops in the authors'
order, shapes, seeded determinism, selection by ``views.name: infomin``; the batched
RandAugment ops against PIL's (the authors' code runs them on PIL images) or their formulas,
and its per-sample drawing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from selfsup.config import load_config
from selfsup.engine.build import validate_components, view_recipe_name
from selfsup.transforms import build_view_recipe
from selfsup.transforms.ops import (
    Normalize,
    RandomColorJitter,
    RandomGaussianBlur,
    RandomGrayscale,
    RandomResizedCropFlip,
)
from selfsup.transforms.randaugment import _OPS, RAND_AUGMENT_OPS, RandAugment

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "infomin" / "fashion_mnist.yaml"


def recipe(channels: int, size: int = 24, **options: object) -> torch.nn.Module:
    mean, std = (0.4,) * channels, (0.25,) * channels
    return build_view_recipe("infomin", image_size=size, in_channels=channels, mean=mean, std=std, **options)


@pytest.mark.parametrize("channels", [1, 3])
def test_recipe_builds_two_views_of_the_right_shape_with_the_documented_ops(channels: int) -> None:
    r = recipe(channels)
    views = r(torch.rand(5, channels, 30, 30))
    assert len(views) == 2 and r.num_global_views == 2
    assert all(v.shape == (5, channels, 24, 24) and v.dtype == torch.float32 for v in views)
    ops = list(r.groups[0].pipeline)
    expected = [RandomResizedCropFlip, RandomColorJitter, RandomGaussianBlur, RandAugment]
    expected += [RandomGrayscale, Normalize] if channels == 3 else [Normalize]
    assert [type(op) for op in ops] == expected
    crop, jitter, blur, rand_augment = ops[:4]
    assert crop.scale == (0.2, 1.0) and crop.flip_p == 0.5
    rgb_only = (0.8, 0.2) if channels == 3 else (0.0, 0.0)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.8, 0.8, *rgb_only)
    assert jitter.p == 0.8 and blur.p == 0.5 and blur.sigma == (0.1, 2.0)
    assert rand_augment.num_layers == 2 and rand_augment.magnitude == 10.0 and rand_augment.magnitude_std == 0.5
    assert rand_augment.p == 0.5 and rand_augment.ops == RAND_AUGMENT_OPS and len(set(RAND_AUGMENT_OPS)) == 15
    assert torch.allclose(rand_augment.fill, torch.tensor([0.4] * channels))  # the dataset mean
    if channels == 3:
        assert ops[4].p == 0.2


def test_recipe_is_deterministic_under_a_seed_and_random_across_seeds() -> None:
    r, x = recipe(3), torch.rand(8, 3, 24, 24)
    torch.manual_seed(7)
    a = r(x)
    torch.manual_seed(7)
    b = r(x)
    torch.manual_seed(8)
    c = r(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])


def test_rand_augment_can_be_switched_off_and_bad_options_are_errors() -> None:
    assert RandAugment not in [type(op) for op in recipe(1, rand_augment_layers=0).groups[0].pipeline]
    with pytest.raises(ValueError, match="rand_augment_ops"):
        recipe(1, rand_augment_ops=["cutout"])
    with pytest.raises(ValueError, match="rand_augment_magnitude"):
        recipe(1, rand_augment_magnitude=11.0)


def test_the_config_selects_the_recipe_by_views_name() -> None:
    cfg = load_config(CONFIG, [])
    assert cfg.method["name"] == "moco_v2" and view_recipe_name(cfg) == "infomin"
    validate_components(cfg)


# ------------------------------------------------------------------------ the ops
def _pil_images(channels: int, seed: int = 0) -> tuple[torch.Tensor, list[Image.Image]]:
    """Three uint8-valued images as a float batch in [0, 1] and as PIL images."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(lo, hi, size=(12, 12, channels), dtype=np.uint8) for lo, hi in ((0, 256), (40, 90), (0, 30))]
    mode = "RGB" if channels == 3 else "L"
    pil = [Image.fromarray(a if channels == 3 else a[..., 0], mode) for a in arrays]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return x, pil


def _from_pil(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im, dtype=np.uint8) for im in images]
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


M = torch.full((3,), 10.0)  # the level InfoMin uses
FACTOR = 1.9  # 1.8 * 10 / 10 + 0.1
PIL_OPS = {
    "auto_contrast": ImageOps.autocontrast,
    "equalize": ImageOps.equalize,
    "invert": ImageOps.invert,
    "posterize": lambda im: ImageOps.posterize(im, 4),
    "solarize": lambda im: ImageOps.solarize(im, 256),
    "solarize_add": lambda im: im.point([min(255, i + 110) if i < 128 else i for i in range(256)] * len(im.getbands())),
    "color": lambda im: ImageEnhance.Color(im).enhance(FACTOR),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(FACTOR),
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(FACTOR),
    "sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(FACTOR),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_pixel_ops_match_pil_at_magnitude_ten(name: str, channels: int) -> None:
    x, pil = _pil_images(channels)
    got = _OPS[name](x.clone(), M, torch.ones(3), torch.full((channels,), 0.5))
    want = _from_pil([PIL_OPS[name](im) for im in pil])
    # PIL rounds to 8 bits (and Contrast rounds its mean); the batched ops stay in float.
    tolerance = 2.5 / 255 if name in ("contrast", "color", "sharpness") else 1.01 / 255
    assert (got - want).abs().max() <= tolerance, (name, (got - want).abs().max() * 255)


def test_translate_shifts_by_45_percent_and_fills_with_the_mean() -> None:
    x = torch.rand(2, 1, 20, 20)
    fill = torch.tensor([0.3])
    out = _OPS["translate_x"](x, torch.full((2,), 10.0), torch.tensor([1.0, -1.0]), fill)
    # 0.45 * 20 = 9 px: output column j reads input column j + 9 (sign +) or j - 9 (sign -).
    torch.testing.assert_close(out[0, ..., :11], x[0, ..., 9:])
    torch.testing.assert_close(out[1, ..., 9:], x[1, ..., :11])
    torch.testing.assert_close(out[0, ..., 11:], torch.full((1, 20, 9), 0.3))
    ys = _OPS["translate_y"](x, torch.full((2,), 10.0), torch.tensor([1.0, 1.0]), fill)
    torch.testing.assert_close(ys[0, :, :11], x[0, :, 9:])


def test_geometric_ops_keep_a_constant_image_constant() -> None:
    x = torch.full((4, 3, 16, 16), 0.3)
    fill = torch.full((3,), 0.3)
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        out = _OPS[name](x.clone(), torch.rand(4) * 10, torch.tensor([1.0, -1.0, 1.0, -1.0]), fill)
        torch.testing.assert_close(out, x, msg=name)


def test_each_sample_draws_its_own_ops_and_gates() -> None:
    x = torch.rand(400, 1, 8, 8)
    always = RandAugment(num_layers=1, p=1.0, ops=("invert",))
    torch.testing.assert_close(always(x), 1.0 - x)
    torch.manual_seed(0)
    out = RandAugment(num_layers=1, p=0.5, ops=("invert",))(x)
    inverted = torch.isclose(out, 1.0 - x).flatten(1).all(dim=1)
    kept = torch.equal(out[~inverted], x[~inverted])
    assert kept and 150 < int(inverted.sum()) < 250  # about half, sample by sample
    torch.manual_seed(1)
    two = RandAugment(num_layers=2, p=1.0, magnitude_std=0.0, ops=("invert", "brightness"))(x)
    # Invert twice, brighten twice, or one of each: every sample is one of the four outcomes.
    bright = (1.9 * x).clamp(0, 1)
    outcomes = torch.stack([x, (1.9 * bright).clamp(0, 1), 1.0 - bright, (1.9 * (1.0 - x)).clamp(0, 1)])
    match = torch.isclose(two[None], outcomes, atol=1e-6).flatten(2).all(dim=2)
    assert bool(match.any(dim=0).all()) and int(match.any(dim=1).sum()) == 4
    assert torch.equal(x, x.clone()) and RandAugment(num_layers=0)(x) is x
