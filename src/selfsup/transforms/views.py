"""View recipes: a batch of images in, the list of augmented, normalised views out.

A recipe is built once per run from the dataset's image size, channel count and statistics,
and called by the engine on every batch, on the training device::

    recipe = build_view_recipe("two_views", image_size=32, in_channels=3, mean=m, std=s)
    views = recipe(images)          # images (B, C, H, W) in [0, 1] (or uint8)
    # -> [view_1, view_2], each (B, C, 32, 32) float32

Views ``0 .. num_global_views - 1`` are the global (large) crops, any further ones local
crops. All views of one size come out of a single pass of one pipeline (see
``RandomResizedCropFlip``), so per-view differences such as BYOL's asymmetric blur are
per-view probabilities of that pipeline rather than separate pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from selfsup.registry import VIEW_RECIPES
from selfsup.transforms.ops import (
    CenterResize,
    Normalize,
    Probability,
    RandomColorJitter,
    RandomGaussianBlur,
    RandomGrayscale,
    RandomResizedCropFlip,
    RandomSolarize,
    blur_kernel_size,
    to_float,
)
from selfsup.transforms.randaugment import RAND_AUGMENT_OPS, RandAugment

__all__ = [
    "ViewGroup",
    "ViewRecipe",
    "augmentation_pipeline",
    "eval_view",
    "multi_crop",
    "single_view",
    "two_views",
    "asymmetric",
    "infomin",
]


class ViewGroup(nn.Module):
    """Runs one pipeline that makes ``num_views`` views of size ``size`` and splits them.

    ``pipeline`` maps ``(B, C, H, W)`` to ``(num_views * B, C, size, size)``, view-major; with
    ``fixed_size=False`` the views may keep another spatial size (``eval`` without resizing).
    """

    def __init__(self, pipeline: nn.Module, num_views: int, size: int, fixed_size: bool = True) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.num_views = num_views
        self.size = size
        self.fixed_size = fixed_size

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, size={self.size}, fixed_size={self.fixed_size}"

    def forward(self, images: Tensor) -> list[Tensor]:
        out = self.pipeline(images)
        expected: tuple[int, ...] = (self.num_views * images.shape[0], images.shape[1])
        if self.fixed_size:
            expected += (self.size, self.size)
        if tuple(out.shape[: len(expected)]) != expected:
            raise RuntimeError(f"view pipeline returned {tuple(out.shape)}, expected {expected}")
        return list(out.chunk(self.num_views))


class ViewRecipe(nn.Module):
    """Turns a batch of images into a list of augmented, normalised views.

    Calls its view groups in order and concatenates their views, so groups must be listed
    global crops first. Subclasses may override ``make_views`` (e.g. to add pretext targets)
    and keep the input checks and ``no_grad`` of ``forward``.

    Attributes:
        num_views: total number of views returned.
        num_global_views: views ``0 .. num_global_views - 1`` are global crops, the rest local.
        view_sizes: side length of every view, in order.
        in_channels: channel count the recipe was built for (1 grayscale, 3 RGB).

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] (or uint8 in [0, 255]) ->
        ``num_views`` tensors ``(B, C, view_sizes[i], view_sizes[i])`` of the input's float dtype
        (float32 for uint8 input).
    """

    def __init__(self, groups: Sequence[ViewGroup], in_channels: int, num_global_views: int) -> None:
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.in_channels = in_channels
        self.view_sizes: list[int] = [g.size for g in groups for _ in range(g.num_views)]
        self.num_views = len(self.view_sizes)
        if not 0 <= num_global_views <= self.num_views:
            raise ValueError(f"num_global_views={num_global_views} is not within 0..{self.num_views}")
        self.num_global_views = num_global_views

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_global_views={self.num_global_views}, view_sizes={self.view_sizes}"

    def make_views(self, images: Tensor) -> list[Tensor]:
        """Makes the views of a checked float batch ``(B, C, H, W)``."""
        return [view for group in self.groups for view in group(images)]

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            images = to_float(images)
        return self.make_views(images)


def _per_view(name: str, p: Probability, num_views: int) -> Probability:
    if not isinstance(p, (int, float)) and len(p) not in (1, num_views):
        raise ValueError(f"{name} has {len(p)} per-view values for {num_views} view(s)")
    if not isinstance(p, (int, float)) and len(p) == 1:
        return float(p[0])
    return p


def augmentation_pipeline(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: Probability = 0.5,
    color_jitter_p: Probability = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_p: Probability = 0.2,
    blur_p: Probability = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: Probability = 0.0,
    num_views: int = 1,
) -> nn.Sequential:
    """Builds one batched augmentation pipeline: crop, flip, colour, grey, blur, solarize, normalise.

    The order is SimCLR's and BYOL's. Stages that cannot change anything are left out:
    saturation, hue and grayscale for single-channel images (they are defined on RGB only),
    blur when its kernel would be smaller than 3 px (``blur_kernel_size``: 10% of the side,
    odd, so below 20 px) or ``blur_p`` is 0, and any stage whose probability is 0.

    Each probability is a float, or one value per view when ``num_views > 1``.

    Shapes:
        ``(B, in_channels, H, W)`` float in [0, 1] ->
        ``(num_views * B, in_channels, image_size, image_size)`` normalised, view-major.

    References:
        Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
        arXiv:2002.05709, Appendix A (crop scale (0.08, 1), ratio (3/4, 4/3), flip 0.5, colour
        jitter p 0.8, grayscale 0.2, blur 0.5 with sigma in [0.1, 2.0]); Grill et al.,
        arXiv:2006.07733, Table 6 (jitter magnitudes 0.4, 0.4, 0.2, 0.1 used as defaults here).
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    if len(mean) not in (1, in_channels) or len(std) != len(mean):
        raise ValueError(f"mean/std need 1 or {in_channels} entries each, got {list(mean)} and {list(std)}")
    flip_p, color_jitter_p, grayscale_p, blur_p, solarize_p = (
        _per_view(name, p, num_views)
        for name, p in (
            ("flip_p", flip_p),
            ("color_jitter_p", color_jitter_p),
            ("grayscale_p", grayscale_p),
            ("blur_p", blur_p),
            ("solarize_p", solarize_p),
        )
    )

    def active(p: Probability) -> bool:
        return any(float(q) > 0 for q in ([p] if isinstance(p, (int, float)) else p))

    rgb = in_channels == 3
    ops: list[nn.Module] = [RandomResizedCropFlip(image_size, crop_scale, crop_ratio, flip_p, num_views)]
    # Every later op may overwrite its input: the crop's output is a fresh tensor owned here.
    jitter = (brightness, contrast, saturation if rgb else 0.0, hue if rgb else 0.0)
    if active(color_jitter_p) and any(m > 0 for m in jitter):
        ops.append(RandomColorJitter(*jitter, p=color_jitter_p, inplace=True))
    if rgb and active(grayscale_p):
        ops.append(RandomGrayscale(grayscale_p, inplace=True))
    kernel = blur_kernel_size(image_size)
    if kernel and active(blur_p):
        ops.append(RandomGaussianBlur(kernel, blur_sigma, blur_p, inplace=True))
    if active(solarize_p):
        ops.append(RandomSolarize(solarize_p, inplace=True))
    ops.append(Normalize(mean, std, inplace=True))
    return nn.Sequential(*ops)


@VIEW_RECIPES.register("two_views")
def two_views(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    color_strength: float = 1.0,
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
) -> ViewRecipe:
    """Two views from one symmetric pipeline (SimCLR; also MoCo v2, SimSiam, Barlow Twins).

    Colour distortion of strength ``s = color_strength``: brightness, contrast and saturation
    ``0.8 s``, hue ``0.2 s``. SimCLR's CIFAR-10 runs used ``s = 0.5`` and no blur; blur is
    skipped automatically below 20 px (see ``augmentation_pipeline``).

    Shapes:
        ``(B, C, H, W) -> 2 x (B, C, image_size, image_size)``.

    References:
        Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
        arXiv:2002.05709, Appendix A: crop (0.08, 1), s = 1.0, jitter p 0.8, grayscale 0.2,
        blur p 0.5, flip 0.5.
    """
    s = color_strength
    pipeline = augmentation_pipeline(
        image_size,
        in_channels,
        mean,
        std,
        crop_scale=crop_scale,
        crop_ratio=crop_ratio,
        flip_p=flip_p,
        color_jitter_p=color_jitter_p,
        brightness=0.8 * s,
        contrast=0.8 * s,
        saturation=0.8 * s,
        hue=min(0.2 * s, 0.5),
        grayscale_p=grayscale_p,
        blur_p=blur_p,
        blur_sigma=blur_sigma,
        num_views=2,
    )
    return ViewRecipe([ViewGroup(pipeline, 2, image_size)], in_channels, num_global_views=2)


@VIEW_RECIPES.register("asymmetric")
def asymmetric(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | tuple[float, float] = (1.0, 0.1),
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: float | tuple[float, float] = (0.0, 0.2),
    flip_p: float = 0.5,
) -> ViewRecipe:
    """Two views from BYOL's asymmetric pair of pipelines: (blur 1.0) and (blur 0.1, solarize 0.2).

    ``blur_p`` and ``solarize_p`` give (view 1, view 2) probabilities; everything else is
    shared.

    Shapes:
        ``(B, C, H, W) -> 2 x (B, C, image_size, image_size)``.

    References:
        Grill et al., "Bootstrap Your Own Latent", arXiv:2006.07733, Table 6: crop (0.08, 1),
        flip 0.5, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur (1.0, 0.1) with sigma
        in [0.1, 2.0], solarize (0.0, 0.2).
    """
    pipeline = augmentation_pipeline(
        image_size,
        in_channels,
        mean,
        std,
        crop_scale=crop_scale,
        crop_ratio=crop_ratio,
        flip_p=flip_p,
        color_jitter_p=color_jitter_p,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale_p=grayscale_p,
        blur_p=blur_p,
        blur_sigma=blur_sigma,
        solarize_p=solarize_p,
        num_views=2,
    )
    return ViewRecipe([ViewGroup(pipeline, 2, image_size)], in_channels, num_global_views=2)


@VIEW_RECIPES.register("infomin")
def infomin(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    color_jitter_p: float = 0.8,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    rand_augment_layers: int = 2,
    rand_augment_magnitude: float = 10.0,
    rand_augment_magnitude_std: float = 0.5,
    rand_augment_p: float = 0.5,
    rand_augment_ops: Sequence[str] | None = None,
    grayscale_p: float = 0.2,
) -> ViewRecipe:
    """Two views from InfoMin's augmentation ("InfoMin Aug"), in the authors' order.

    Random resized crop (scale (0.2, 1): the authors' value with a MoCo queue, 0.08 with a
    memory bank) and flip 0.5; colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8; Gaussian blur
    with p 0.5, sigma in [0.1, 2] (kernel 10% of the side: 22 -> 23 px at 224, none under
    20 px); RandAugment with 2 ops per image drawn from 15, each applied with p 0.5 at
    magnitude N(10, 0.5) (``selfsup.transforms.randaugment``); random grayscale 0.2; then
    normalisation. For one channel, saturation, hue, grayscale and RandAugment's ``color``
    change nothing and are left out or are identities.

    Not in this recipe: the JigSaw branch of the authors' InfoMin model (a PIRL-style second
    objective on 3x3 tile crops, a method rather than a view) and the YDbDr colour split used
    by their CMC variants. Geometric RandAugment ops shear about the centre, not PIL's corner.

    Shapes:
        ``(B, C, H, W) -> 2 x (B, C, image_size, image_size)``.

    References:
        Tian, Sun, Poole, Krishnan, Schmid & Isola, "What Makes for Good Views for Contrastive
        Learning?", arXiv:2005.10243 (InfoMin Aug; code: PyContrast's augmentation "D");
        Cubuk et al., "RandAugment", arXiv:1909.13719.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    if len(mean) not in (1, in_channels) or len(std) != len(mean):
        raise ValueError(f"mean/std need 1 or {in_channels} entries each, got {list(mean)} and {list(std)}")
    rgb = in_channels == 3
    ops: list[nn.Module] = [RandomResizedCropFlip(image_size, crop_scale, crop_ratio, flip_p, num_views=2)]
    # The crop's output is a fresh tensor owned here: the intensity ops may overwrite it.
    jitter = (brightness, contrast, saturation if rgb else 0.0, hue if rgb else 0.0)
    if color_jitter_p > 0 and any(m > 0 for m in jitter):
        ops.append(RandomColorJitter(*jitter, p=color_jitter_p, inplace=True))
    kernel = blur_kernel_size(image_size)
    if kernel and blur_p > 0:
        ops.append(RandomGaussianBlur(kernel, blur_sigma, blur_p, inplace=True))
    if rand_augment_layers > 0 and rand_augment_p > 0:
        ops.append(
            RandAugment(
                rand_augment_layers,
                rand_augment_magnitude,
                rand_augment_magnitude_std,
                rand_augment_p,
                fill=tuple(mean),  # the authors fill with the dataset mean
                ops=RAND_AUGMENT_OPS if rand_augment_ops is None else tuple(rand_augment_ops),
            )
        )
    if rgb and grayscale_p > 0:
        ops.append(RandomGrayscale(grayscale_p, inplace=True))
    ops.append(Normalize(mean, std, inplace=True))
    return ViewRecipe([ViewGroup(nn.Sequential(*ops), 2, image_size)], in_channels, num_global_views=2)


@VIEW_RECIPES.register("multi_crop")
def multi_crop(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_global: int = 2,
    global_size: int | None = None,
    global_scale: tuple[float, float] | None = None,
    num_local: int = 6,
    local_size: int | None = None,
    local_scale: tuple[float, float] | None = None,
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    dino_asymmetry: bool = False,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    global_blur_p: float | Sequence[float] | None = None,
    global_solarize_p: float | Sequence[float] | None = None,
    local_blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
) -> ViewRecipe:
    """Multi-crop: ``num_global`` large crops, then ``num_local`` small ones (SwAV, DINO).

    Options left ``None`` take the paper's value for the chosen mode:

    ================  ===========================  ====================================
    option            SwAV (default)               DINO (``dino_asymmetry=True``)
    ================  ===========================  ====================================
    global_scale      (0.14, 1.0)                  (0.4, 1.0)
    local_scale       (0.05, 0.14)                 (0.05, 0.4)
    jitter b/c/s/h    0.8 / 0.8 / 0.8 / 0.2        0.4 / 0.4 / 0.2 / 0.1
    global_blur_p     0.5 for every global crop    1.0 for the first, 0.1 for the others
    global_solarize_p 0.0                          0.0 for the first, 0.2 for the others
    ================  ===========================  ====================================

    ``global_size`` defaults to ``image_size``; ``local_size`` to 96/224 of it (the papers'
    96 px at 224 px), at least 8 px. Local crops are blurred with ``local_blur_p`` where the
    blur kernel rule allows (at least 20 px).

    Shapes:
        ``(B, C, H, W) -> num_global x (B, C, G, G) + num_local x (B, C, L, L)``.

    References:
        Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
        Assignments" (SwAV), arXiv:2006.09882: 2 x 224 + 6 x 96, scales (0.14, 1) and
        (0.05, 0.14). Caron et al., "Emerging Properties in Self-Supervised Vision
        Transformers" (DINO), arXiv:2104.14294: scales (0.4, 1) and (0.05, 0.4), BYOL's
        colour and per-view blur/solarize.
    """
    if num_global < 1 or num_local < 0:
        raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global} and {num_local}")
    global_size = image_size if global_size is None else global_size
    local_size = max(8, round(image_size * 96 / 224)) if local_size is None else local_size
    # The papers' values for the chosen mode fill every option left None.
    if dino_asymmetry:
        default_global_scale, default_local_scale = (0.4, 1.0), (0.05, 0.4)
        default_jitter = (0.4, 0.4, 0.2, 0.1)
        default_blur_p: Probability = (1.0,) + (0.1,) * (num_global - 1)
        default_solarize_p: Probability = (0.0,) + (0.2,) * (num_global - 1)
    else:
        default_global_scale, default_local_scale = (0.14, 1.0), (0.05, 0.14)
        default_jitter = (0.8, 0.8, 0.8, 0.2)
        default_blur_p, default_solarize_p = 0.5, 0.0
    b, c, s, h = (
        default if value is None else value
        for value, default in zip((brightness, contrast, saturation, hue), default_jitter)
    )

    def pipeline(
        size: int, num_views: int, scale: tuple[float, float], blur_p: Probability, solarize_p: Probability
    ) -> nn.Sequential:
        return augmentation_pipeline(
            size,
            in_channels,
            mean,
            std,
            crop_scale=scale,
            crop_ratio=crop_ratio,
            flip_p=flip_p,
            color_jitter_p=color_jitter_p,
            brightness=b,
            contrast=c,
            saturation=s,
            hue=h,
            grayscale_p=grayscale_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            solarize_p=solarize_p,
            num_views=num_views,
        )

    global_pipeline = pipeline(
        global_size,
        num_global,
        default_global_scale if global_scale is None else global_scale,
        default_blur_p if global_blur_p is None else global_blur_p,
        default_solarize_p if global_solarize_p is None else global_solarize_p,
    )
    groups = [ViewGroup(global_pipeline, num_global, global_size)]
    if num_local:
        local_scale = default_local_scale if local_scale is None else local_scale
        groups.append(ViewGroup(pipeline(local_size, num_local, local_scale, local_blur_p, 0.0), num_local, local_size))
    return ViewRecipe(groups, in_channels, num_global_views=num_global)


@VIEW_RECIPES.register("single_view")
def single_view(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
    color_jitter_p: float = 0.0,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_p: float = 0.0,
    blur_p: float = 0.0,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: float = 0.0,
) -> ViewRecipe:
    """One augmented view, for linear-probe / fine-tuning training and pretext tasks.

    Defaults are the linear-evaluation protocol (random resized crop and flip only); the
    colour, grayscale, blur and solarize stages are there to be switched on by configs.

    Shapes:
        ``(B, C, H, W) -> 1 x (B, C, image_size, image_size)``.

    References:
        Chen et al., arXiv:2002.05709, Appendix B.5 (linear evaluation: random crop with resize
        and random flip only).
    """
    pipeline = augmentation_pipeline(
        image_size,
        in_channels,
        mean,
        std,
        crop_scale=crop_scale,
        crop_ratio=crop_ratio,
        flip_p=flip_p,
        color_jitter_p=color_jitter_p,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale_p=grayscale_p,
        blur_p=blur_p,
        blur_sigma=blur_sigma,
        solarize_p=solarize_p,
    )
    return ViewRecipe([ViewGroup(pipeline, 1, image_size)], in_channels, num_global_views=1)


@VIEW_RECIPES.register("eval")
def eval_view(
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    resize: bool = True,
) -> ViewRecipe:
    """One deterministic view for feature extraction: optional resize, then normalisation.

    With ``resize`` the shorter side is resized to ``image_size`` (antialiased bilinear) and
    the centre square cropped; images already ``image_size`` square pass through untouched.
    Without it images keep their size (``view_sizes`` then states the nominal size only).

    Shapes:
        ``(B, C, H, W) -> 1 x (B, C, image_size, image_size)``.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    if len(mean) not in (1, in_channels) or len(std) != len(mean):
        raise ValueError(f"mean/std need 1 or {in_channels} entries each, got {list(mean)} and {list(std)}")
    ops: list[nn.Module] = [CenterResize(image_size)] if resize else []
    pipeline = nn.Sequential(*ops, Normalize(mean, std))
    return ViewRecipe([ViewGroup(pipeline, 1, image_size, fixed_size=resize)], in_channels, num_global_views=1)
