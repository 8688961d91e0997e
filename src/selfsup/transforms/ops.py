"""Batched random image operations with independent parameters for every sample.

Every operation takes a whole batch ``(B, C, H, W)`` of float images in [0, 1] on any device
and draws one set of random parameters per sample from torch's global RNG (the CPU generator,
or the CUDA generator of the batch's device), so ``torch.manual_seed`` reproduces a run and the
engine's checkpointed RNG state resumes it exactly.

Why not the ``kornia.augmentation`` modules themselves: on the 12-32 px images of the small
datasets their per-call bookkeeping (parameter generators, probability gating by index copies,
transformation matrices, full-size temporaries) costs more than the pixel work. On a 2-core
CPU (batch 256, one thread) the same recipes built from kornia modules ran 2.3x (two views,
1 x 28 px), 3.5x (BYOL, 3 x 32 px) and 6x (multi-crop 2 x 28 + 6 x 12 px) slower than this
module. So parameters are drawn here in a few vectorised torch calls and the pixel work is:

* kornia's kernels where they are lean: ``kornia.filters.gaussian_blur2d`` (per-sample sigma),
  ``kornia.color.rgb_to_grayscale``, ``kornia.geometry.transform.resize``;
* short closed forms of torchvision's colour formulas where kornia's versions allocate several
  full-size temporaries per call (brightness, contrast, saturation, and the hue rotation done
  without materialising HSV); tests check each against ``kornia.enhance``;
* one ``grid_sample`` for crop + resize + flip.

Intensity ops accept ``inplace=True`` to overwrite their input: ``augmentation_pipeline`` sets
it for every op after the crop, whose output is a fresh tensor the pipeline owns, which keeps
peak memory and allocator traffic at one batch. Per-sample gates are float 0/1 factors rather
than boolean ``where`` masks, which are several times slower on CPU and branch-free on GPU.

Probabilities may be given per view: an op built with ``p=(1.0, 0.1)`` applied to a batch that
stacks two views view-major (``[view 1 of all samples; view 2 of all samples]``) uses 1.0 for
the first half and 0.1 for the second. A recipe thus runs all views of one size through a
single call, which makes asymmetric recipes (BYOL, DINO) as cheap as symmetric ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CenterResize",
    "Normalize",
    "Probability",
    "RandomColorJitter",
    "RandomGaussianBlur",
    "RandomGrayscale",
    "RandomResizedCropFlip",
    "RandomSolarize",
    "adjust_hue",
    "blur_kernel_size",
    "to_float",
]

Probability = float | Sequence[float]
"""One probability for every sample, or one per view of a view-major stacked batch."""


def to_float(images: Tensor) -> Tensor:
    """Converts a ``(B, C, H, W)`` uint8 batch in [0, 255] to float32 in [0, 1].

    Floating-point input is assumed to be in [0, 1] already and is returned as float32 (the
    same tensor when it is float32), so callers can pass either.

    Raises:
        TypeError: for integer dtypes other than uint8, whose range is ambiguous.
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")


def blur_kernel_size(image_size: int) -> int:
    """Returns the odd Gaussian-blur kernel side for an image side, or 0 when blur is skipped.

    SimCLR blurs with a kernel of 10% of the image side: its reference code takes
    ``radius = (image_size // 10) // 2`` and ``kernel = 2 * radius + 1`` (23 px at 224 px, as
    BYOL's Table 6 quotes). Below 20 px the radius is 0, the kernel would be the identity, and
    blur is skipped (``0`` is returned).

    References:
        Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
        arXiv:2002.05709, Appendix A.
    """
    kernel = 2 * (image_size // 20) + 1
    return kernel if kernel >= 3 else 0


def _values(p: Probability) -> list[float]:
    return [float(p)] if isinstance(p, (int, float)) else [float(q) for q in p]


def _check_probability(name: str, p: Probability) -> Probability:
    values = _values(p)
    if not values or any(not 0.0 <= q <= 1.0 for q in values):
        raise ValueError(f"{name} must be probabilities in [0, 1], got {p!r}")
    return values[0] if isinstance(p, (int, float)) else tuple(values)


def _always(p: Probability) -> bool:
    return all(q >= 1.0 for q in _values(p))


def _never(p: Probability) -> bool:
    return all(q <= 0.0 for q in _values(p))


def _gate(p: Probability, batch: int, device: torch.device) -> Tensor:
    """Draws ``(B,)`` float 0/1 flags: sample ``i`` is transformed with probability ``p[i]``."""
    threshold: Tensor | float
    if isinstance(p, (int, float)):
        threshold = float(p)
    else:
        views = len(p)
        if batch % views:
            raise ValueError(f"a batch of {batch} cannot be split into {views} views of equal size")
        threshold = torch.tensor(_values(p), device=device).repeat_interleave(batch // views)
    return (torch.rand(batch, device=device) < threshold).float()


def _uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.empty(shape, device=device).uniform_(low, high)


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """Reshapes ``(B,)`` per-sample values to ``(B, 1, 1, 1)`` in the images' dtype."""
    return values.to(images.dtype).view(-1, 1, 1, 1)


class RandomResizedCropFlip(nn.Module):
    """Crops a random box of every sample, resizes it to ``size`` and flips it horizontally.

    Boxes follow torchvision's ``RandomResizedCrop``: up to ``attempts`` tries of an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first box
    that fits wins, otherwise a centre crop clamped to ``ratio``. Box corners are integers as
    in torchvision. All tries of all samples are drawn in one vectorised call.

    The crop, the resize (bilinear, edge pixels repeated outside the image) and the flip are a
    single ``grid_sample``: the flip only mirrors the sampling grid, and the grid is separable
    (rows depend on the box's y, columns on its x), so it is built from two ``(N, size)``
    vectors instead of a per-pixel affine product. With ``num_views = V`` the V crops of an
    image are stacked along the grid's height, so the input is read once and never repeated.

    Shapes:
        ``(B, C, H, W) -> (V * B, C, size, size)``, view-major: rows ``v * B .. (v + 1) * B - 1``
        are view ``v`` of samples ``0 .. B - 1``.

    Caveat: bilinear sampling does not low-pass filter, so crops shrunk by more than about 2x
    alias (torchvision's antialiased resize would not). With the papers' scales that needs
    source images over twice the crop size: resize such datasets in the data loader.

    References:
        Szegedy et al., "Going Deeper with Convolutions", arXiv:1409.4842 (the "inception
        crop"); Chen et al., arXiv:2002.05709, Appendix A: scale (0.08, 1.0), ratio (3/4, 4/3),
        horizontal flip with p = 0.5.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: Probability = 0.5,
        num_views: int = 1,
        attempts: int = 10,
    ) -> None:
        super().__init__()
        if size < 1 or num_views < 1 or attempts < 1:
            raise ValueError(f"size, num_views and attempts must be >= 1, got {size}, {num_views}, {attempts}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = _check_probability("flip_p", flip_p)
        self.num_views = num_views
        self.attempts = attempts

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}, "
            f"num_views={self.num_views}"
        )

    def sample_boxes(self, n: int, height: int, width: int, device: torch.device) -> Tensor:
        """Draws ``n`` crop boxes ``(n, 4)`` as float ``[x0, y0, w, h]`` in whole pixels."""
        target = _uniform(*self.scale, (n, self.attempts), device) * (height * width)
        log_ratio = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), (n, self.attempts), device)
        aspect = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # argmax returns the first maximal index, i.e. the first attempt that fits.
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        found = fits.any(dim=1)

        # torchvision's fallback: the largest centred box whose aspect ratio is within range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        w = torch.where(found, w.gather(1, first).squeeze(1), float(fw))
        h = torch.where(found, h.gather(1, first).squeeze(1), float(fh))
        x0 = torch.floor(torch.rand(n, device=device) * (width - w + 1))
        y0 = torch.floor(torch.rand(n, device=device) * (height - h + 1))
        x0 = torch.where(found, x0, float((width - fw) // 2))
        y0 = torch.where(found, y0, float((height - fh) // 2))
        return torch.stack((x0, y0, w, h), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        views, size, device = self.num_views, self.size, images.device
        n = views * batch
        x0, y0, w, h = self.sample_boxes(n, height, width, device).unbind(1)
        flip = _gate(self.flip_p, n, device)

        # Output pixel centres in box units, (j + 0.5) / size, mirrored (t -> 1 - t) if flipped.
        t = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        tx = t + flip[:, None] * (1.0 - 2.0 * t)
        # Grid coordinates for align_corners=False: -1 and 1 are the outer edges of the image.
        gx = (x0[:, None] + w[:, None] * tx) * (2.0 / width) - 1.0  # (N, size)
        gy = (y0[:, None] + h[:, None] * t) * (2.0 / height) - 1.0  # (N, size)
        gx = gx.view(views, batch, 1, size).transpose(0, 1).expand(batch, views, size, size)
        gy = gy.view(views, batch, size, 1).transpose(0, 1).expand(batch, views, size, size)
        grid = torch.stack((gx, gy), dim=-1).reshape(batch, views * size, size, 2).to(images.dtype)

        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if views == 1:
            return out
        out = out.view(batch, channels, views, size, size).permute(2, 0, 1, 3, 4)
        return out.reshape(n, channels, size, size)


def adjust_hue(images: Tensor, shift: Tensor, inplace: bool = False) -> Tensor:
    """Rotates the HSV hue of ``(B, 3, H, W)`` RGB images in [0, 1] by ``shift`` turns ``(B,)``.

    Same result as torchvision's and kornia's ``adjust_hue`` (RGB -> HSV, add to H, HSV -> RGB;
    kornia takes radians, ``2 * pi * shift``) without building the HSV image: value
    ``V = max`` and chroma ``C = max - min`` are invariant under a hue rotation, and each output
    channel is ``V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * hue) mod 6`` and
    ``n = 5, 3, 1`` for R, G, B. With ``inplace`` the result overwrites ``images``.
    """
    if images.shape[1] != 3:
        raise ValueError(f"hue needs RGB images, got {images.shape[1]} channel(s)")
    maxc = images.amax(dim=1, keepdim=True)
    chroma = maxc - images.amin(dim=1, keepdim=True)
    r, g, b = images.split(1, dim=1)
    # Hue in sixths of a turn, taken from the maximal channel (ties: R, then G, as torchvision).
    is_r = r == maxc
    is_g = (g == maxc) & ~is_r
    is_b = ~(is_r | is_g)
    sixths = (g - b).mul_(is_r)
    sixths.add_((b - r).add_(chroma, alpha=2.0).mul_(is_g))
    sixths.add_((r - g).add_(chroma, alpha=4.0).mul_(is_b))
    # Grey pixels (C = 0) have numerator 0, and their output is V whatever the hue.
    sixths.div_(chroma.clamp_min(torch.finfo(images.dtype).tiny))
    sixths.add_(6.0 * shift.to(images.dtype).view(-1, 1, 1, 1))

    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    out = images if inplace else torch.empty_like(images)
    k = torch.add(sixths, offsets, out=out)  # the inputs r, g, b are no longer read
    # One scratch tensor serves both k mod 6 and 4 - k: full-size temporaries are what costs.
    scratch = torch.div(k, 6.0).floor_().mul_(6.0)
    k.sub_(scratch)  # k mod 6, in [0, 6)
    k.clamp_(max=torch.neg(k, out=scratch).add_(4.0)).clamp_(0.0, 1.0)  # min(k, 4 - k) in [0, 1]
    return k.mul_(chroma).neg_().add_(maxc)


def _gray(images: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images (ITU-R 601, as torchvision), or the single channel."""
    return kornia.color.rgb_to_grayscale(images) if images.shape[1] == 3 else images


class RandomColorJitter(nn.Module):
    """Randomly changes brightness, contrast, saturation and hue, per sample, with prob. ``p``.

    torchvision's ``ColorJitter`` semantics (used by the SimCLR, BYOL and DINO PyTorch code):
    factors uniform in ``[max(0, 1 - x), 1 + x]`` for brightness, contrast and saturation and
    in ``[-hue, hue]`` turns for hue; brightness scales, contrast blends with the mean luma,
    saturation with the luma image, each step clamped to [0, 1]. The steps run in a random
    order drawn once per call rather than per sample (kornia does the same), because a
    per-sample order would need one pass per permutation. Unselected samples get neutral
    factors (1, or a hue shift of 0) rather than being gathered out.

    Saturation and hue need RGB: for single-channel images pass 0 for both.

    Shapes:
        ``(B, C, H, W) -> (B, C, H, W)``.

    References:
        Chen et al., arXiv:2002.05709, Appendix A: strength ``s`` gives (0.8 s, 0.8 s, 0.8 s,
        0.2 s) with p = 0.8; Grill et al., arXiv:2006.07733, Table 6: (0.4, 0.4, 0.2, 0.1),
        p = 0.8 (the defaults here).
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        p: Probability = 0.8,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError(
                f"jitter magnitudes must be >= 0 and hue <= 0.5, got {(brightness, contrast, saturation, hue)}"
            )
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.p = _check_probability("color_jitter_p", p)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hue={self.hue}, p={self.p}, inplace={self.inplace}"
        )

    def forward(self, images: Tensor) -> Tensor:
        if _never(self.p):
            return images
        batch, channels = images.shape[:2]
        if channels != 3 and (self.saturation > 0 or self.hue > 0):
            raise ValueError(f"saturation and hue jitter need RGB images, got {channels} channel(s)")
        device = images.device
        gate = _gate(self.p, batch, device)
        # Draw every factor up front in a fixed order, so the RNG stream does not depend on the
        # step order drawn below; unselected samples get neutral factors.
        factors = [
            1.0 + gate * (_uniform(max(0.0, 1.0 - x), 1.0 + x, (batch,), device) - 1.0)
            for x in (self.brightness, self.contrast, self.saturation)
        ]
        factors.append(gate * _uniform(-self.hue, self.hue, (batch,), device))
        magnitudes = (self.brightness, self.contrast, self.saturation, self.hue)

        x = images if self.inplace else images.clone()
        # The order comes from the CPU generator even for GPU batches: it steers Python control
        # flow, and a CUDA draw would need a device -> host copy.
        for step in torch.randperm(4).tolist():
            if magnitudes[step] == 0:
                continue
            if step == 3:
                x = adjust_hue(x, factors[3], inplace=True)
                continue
            f = _per_sample(factors[step], x)
            if step == 0:  # brightness: blend with black
                x.mul_(f)
            elif step == 1:  # contrast: blend with the mean luma of each image
                mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
                x.mul_(f).add_(mean * (1.0 - f))
            else:  # saturation: blend with the luma image
                gray = _gray(x) * (1.0 - f)
                x.mul_(f).add_(gray)
            x.clamp_(0.0, 1.0)
        return x


class RandomGrayscale(nn.Module):
    """Replaces each RGB sample, with probability ``p``, by its luma replicated to 3 channels.

    Shapes:
        ``(B, 3, H, W) -> (B, 3, H, W)``.

    References:
        Chen et al., arXiv:2002.05709, Appendix A: p = 0.2.
    """

    def __init__(self, p: Probability = 0.2, inplace: bool = False) -> None:
        super().__init__()
        self.p = _check_probability("grayscale_p", p)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def forward(self, images: Tensor) -> Tensor:
        if _never(self.p):
            return images
        if images.shape[1] != 3:
            raise ValueError(f"grayscale conversion needs RGB images, got {images.shape[1]} channel(s)")
        gate = _per_sample(_gate(self.p, images.shape[0], images.device), images)
        gray = kornia.color.rgb_to_grayscale(images).expand_as(images)
        x = images if self.inplace else images.clone()
        return x.lerp_(gray, gate)


class RandomGaussianBlur(nn.Module):
    """Blurs each sample with probability ``p`` by a Gaussian of its own random sigma.

    Sigma is uniform in ``sigma`` (pixels), the kernel ``kernel_size`` wide (see
    ``blur_kernel_size``), borders reflected. Only the selected samples are blurred, because
    blur is the costliest intensity step and BYOL's second view blurs only 10% of them.

    Shapes:
        ``(B, C, H, W) -> (B, C, H, W)``.

    References:
        Chen et al., arXiv:2002.05709, Appendix A: p = 0.5, sigma in [0.1, 2.0], kernel 10% of
        the image side.
    """

    def __init__(
        self,
        kernel_size: int,
        sigma: tuple[float, float] = (0.1, 2.0),
        p: Probability = 0.5,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"blur kernel size must be odd and >= 3, got {kernel_size}")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma must satisfy 0 < low <= high, got {sigma}")
        self.kernel_size = kernel_size
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.p = _check_probability("blur_p", p)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p}, inplace={self.inplace}"

    def forward(self, images: Tensor) -> Tensor:
        if _never(self.p):
            return images
        batch, device = images.shape[0], images.device
        gate = _gate(self.p, batch, device)
        sigma = _uniform(*self.sigma, (batch, 1), device).expand(batch, 2)
        kernel = (self.kernel_size, self.kernel_size)
        if _always(self.p):
            return kornia.filters.gaussian_blur2d(images, kernel, sigma, border_type="reflect")
        index = gate.nonzero().squeeze(1)
        x = images if self.inplace else images.clone()
        if index.numel():
            x[index] = kornia.filters.gaussian_blur2d(x[index], kernel, sigma[index], border_type="reflect")
        return x


class RandomSolarize(nn.Module):
    """Solarizes each sample with probability ``p``: pixels ``x >= threshold`` become ``1 - x``.

    Shapes:
        ``(B, C, H, W) -> (B, C, H, W)``.

    References:
        Grill et al., "Bootstrap Your Own Latent", arXiv:2006.07733, Table 6: threshold 0.5,
        p = 0.2 on the second view only.
    """

    def __init__(self, p: Probability = 0.2, threshold: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = _check_probability("solarize_p", p)
        self.threshold = float(threshold)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"p={self.p}, threshold={self.threshold}, inplace={self.inplace}"

    def forward(self, images: Tensor) -> Tensor:
        if _never(self.p):
            return images
        gate = _per_sample(_gate(self.p, images.shape[0], images.device), images)
        # With c = gate * [x >= t] in {0, 1}: x + c (1 - 2x) is 1 - x where c = 1, else x.
        # Written as x (1 - 2c) + c it needs a single full-size temporary.
        change = torch.ge(images, self.threshold, out=torch.empty_like(images)).mul_(gate)
        x = images if self.inplace else images.clone()
        return x.addcmul_(change, x, value=-2.0).add_(change)


class Normalize(nn.Module):
    """Standardises ``(B, C, H, W)`` images per channel: ``(x - mean) / std``.

    ``mean`` and ``std`` have one entry per channel, or a single entry used for all channels.
    They are non-persistent buffers, so they follow ``.to(device)`` without entering
    checkpoints (they come from the config).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be non-empty sequences of equal length, got {mean} and {std}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, inplace={self.inplace}"

    def forward(self, images: Tensor) -> Tensor:
        channels = images.shape[1]
        if self.mean.shape[1] not in (1, channels):
            raise ValueError(f"normalisation has {self.mean.shape[1]} channel(s), images have {channels}")
        mean, std = self.mean.to(images.dtype), self.std.to(images.dtype)
        if self.inplace:
            return images.sub_(mean).div_(std)
        return (images - mean) / std


class CenterResize(nn.Module):
    """Resizes the shorter side to ``size`` (antialiased bilinear) and centre-crops a square.

    Deterministic; returns the input unchanged when it is already ``size x size``.

    Shapes:
        ``(B, C, H, W) -> (B, C, size, size)``.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size

    def extra_repr(self) -> str:
        return f"size={self.size}"

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height == width == self.size:
            return images
        if min(height, width) != self.size:
            images = kornia.geometry.transform.resize(
                images, self.size, interpolation="bilinear", side="short", antialias=True, align_corners=False
            )
        height, width = images.shape[-2:]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return images[..., top : top + self.size, left : left + self.size]
