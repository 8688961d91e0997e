"""Batched RandAugment: every sample applies ``num_layers`` ops drawn uniformly from a list.

InfoMin's augmentation ("InfoMin Aug") adds RandAugment to MoCo v2's recipe. The authors'
code (PyContrast, ``rand_augment_transform('rand-n2-m10-mstd0.5')``, after timm) applies
``n = 2`` ops per image, each drawn uniformly with replacement from 15 and applied with
probability 0.5, at a magnitude drawn per application from ``N(10, 0.5)`` clipped to
``[0, 10]``. The level-to-argument maps follow that code (magnitude ``m`` on a 0..10 scale):

==============  ==============================================================================
op              effect on an image in [0, 1]
==============  ==============================================================================
auto_contrast   each channel stretched to [min, max] -> [0, 1]
equalize        each channel's 256-bin histogram equalised (PIL's ``ImageOps.equalize`` rule)
invert          ``1 - x``
rotate          ``+-30 m/10`` degrees about the centre (random sign), fill = dataset mean
posterize       keep the ``int(4 m/10)`` most significant of 8 bits
solarize        pixels ``>= int(256 m/10) / 255`` become ``1 - x``
solarize_add    pixels ``< 128/255`` get ``+ int(110 m/10) / 255`` (clipped)
color           saturation blend with the luma, factor ``1.8 m/10 + 0.1`` (RGB only)
contrast        blend with the image's mean luma, same factor
brightness      blend with black, same factor
sharpness       blend with PIL's 3x3 SMOOTH filter (border pixels kept), same factor
shear_x/_y      shear ``+-0.3 m/10`` (random sign) about the centre, fill = dataset mean
translate_x/_y  shift ``+-0.45 m/10`` of the side (random sign), fill = dataset mean
==============  ==============================================================================

Batched: per layer, every sample draws its op, gate and magnitude in three vectorised calls;
the loop runs over the 15 ops (each applied once to the samples that drew it), never over
samples. Geometric ops use one bilinear ``grid_sample`` on their samples, about their
centre (PIL shears about the top-left corner: the same shear plus a shift).

References: Cubuk, Zoph, Shlens & Le 2020, "RandAugment: Practical automated data
augmentation with a reduced search space", arXiv:1909.13719; Tian et al. 2020, "What Makes
for Good Views for Contrastive Learning?", arXiv:2005.10243 (InfoMin Aug).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RAND_AUGMENT_OPS", "RandAugment"]

RAND_AUGMENT_OPS = (
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
"""The 15 ops of the authors' RandAugment list (timm's ``_RAND_TRANSFORMS``), in its order."""

_MAX_LEVEL = 10.0
# ITU-R 601-2 luma, PIL's "L" conversion.
_LUMA = (0.299, 0.587, 0.114)


def _col(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    """``(n, C, H, W) -> (n, 1, H, W)``: the luma of RGB, the channel itself for grey."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _factor(m: Tensor) -> Tensor:
    # Enhancement factor in [0.1, 1.9] (no random sign in the authors' code).
    return m / _MAX_LEVEL * 1.8 + 0.1


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``ImageEnhance``: ``degenerate + factor (x - degenerate)``, clipped to [0, 1]."""
    return (degenerate + _col(factor) * (x - degenerate)).clamp_(0.0, 1.0)


def _affine(x: Tensor, matrix: Tensor, fill: Tensor) -> Tensor:
    """Warps ``x (n, C, H, W)`` by ``matrix (n, 2, 3)`` (output -> input, normalised
    coordinates), bilinear; what falls outside is ``fill (C,)``."""
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    f = fill.to(x.dtype).view(1, -1, 1, 1)
    return F.grid_sample(x - f, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + f


def _shift_matrix(n: int, dx: Tensor, dy: Tensor, device: torch.device) -> Tensor:
    m = torch.zeros(n, 2, 3, device=device)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    m[:, 0, 2] = dx
    m[:, 1, 2] = dy
    return m


def auto_contrast(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    # A flat channel stays as it is (PIL leaves it unchanged).
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x)


def equalize(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    n, c, h, w = x.shape
    q = (x * 255.0).round_().clamp_(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    # PIL: step = (pixels - count of the highest non-empty bin) // 255; lut[i] = (cdf_before(i) + step // 2) // step.
    last = 255 - torch.flip(hist > 0, dims=[1]).float().argmax(dim=1, keepdim=True)
    step = torch.div(h * w - hist.gather(1, last), 255, rounding_mode="floor")
    before = hist.cumsum(dim=1) - hist
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    lut = torch.where(step > 0, lut.clamp_(max=255), torch.arange(256, device=x.device, dtype=lut.dtype))
    return (lut.gather(1, q) / 255.0).view(n, c, h, w).to(x.dtype)


def invert(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    return 1.0 - x


def rotate(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    angle = sign * m / _MAX_LEVEL * math.radians(30.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrix = _shift_matrix(x.shape[0], torch.zeros_like(m), torch.zeros_like(m), x.device)
    matrix[:, 0, 0], matrix[:, 0, 1] = cos, -sin
    matrix[:, 1, 0], matrix[:, 1, 1] = sin, cos
    return _affine(x, matrix, fill)


def posterize(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    bits = torch.floor(m / _MAX_LEVEL * 4.0)  # "PosterizeTpu": keep 0..4 bits
    bucket = _col(torch.exp2(8.0 - bits))
    q = (x * 255.0).round_()
    return torch.floor(q / bucket) * bucket / 255.0


def solarize(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    threshold = _col(torch.floor(m / _MAX_LEVEL * 256.0) / 255.0)
    return torch.where(x >= threshold, 1.0 - x, x)


def solarize_add(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    add = _col(torch.floor(m / _MAX_LEVEL * 110.0) / 255.0)
    return torch.where(x < 128.0 / 255.0, (x + add).clamp_(max=1.0), x)


def color(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x  # saturation is undefined for one channel
    return _blend(_luma(x).expand_as(x), x, _factor(m))


def contrast(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(x), x, _factor(m))


def brightness(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, _factor(m))


def sharpness(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    kernel = x.new_ones(3, 3)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(x.shape[1], 1, 3, 3)
    smooth = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return _blend(smooth, x, _factor(m))


def shear_x(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    matrix = _shift_matrix(x.shape[0], torch.zeros_like(m), torch.zeros_like(m), x.device)
    matrix[:, 0, 1] = sign * m / _MAX_LEVEL * 0.3
    return _affine(x, matrix, fill)


def shear_y(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    matrix = _shift_matrix(x.shape[0], torch.zeros_like(m), torch.zeros_like(m), x.device)
    matrix[:, 1, 0] = sign * m / _MAX_LEVEL * 0.3
    return _affine(x, matrix, fill)


def translate_x(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    # A shift of a fraction s of the width is 2 s in normalised coordinates.
    shift = 2.0 * sign * m / _MAX_LEVEL * 0.45
    return _affine(x, _shift_matrix(x.shape[0], shift, torch.zeros_like(m), x.device), fill)


def translate_y(x: Tensor, m: Tensor, sign: Tensor, fill: Tensor) -> Tensor:
    shift = 2.0 * sign * m / _MAX_LEVEL * 0.45
    return _affine(x, _shift_matrix(x.shape[0], torch.zeros_like(m), shift, x.device), fill)


_Op = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
_OPS: dict[str, _Op] = {
    "auto_contrast": auto_contrast,
    "equalize": equalize,
    "invert": invert,
    "rotate": rotate,
    "posterize": posterize,
    "solarize": solarize,
    "solarize_add": solarize_add,
    "color": color,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}


class RandAugment(nn.Module):
    """Applies ``num_layers`` ops per sample, each drawn uniformly (with replacement) from
    ``ops`` and applied with probability ``p`` at magnitude ``N(magnitude, magnitude_std)``
    clipped to [0, 10] (see the module docstring for each op).

    Args:
        num_layers: ops per sample (InfoMin: 2).
        magnitude: mean magnitude on the 0..10 scale (InfoMin: 10).
        magnitude_std: spread of the per-application magnitude (InfoMin: 0.5).
        p: probability that a drawn op is applied (the authors' code: 0.5).
        fill: per-channel value of pixels uncovered by geometric ops, in [0, 1] (the
            authors' code: the dataset mean).
        ops: names from ``RAND_AUGMENT_OPS`` (default: all 15).

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] -> ``(B, C, H, W)`` in [0, 1] (geometric ops'
        bilinear fill keeps values in range).
    """

    fill: Tensor

    def __init__(
        self,
        num_layers: int = 2,
        magnitude: float = 10.0,
        magnitude_std: float = 0.5,
        p: float = 0.5,
        fill: Sequence[float] = (0.5,),
        ops: Sequence[str] = RAND_AUGMENT_OPS,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"rand_augment_layers must be >= 0 (InfoMin: 2), got {num_layers}")
        if not 0.0 <= magnitude <= _MAX_LEVEL or magnitude_std < 0:
            raise ValueError(
                f"rand_augment_magnitude must be in [0, 10] and its std >= 0 (InfoMin: 10, 0.5), "
                f"got {magnitude}, {magnitude_std}"
            )
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"rand_augment_p must be a probability, got {p}")
        unknown = [name for name in ops if name not in _OPS]
        if unknown or not ops:
            raise ValueError(f"rand_augment_ops must be names from {RAND_AUGMENT_OPS}, got {list(ops)}")
        self.num_layers = num_layers
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.p = float(p)
        self.ops = tuple(ops)
        self.register_buffer("fill", torch.tensor([float(v) for v in fill]), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
            f"p={self.p}, ops={self.ops}"
        )

    def forward(self, images: Tensor) -> Tensor:
        if self.num_layers == 0 or self.p == 0.0:
            return images
        batch, device = images.shape[0], images.device
        fill = self.fill.to(device).expand(images.shape[1]) if self.fill.numel() == 1 else self.fill.to(device)
        x = images.clone()
        for _ in range(self.num_layers):
            choice = torch.randint(len(self.ops), (batch,), device=device)
            applied = torch.rand(batch, device=device) < self.p
            magnitude = (self.magnitude + self.magnitude_std * torch.randn(batch, device=device)).clamp_(0, _MAX_LEVEL)
            sign = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0)
            for k, name in enumerate(self.ops):  # over the ops, each on the samples that drew it
                index = (applied & (choice == k)).nonzero().squeeze(1)
                if index.numel():
                    x[index] = _OPS[name](x[index], magnitude[index], sign[index], fill)
        return x
