"""Tests for selfsup.eval.hog: equal to scikit-image's HOG, batched, shaped as hog_dim."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval import hog, hog_dim
from selfsup.eval.hog import BLOCK_NORMS
from tests.conftest import FASHION_MNIST

# float32 features against a float64 reference: rounding is ~1e-7; one pixel in the wrong
# bin would move a feature by ~1e-2.
TOL = 1e-4


def _random_images(n: int, channels: int = 1, size: tuple[int, int] = (28, 28), seed: int = 0) -> Tensor:
    return torch.rand(n, channels, *size, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n: int, seed: int = 1) -> Tensor:
    """Bilinearly upsampled 7x7 noise: slowly varying gradients in every direction."""
    low = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=True)


def _quantised_images(n: int, seed: int = 8) -> Tensor:
    """Random k/255 pixels: |g_row| == |g_col| (45 and 135 degrees) at about one pixel in 500.

    Computed in float32, those gradients land on either side of a 45-degree bin edge, so
    these images tell a float64-exact binning from a float32 one.
    """
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)).float() / 255


def _garment_images(n: int, seed: int = 2) -> Tensor:
    """Fashion-MNIST-like: a textured ellipse-and-sleeves silhouette on black, quantised to k/255.

    Flat regions give zero gradients (eps and empty blocks matter) and the quantised values
    give gradients at exactly 0, 45, 90 and 135 degrees (bin edges for 4 or 8 orientations).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(28.0).view(28, 1)
    cols = torch.arange(28.0).view(1, 28)
    images = []
    for _ in range(n):
        cy, cx, ry, rx = (torch.rand(4, generator=gen) * torch.tensor([6.0, 6.0, 6.0, 4.0]) + 11.0).tolist()
        body = ((rows - cy) / ry) ** 2 + ((cols - cx) / (rx - 4.0)) ** 2 <= 1.0
        sleeves = (rows >= cy - ry + 2) & (rows <= cy - ry + 8) & ((cols - cx).abs() <= rx)
        level = 0.3 + 0.6 * torch.rand(1, generator=gen)
        texture = 0.15 * torch.rand(28, 28, generator=gen)
        images.append(torch.where(body | sleeves, level + texture, 0.0))
    return (torch.stack(images).unsqueeze(1).clamp(0, 1) * 255).round() / 255


def _fashion_mnist(n: int) -> Tensor:
    """The first ``n`` real Fashion-MNIST training images in [0, 1]."""
    with gzip.open(FASHION_MNIST, "rb") as f:
        data = f.read(16 + n * 28 * 28)[16:]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).view(n, 1, 28, 28).float() / 255


def _skimage_hog(images: Tensor, orientations: int, cells: int, block: int, norm: str) -> np.ndarray:
    """scikit-image's HOG of each image, in float64 on the same (float32) pixel values."""
    feature = pytest.importorskip("skimage.feature")
    channel_axis = -1 if images.shape[1] > 1 else None
    out = []
    for image in images.double().numpy():
        image = np.moveaxis(image, 0, -1) if channel_axis is not None else image[0]
        out.append(
            feature.hog(
                image,
                orientations=orientations,
                pixels_per_cell=(cells, cells),
                cells_per_block=(block, block),
                block_norm=norm,
                transform_sqrt=False,
                feature_vector=True,
                channel_axis=channel_axis,
            )
        )
    return np.stack(out)


IMAGES = {
    "random": lambda: _random_images(12),
    "smooth": lambda: _smooth_images(12),
    "garments": lambda: _garment_images(12),
    "quantised": lambda: _quantised_images(12),
    "rgb": lambda: _random_images(8, channels=3, seed=3),
    "rgb_garments": lambda: torch.cat([_garment_images(8, seed=4), _garment_images(8, seed=5), _smooth_images(8)], 1),
    "30x26": lambda: _random_images(6, size=(30, 26), seed=6),
}

SETTINGS = [
    ("random", 9, 4, 2, "L2-Hys"),  # the 1296-d Fashion-MNIST baseline
    ("smooth", 9, 4, 2, "L2-Hys"),
    ("garments", 9, 4, 2, "L2-Hys"),
    ("random", 9, 8, 2, "L2-Hys"),  # the paper's cells; 4 px left over at the border
    ("garments", 9, 8, 2, "L2-Hys"),
    ("random", 9, 4, 2, "L1"),
    ("garments", 9, 4, 2, "L1"),
    ("random", 9, 4, 2, "L2"),
    ("smooth", 9, 4, 2, "L2"),
    ("random", 9, 4, 2, "L1-sqrt"),
    ("garments", 9, 4, 2, "L1-sqrt"),
    ("garments", 8, 4, 2, "L2-Hys"),  # 45 and 90 degrees are bin edges
    ("quantised", 8, 4, 2, "L2-Hys"),
    ("quantised", 4, 4, 2, "L1"),
    ("garments", 4, 4, 3, "L1"),
    ("smooth", 7, 5, 2, "L2"),
    ("rgb", 9, 4, 2, "L2-Hys"),
    ("rgb_garments", 9, 4, 2, "L2-Hys"),
    ("30x26", 9, 4, 2, "L2-Hys"),
]


@pytest.mark.parametrize(("kind", "orientations", "cells", "block", "norm"), SETTINGS)
def test_hog_equals_skimage(kind: str, orientations: int, cells: int, block: int, norm: str) -> None:
    images = IMAGES[kind]()
    ref = _skimage_hog(images, orientations, cells, block, norm)
    out = hog(images, orientations, cells, block, norm)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    assert np.abs(out.double().numpy() - ref).max() < TOL


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Fashion-MNIST not available")
@pytest.mark.parametrize("orientations", [9, 8])
def test_hog_equals_skimage_on_fashion_mnist(orientations: int) -> None:
    images = _fashion_mnist(32)
    ref = _skimage_hog(images, orientations, 4, 2, "L2-Hys")
    assert np.abs(hog(images, orientations).double().numpy() - ref).max() < TOL


def _hog_loops(image: np.ndarray, orientations: int, cells: int, block: int) -> np.ndarray:
    """HOG of one ``(H, W)`` image written as plain float64 loops (Dalal & Triggs, L2-Hys)."""
    height, width = image.shape
    n_rows, n_cols = height // cells, width // cells
    hist = np.zeros((n_rows, n_cols, orientations))
    for r in range(n_rows * cells):
        for c in range(n_cols * cells):
            g_row = image[r + 1, c] - image[r - 1, c] if 0 < r < height - 1 else 0.0
            g_col = image[r, c + 1] - image[r, c - 1] if 0 < c < width - 1 else 0.0
            angle = math.degrees(math.atan2(g_row, g_col)) % 180.0
            hist[r // cells, c // cells, int(angle // (180.0 / orientations))] += math.hypot(g_row, g_col)
    hist /= cells * cells
    out = []
    for r in range(n_rows - block + 1):
        for c in range(n_cols - block + 1):
            v = hist[r : r + block, c : c + block].ravel()
            v = np.minimum(v / math.sqrt((v**2).sum() + 1e-10), 0.2)
            out.append(v / math.sqrt((v**2).sum() + 1e-10))
    return np.concatenate(out)


def test_hog_equals_plain_loops() -> None:
    """Runs without scikit-image: the definition written out, on random 16x20 images."""
    images = _random_images(3, size=(16, 20), seed=7)
    ref = np.stack([_hog_loops(image[0].double().numpy(), 6, 4, 2) for image in images])
    assert np.abs(hog(images, 6, 4, 2).double().numpy() - ref).max() < TOL


def test_batched_equals_per_image() -> None:
    images = torch.cat([_random_images(4), _smooth_images(4), _garment_images(4)])
    batched = hog(images)
    single = torch.cat([hog(image[None]) for image in images])
    assert (batched - single).abs().max() < 1e-6


@pytest.mark.parametrize(
    ("size", "orientations", "cells", "block"),
    [((28, 28), 9, 4, 2), ((28, 28), 9, 8, 2), ((32, 24), 12, 4, 3), ((9, 13), 4, 3, 1)],
)
def test_shape_is_hog_dim(size: tuple[int, int], orientations: int, cells: int, block: int) -> None:
    out = hog(_random_images(2, channels=2, size=size), orientations, cells, block)
    assert out.shape == (2, hog_dim(size, orientations, cells, block))
    assert hog_dim(28) == 1296  # the Fashion-MNIST descriptor
    if size[0] == size[1]:
        assert hog_dim(size[0], orientations, cells, block) == out.shape[1]


@pytest.mark.parametrize("norm", BLOCK_NORMS)
def test_constant_image_gives_zeros(norm: str) -> None:
    images = torch.cat([torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 0.7)])
    out = hog(images, block_norm=norm)
    assert torch.isfinite(out).all()
    assert (out == 0).all()


def test_dtypes_and_scale() -> None:
    images = _garment_images(3)
    as_uint8 = (images * 255).round().to(torch.uint8)
    out = hog(images)
    assert hog(as_uint8).dtype == torch.float32
    assert hog(images.double()).dtype == torch.float64
    # HOG ignores the pixel scale up to eps: uint8 pixels give the [0, 1] features.
    assert (hog(as_uint8) - out).abs().max() < TOL


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 8x8"):
        hog(torch.rand(1, 1, 7, 28))
    with pytest.raises(ValueError, match="block_norm"):
        hog(torch.rand(1, 1, 28, 28), block_norm="L3")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hog(torch.rand(28, 28))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    images = torch.cat([_random_images(8), _garment_images(8)])
    out = hog(images.cuda())
    assert out.device.type == "cuda"
    assert (out.cpu() - hog(images)).abs().max() < 1e-5


def test_hog_baseline_is_unchanged_by_the_eval_views_normalisation() -> None:
    """The baseline encoder sees normalised images; a per-channel affine change of intensity
    leaves the L2-Hys descriptor as it is, up to the block epsilon."""
    from selfsup.engine.evaluation import HOGFeatures

    images = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(HOGFeatures()((images - 0.29) / 0.35), HOGFeatures()(images), atol=1e-4, rtol=1e-4)
