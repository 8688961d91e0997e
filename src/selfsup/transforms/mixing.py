"""Batched mixup and CutMix: mix every sample with a random partner from the same batch.

Both draw a permutation of the batch (the partners) and a mixing weight ``lam`` from
``Beta(alpha, alpha)``, and return soft labels ``lam * y + (1 - lam) * y[partner]`` that sum to
one per sample. By default one ``lam`` (and for CutMix one box) is shared by the batch, as in
both papers' reference code; ``per_sample=True`` draws one per sample instead, still without
a Python loop.

Randomness comes only from ``generator`` (or torch's global RNG when it is ``None``). torch's
Beta sampler takes no generator, so ``lam`` is drawn inside ``torch.random.fork_rng`` from a
seed taken from ``generator``: the draw is reproducible and the global RNG is left untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cutmix", "mixup"]


def _check(images: Tensor, labels: Tensor, alpha: float) -> None:
    if images.ndim != 4 or labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images (B, C, H, W) and one-hot labels (B, K), got {tuple(images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not labels.is_floating_point():
        raise TypeError(f"labels must be one-hot or soft float labels (B, K), got {labels.dtype}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _beta(alpha: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Draws ``(n,)`` samples of ``Beta(alpha, alpha)`` from ``generator`` (CPU, moved to device)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        concentration = torch.tensor(float(alpha))
        lam = torch.distributions.Beta(concentration, concentration).sample((n,))
    return lam.to(device)


def _partners(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randperm(n, generator=generator).to(device)


def mixup(
    images: Tensor,
    labels: Tensor,
    alpha: float = 0.2,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """Blends every image and label with a random partner's: ``lam * x + (1 - lam) * x[j]``.

    Args:
        images: ``(B, C, H, W)`` float images (normalised or not; mixing is linear).
        labels: ``(B, K)`` one-hot or soft labels.
        alpha: Beta concentration; ``lam ~ Beta(alpha, alpha)``.
        generator: CPU generator for the partners and ``lam``; ``None`` uses torch's global RNG.
        per_sample: one ``lam`` per sample instead of one per batch.

    Returns:
        ``(B, C, H, W)`` mixed images and ``(B, K)`` mixed labels.

    References:
        Zhang et al., "mixup: Beyond Empirical Risk Minimization", arXiv:1710.09412 (alpha in
        [0.1, 0.4] on ImageNet, 0.2 as the default here; alpha = 1 on CIFAR-10).
    """
    _check(images, labels, alpha)
    batch = images.shape[0]
    partner = _partners(batch, generator, images.device)
    lam = _beta(alpha, batch if per_sample else 1, generator, images.device)
    lam_images = lam.to(images.dtype).view(-1, 1, 1, 1)
    lam_labels = lam.to(labels.dtype).view(-1, 1)
    mixed = torch.lerp(images[partner], images, lam_images)
    return mixed, torch.lerp(labels[partner], labels, lam_labels)


def cutmix(
    images: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pastes a random box of a partner image into every image; labels mix by pasted area.

    The box has area fraction ``1 - lam`` (sides ``sqrt(1 - lam)`` of the image's), a centre
    uniform over the image, and is clipped at the borders; ``lam`` is then corrected to the
    area actually kept, so the labels match the pixels exactly.

    Args:
        images: ``(B, C, H, W)`` float images.
        labels: ``(B, K)`` one-hot or soft labels.
        alpha: Beta concentration; ``lam ~ Beta(alpha, alpha)`` (1.0: uniform, the paper's).
        generator: CPU generator for partners, ``lam`` and boxes; ``None``: global RNG.
        per_sample: one ``lam`` and box per sample instead of one per batch (the paper's
            reference code shares them across the batch).

    Returns:
        ``(B, C, H, W)`` mixed images and ``(B, K)`` mixed labels.

    References:
        Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
        Localizable Features", arXiv:1905.04899 (alpha = 1).
    """
    _check(images, labels, alpha)
    batch, _, height, width = images.shape
    device = images.device
    partner = _partners(batch, generator, device)
    n = batch if per_sample else 1
    lam = _beta(alpha, n, generator, device)
    cut = torch.sqrt(1.0 - lam)
    # Integer box sides and a uniformly placed centre, as in the reference implementation.
    cut_h, cut_w = torch.floor(height * cut), torch.floor(width * cut)
    centre = torch.rand(n, 2, generator=generator).to(device) * torch.tensor([height, width], device=device)
    y0 = torch.clamp(torch.floor(centre[:, 0] - cut_h / 2), 0, height)
    y1 = torch.clamp(torch.floor(centre[:, 0] + cut_h / 2), 0, height)
    x0 = torch.clamp(torch.floor(centre[:, 1] - cut_w / 2), 0, width)
    x1 = torch.clamp(torch.floor(centre[:, 1] + cut_w / 2), 0, width)

    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # (n, H)
    inside_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # (n, W)
    box = (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)  # (n, 1, H, W)
    mixed = torch.where(box, images[partner], images)

    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    mixed_labels = torch.lerp(labels[partner], labels, kept.to(labels.dtype).view(-1, 1))
    return mixed, mixed_labels
