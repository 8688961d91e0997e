"""Tests for selfsup.transforms: view recipes (registry-driven), batched ops, mixup/CutMix."""

from __future__ import annotations

import inspect
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from selfsup.registry import VIEW_RECIPES, RegistryError
from selfsup.transforms import (
    Normalize,
    ViewRecipe,
    augmentation_pipeline,
    blur_kernel_size,
    build_view_recipe,
    cutmix,
    mixup,
    to_float,
)
from selfsup.transforms.ops import (
    RandomColorJitter,
    RandomGaussianBlur,
    RandomGrayscale,
    RandomResizedCropFlip,
    RandomSolarize,
    adjust_hue,
)

RECIPES = VIEW_RECIPES.names()
SIZE = 24  # >= 20 px, so the blur stage is exercised


def smooth_images(batch: int, channels: int, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    """Low-frequency images in [0, 1]: crops and blur keep their statistics, unlike pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    channels = images.shape[1]
    flat = images.transpose(0, 1).reshape(channels, -1)
    return flat.mean(1).tolist(), flat.std(1).tolist()


def build(name: str, channels: int, images: torch.Tensor | None = None, **kwargs: object) -> ViewRecipe:
    mean, std = stats(images) if images is not None else ([0.5] * channels, [0.25] * channels)
    return build_view_recipe(name, image_size=SIZE, in_channels=channels, mean=mean, std=std, **kwargs)


# ----------------------------------------------------------------------------- registry-driven


def test_the_expected_recipes_are_registered() -> None:
    assert {"two_views", "asymmetric", "multi_crop", "single_view", "eval"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_factory_signature_is_explicit(name: str) -> None:
    params = inspect.signature(VIEW_RECIPES.get(name)).parameters
    assert list(params)[:4] == ["image_size", "in_channels", "mean", "std"]
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[4:])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_contract(name: str, channels: int) -> None:
    images = smooth_images(8, channels)
    before = images.clone()
    recipe = build(name, channels, images)
    views = recipe(images)

    assert torch.equal(images, before), "a recipe must not modify its input"
    assert len(views) == recipe.num_views == len(recipe.view_sizes)
    assert 1 <= recipe.num_global_views <= recipe.num_views
    global_sizes = recipe.view_sizes[: recipe.num_global_views]
    local_sizes = recipe.view_sizes[recipe.num_global_views :]
    assert all(s == SIZE for s in global_sizes)
    assert all(s < SIZE for s in local_sizes)
    for view, size in zip(views, recipe.view_sizes):
        assert view.shape == (8, channels, size, size)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()
        assert not view.requires_grad
    # Normalised with the input's own statistics: roughly zero mean and unit spread per channel.
    # (Unnormalised images would have mean ~0.5 and std ~0.2 here.)
    means, stds = stats(torch.cat([v.flatten(2) for v in views], dim=2).unsqueeze(-1))
    assert all(abs(m) < 0.6 for m in means), means
    assert all(0.5 < s < 2.0 for s in stds), stds


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_reproducible_under_manual_seed(name: str, channels: int) -> None:
    images = smooth_images(6, channels)
    recipe = build(name, channels)
    torch.manual_seed(123)
    first = recipe(images)
    torch.manual_seed(123)
    second = recipe(images)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", [n for n in RECIPES if n != "eval"])
def test_identical_samples_get_different_augmentations(name: str, channels: int) -> None:
    images = smooth_images(1, channels).expand(8, -1, -1, -1).contiguous()
    recipe = build(name, channels)
    torch.manual_seed(0)
    first = recipe(images)
    torch.manual_seed(1)
    reseeded = recipe(images)
    for view, other in zip(first, reseeded):
        # Per-sample parameters: copies of one image in one batch come out different...
        assert not torch.allclose(view[0], view[1])
        # ...and another seed gives other views.
        assert not torch.equal(view, other)
    if recipe.num_views > 1:
        assert not torch.allclose(first[0][:, :, :8, :8], first[1][:, :, :8, :8])


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_is_deterministic_plain_normalisation(channels: int) -> None:
    images = smooth_images(5, channels)
    mean, std = [0.3, 0.4, 0.5][:channels], [0.2, 0.25, 0.3][:channels]
    recipe = build_view_recipe("eval", image_size=SIZE, in_channels=channels, mean=mean, std=std)
    torch.manual_seed(0)
    (first,) = recipe(images)
    torch.manual_seed(1)
    (second,) = recipe(images)
    expected = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected)


def test_eval_resizes_shorter_side_and_centre_crops() -> None:
    recipe = build_view_recipe("eval", image_size=8, in_channels=1, mean=[0.0], std=[1.0])
    # A 16 x 32 image made of two halves: the centre crop of the 8 x 16 resize keeps both.
    images = torch.zeros(2, 1, 16, 32)
    images[..., 16:] = 1.0
    (view,) = recipe(images)
    assert view.shape == (2, 1, 8, 8)
    torch.testing.assert_close(view[..., :3], torch.zeros(2, 1, 8, 3))
    torch.testing.assert_close(view[..., 5:], torch.ones(2, 1, 8, 3))

    keep = build_view_recipe("eval", image_size=8, in_channels=1, mean=[0.0], std=[1.0], resize=False)
    assert keep(images)[0].shape == (2, 1, 16, 32)


def test_uint8_batches_run_through_every_recipe() -> None:
    images_u8 = (smooth_images(4, 3) * 255).round().to(torch.uint8)
    images = to_float(images_u8)
    assert images.dtype == torch.float32 and images.max() <= 1.0
    torch.testing.assert_close(images * 255, images_u8.float())
    for name in RECIPES:
        recipe = build(name, 3)
        torch.manual_seed(5)
        from_u8 = recipe(images_u8)
        torch.manual_seed(5)
        from_float = recipe(images)
        for a, b in zip(from_u8, from_float):
            assert a.dtype == torch.float32
            assert torch.equal(a, b)


def test_to_float_rejects_ambiguous_integer_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_float(torch.zeros(1, 1, 2, 2, dtype=torch.int32))


def test_recipe_rejects_wrong_channel_count() -> None:
    recipe = build("two_views", 3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        recipe(torch.rand(2, 1, SIZE, SIZE))


def test_unknown_option_error_names_closest_option() -> None:
    with pytest.raises(TypeError, match=r"'views.crop_scal'.*did you mean 'crop_scale'"):
        build("two_views", 3, crop_scal=(0.2, 1.0))
    with pytest.raises(TypeError, match="'views.dino_asymetry'.*'dino_asymmetry'"):
        build("multi_crop", 3, dino_asymetry=True)
    with pytest.raises(RegistryError, match="did you mean 'two_views'"):
        build_view_recipe("two_view", image_size=SIZE, in_channels=3, mean=[0.5], std=[0.5])


def test_options_reach_the_pipeline() -> None:
    recipe = build("two_views", 3, crop_scale=(0.5, 1.0), color_strength=0.5, blur_p=0.0)
    ops = {type(op).__name__: op for op in recipe.groups[0].pipeline}
    assert ops["RandomResizedCropFlip"].scale == (0.5, 1.0)
    jitter = ops["RandomColorJitter"]
    assert (jitter.brightness, jitter.saturation, jitter.hue) == pytest.approx((0.4, 0.4, 0.1))
    assert "RandomGaussianBlur" not in ops


# ----------------------------------------------------------------------------- recipe specifics


def test_multi_crop_sizes_and_dino_asymmetry() -> None:
    recipe = build_view_recipe("multi_crop", image_size=224, in_channels=3, mean=[0.5], std=[0.5])
    assert recipe.view_sizes == [224, 224] + [96] * 6 and recipe.num_global_views == 2
    small = build_view_recipe("multi_crop", image_size=16, in_channels=1, mean=[0.5], std=[0.5], num_local=2)
    assert small.view_sizes == [16, 16, 8, 8]

    dino = build("multi_crop", 3, dino_asymmetry=True, num_local=4, local_size=10)
    assert dino.view_sizes == [SIZE, SIZE] + [10] * 4
    global_ops = {type(op).__name__: op for op in dino.groups[0].pipeline}
    local_ops = {type(op).__name__: op for op in dino.groups[1].pipeline}
    assert global_ops["RandomResizedCropFlip"].scale == (0.4, 1.0)
    assert local_ops["RandomResizedCropFlip"].scale == (0.05, 0.4)
    assert global_ops["RandomGaussianBlur"].p == (1.0, 0.1)
    assert global_ops["RandomSolarize"].p == (0.0, 0.2)
    assert "RandomSolarize" not in local_ops
    assert "RandomGaussianBlur" not in local_ops  # 10 px is below the 20 px blur threshold
    swav = build("multi_crop", 3)
    swav_ops = {type(op).__name__: op for op in swav.groups[0].pipeline}
    assert swav_ops["RandomResizedCropFlip"].scale == (0.14, 1.0)
    assert "RandomSolarize" not in swav_ops


def test_asymmetric_views_differ_in_solarization() -> None:
    # Only solarization left on: view 1 never solarized, view 2 always. Solarized pixels are
    # never above 0.5 (before normalisation with mean 0, std 1), so view 2 stays <= 0.5.
    recipe = build_view_recipe(
        "asymmetric",
        image_size=SIZE,
        in_channels=3,
        mean=[0.0],
        std=[1.0],
        color_jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=(0.0, 1.0),
    )
    view1, view2 = recipe(0.5 + 0.5 * smooth_images(8, 3))
    assert view1.max() > 0.9
    assert view2.max() <= 0.5


def test_one_channel_pipeline_skips_rgb_only_stages() -> None:
    pipeline = augmentation_pipeline(SIZE, 1, [0.5], [0.5], saturation=0.8, hue=0.2, grayscale_p=0.5)
    names = [type(op).__name__ for op in pipeline]
    assert "RandomGrayscale" not in names
    jitter = pipeline[names.index("RandomColorJitter")]
    assert jitter.saturation == 0.0 and jitter.hue == 0.0
    with pytest.raises(ValueError, match="RGB"):
        RandomColorJitter(saturation=0.2, hue=0.0)(torch.rand(2, 1, 8, 8))


def test_blur_kernel_rule() -> None:
    assert blur_kernel_size(224) == 23  # BYOL, Table 6: 23 x 23
    assert blur_kernel_size(96) == 9
    assert [blur_kernel_size(s) for s in (19, 20, 28, 32, 39, 40)] == [0, 3, 3, 3, 3, 5]
    assert blur_kernel_size(12) == 0
    with_blur = augmentation_pipeline(32, 3, [0.5], [0.5])
    blur = [op for op in with_blur if isinstance(op, RandomGaussianBlur)]
    assert len(blur) == 1 and blur[0].kernel_size == 3
    without = augmentation_pipeline(16, 3, [0.5], [0.5], blur_p=1.0)
    assert not any(isinstance(op, RandomGaussianBlur) for op in without)


def test_pipeline_validates_per_view_probabilities_and_stats() -> None:
    with pytest.raises(ValueError, match="blur_p"):
        augmentation_pipeline(SIZE, 3, [0.5], [0.5], blur_p=(1.0, 0.1, 0.5), num_views=2)
    with pytest.raises(ValueError, match="mean/std"):
        augmentation_pipeline(SIZE, 1, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])


# ----------------------------------------------------------------------------- ops


def test_crop_identity_and_flip_are_exact() -> None:
    images = torch.rand(4, 3, 12, 12)
    identity = RandomResizedCropFlip(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, num_views=3)
    torch.testing.assert_close(identity(images), images.repeat(3, 1, 1, 1), rtol=0, atol=1e-6)
    flipped = RandomResizedCropFlip(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(flipped(images), images.flip(-1), rtol=0, atol=1e-6)


def test_crop_at_native_resolution_is_a_slice_of_the_image() -> None:
    images = torch.rand(8, 1, 10, 16)
    # Area 25/160 with ratio 1: 5 x 5 boxes, resized to 5 x 5, so no resampling at all.
    op = RandomResizedCropFlip(5, scale=(25 / 160, 25 / 160), ratio=(1.0, 1.0), flip_p=0.0, num_views=3)
    out = op(images)
    patches = images.unfold(2, 5, 1).unfold(3, 5, 1)  # (B, 1, 6, 12, 5, 5): every 5 x 5 slice
    offsets = []
    for index in range(out.shape[0]):
        sample = index % images.shape[0]  # view-major stacking
        diff = (patches[sample, 0] - out[index, 0]).abs().amax(dim=(-1, -2))
        assert diff.min() < 1e-5
        offsets.append(divmod(int(diff.argmin()), patches.shape[3]))
    rows, cols = zip(*offsets)
    assert len(set(rows)) > 2 and len(set(cols)) > 2  # each sample and view has its own box
    assert max(cols) > max(rows)  # columns range over the wider side


def test_crop_boxes_follow_torchvision_rules() -> None:
    op = RandomResizedCropFlip(8, scale=(0.08, 1.0))
    boxes = op.sample_boxes(2000, 28, 20, torch.device("cpu"))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 20).all() and (y0 + h <= 28).all()
    area = w * h / (28 * 20)
    assert area.min() > 0.05 and area.max() <= 1.0
    assert ((w / h) > 0.6).all() and ((w / h) < 1.6).all()  # 3/4 .. 4/3 up to rounding
    assert x0.float().std() > 1 and y0.float().std() > 1  # positions vary
    # No box can fit (aspect 3..4 needs w > 28): torchvision's centred fallback.
    fallback = RandomResizedCropFlip(8, scale=(0.9, 1.0), ratio=(3.0, 4.0)).sample_boxes(5, 28, 28, torch.device("cpu"))
    assert torch.equal(fallback, torch.tensor([[0.0, 9.0, 28.0, 9.0]]).expand(5, 4))


def test_hue_matches_kornia() -> None:
    images = torch.rand(16, 3, 9, 9)
    images[0] = 0.4  # grey: hue undefined, must stay unchanged
    images[1, 0] = images[1, 1]  # ties for the maximum
    images[2, 1] = images[2, 2]
    shift = torch.rand(16) - 0.5
    expected = kornia.enhance.adjust_hue(images, 2 * math.pi * shift)
    torch.testing.assert_close(adjust_hue(images, shift), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(adjust_hue(images, shift)[0], images[0])
    inplace = images.clone()
    adjust_hue(inplace, shift, inplace=True)
    torch.testing.assert_close(inplace, expected, rtol=0, atol=1e-5)


def _per_sample_ratio(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The per-sample factor f of ``out = f * ref`` (least squares), checking that it fits."""
    f = (out * ref).sum(dim=(1, 2, 3)) / (ref * ref).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out, f.view(-1, 1, 1, 1) * ref, rtol=0, atol=1e-5)
    return f


def test_color_jitter_steps_follow_torchvision_formulas() -> None:
    images = 0.3 + 0.4 * torch.rand(32, 3, 6, 6)  # away from 0 and 1, so nothing clamps
    gray = kornia.color.rgb_to_grayscale(images)

    f = _per_sample_ratio(RandomColorJitter(0.2, 0, 0, 0, p=1.0)(images), images)
    assert f.min() >= 0.8 and f.max() <= 1.2 and f.std() > 0.05

    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    out = RandomColorJitter(0, 0.2, 0, 0, p=1.0)(images)
    f = _per_sample_ratio(out - mean, images - mean)
    assert f.min() >= 0.8 and f.max() <= 1.2

    out = RandomColorJitter(0, 0, 0.2, 0, p=1.0)(images)
    torch.testing.assert_close(kornia.color.rgb_to_grayscale(out), gray)  # luma is kept
    f = _per_sample_ratio(out - gray, images - gray)
    assert f.min() >= 0.8 and f.max() <= 1.2

    out = RandomColorJitter(0, 0, 0, 0.1, p=1.0)(images)
    torch.testing.assert_close(out.amax(1), images.amax(1))  # hue keeps value and chroma
    torch.testing.assert_close(out.amin(1), images.amin(1))
    assert not torch.allclose(out, images)


def test_color_jitter_probability_and_input_safety() -> None:
    images = torch.rand(400, 3, 4, 4)
    before = images.clone()
    out = RandomColorJitter(0.4, 0.4, 0.2, 0.1, p=0.5)(images)
    assert torch.equal(images, before)
    changed = (out - images).abs().flatten(1).amax(1) > 1e-5
    assert 0.4 < changed.float().mean() < 0.6
    assert torch.equal(RandomColorJitter(p=0.0)(images), images)


def test_grayscale_solarize_and_blur_ops() -> None:
    images = torch.rand(8, 3, 20, 20)
    gray = RandomGrayscale(p=1.0)(images)
    torch.testing.assert_close(gray, kornia.color.rgb_to_grayscale(images).expand_as(images))

    solarized = RandomSolarize(p=1.0)(images)
    torch.testing.assert_close(solarized, torch.where(images >= 0.5, 1.0 - images, images))
    # Per-view probabilities on a view-major batch: first half never, second half always.
    half = RandomSolarize(p=(0.0, 1.0))(images)
    assert torch.equal(half[:4], images[:4])
    torch.testing.assert_close(half[4:], solarized[4:])

    blurred = RandomGaussianBlur(3, sigma=(1.0, 2.0), p=(1.0, 0.0))(images)
    assert torch.equal(blurred[4:], images[4:])
    assert (blurred[:4].std(dim=(2, 3)) < images[:4].std(dim=(2, 3))).all()  # noise is smoothed
    sharp = RandomGaussianBlur(3, sigma=(0.1, 0.1), p=1.0)(images)  # a delta-like kernel
    torch.testing.assert_close(sharp, images, rtol=0, atol=1e-4)


def test_normalize_per_channel_and_broadcast() -> None:
    images = torch.rand(2, 3, 4, 4)
    out = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])(images)
    torch.testing.assert_close(out[:, 1], (images[:, 1] - 0.2) / 0.25)
    torch.testing.assert_close(Normalize([0.5], [0.5])(images), images * 2 - 1)
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="channel"):
        Normalize([0.1, 0.2], [1.0, 1.0])(images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recipes_run_on_cuda_and_are_reproducible() -> None:
    images = smooth_images(8, 3).to("cuda")
    for name in RECIPES:
        recipe = build(name, 3).to("cuda")
        torch.manual_seed(3)
        first = recipe(images)
        torch.manual_seed(3)
        second = recipe(images)
        for a, b in zip(first, second):
            assert a.is_cuda and torch.equal(a, b)


# ----------------------------------------------------------------------------- mixing


def _eye_batch(batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    # Distinct random images and one class per sample, so labels reveal the partner and lam.
    return torch.rand(batch, 3, 8, 8), torch.eye(batch)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_gives_convex_combinations(per_sample: bool) -> None:
    images, labels = _eye_batch()
    mixed, soft = mixup(images, labels, alpha=0.4, generator=torch.Generator().manual_seed(0), per_sample=per_sample)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    assert (soft >= 0).all()
    lams = []
    for i in range(16):
        lam = float(soft[i, i])
        others = [j for j in range(16) if j != i and soft[i, j] > 0]
        partner = others[0] if others else i
        assert len(others) <= 1
        torch.testing.assert_close(mixed[i], lam * images[i] + (1 - lam) * images[partner])
        lams.append(lam if others else None)
    drawn = {round(lam, 6) for lam in lams if lam is not None}
    assert (len(drawn) > 1) == per_sample


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_pastes_partner_pixels_in_label_proportion(per_sample: bool) -> None:
    images, labels = _eye_batch()
    mixed, soft = cutmix(images, labels, alpha=1.0, generator=torch.Generator().manual_seed(1), per_sample=per_sample)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    pasted_fractions = []
    for i in range(16):
        from_self = (mixed[i] == images[i]).all(0)
        others = [j for j in range(16) if j != i and soft[i, j] > 0]
        if not others:  # a sample drawn as its own partner, or an empty box
            assert from_self.all()
            continue
        (partner,) = others
        from_partner = (mixed[i] == images[partner]).all(0)
        assert (from_self | from_partner).all()
        pasted = (~from_self).float().mean()
        torch.testing.assert_close(pasted, soft[i, partner])
        rows, cols = (~from_self).nonzero(as_tuple=True)
        # The pasted pixels form one rectangle.
        assert pasted * 64 == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        pasted_fractions.append(round(float(pasted), 6))
    assert pasted_fractions
    assert (len(set(pasted_fractions)) > 1) == per_sample


def test_mixing_is_reproducible_and_leaves_global_rng_alone() -> None:
    images, labels = _eye_batch()
    state = torch.get_rng_state()
    a = mixup(images, labels, 0.2, torch.Generator().manual_seed(7))
    b = mixup(images, labels, 0.2, torch.Generator().manual_seed(7))
    c = cutmix(images, labels, 1.0, torch.Generator().manual_seed(7))
    d = cutmix(images, labels, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_mixing_validates_inputs() -> None:
    images, labels = _eye_batch(4)
    with pytest.raises(ValueError, match="alpha"):
        mixup(images, labels, alpha=0.0)
    with pytest.raises(TypeError, match="float"):
        cutmix(images, torch.eye(4, dtype=torch.long), alpha=1.0)
    with pytest.raises(ValueError, match="one-hot"):
        mixup(images, labels[:3], alpha=1.0)
