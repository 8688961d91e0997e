"""Feature extraction from a frozen encoder, optionally gathered from every process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["extract_features"]


def _dist_ready() -> bool:
    """Return True when torch.distributed can be used (available and initialised)."""
    return dist.is_available() and dist.is_initialized()


def _owning_module(encoder: Callable[[Tensor], Tensor] | nn.Module) -> nn.Module | None:
    """Return the module behind an encoder: itself, or the owner of a bound method."""
    if isinstance(encoder, nn.Module):
        return encoder
    # e.g. ``method.embed``: its BatchNorm and dropout must be switched to eval mode too.
    owner = getattr(encoder, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _infer_device(module: nn.Module | None) -> torch.device:
    """Return the device of a module's first parameter or buffer, else CPU."""
    if module is not None:
        for param in module.parameters():
            return param.device
        for buffer in module.buffers():
            return buffer.device
    return torch.device("cpu")


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    """Return ``(images, labels)`` from a ``(images, labels, ...)`` batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise TypeError(f"each batch must be a tuple or list (images, labels, ...); got {type(batch).__name__}")


def _all_gather_uneven(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (n_r, ...) from every rank in rank order, sizes may differ.

    ``dist.all_gather`` needs equal shapes, so each rank pads its rows to the largest size,
    gathers, and the padding is trimmed away using the gathered sizes.
    """
    # NCCL only moves CUDA tensors; every other backend used here (gloo) moves CPU ones.
    if dist.get_backend() == "nccl":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    else:
        comm_device = torch.device("cpu")
    local = tensor.to(comm_device)
    world_size = dist.get_world_size()

    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    max_rows = max(counts)

    padded = local.new_zeros((max_rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]).cpu()


def extract_features(
    encoder: Callable[[Tensor], Tensor] | nn.Module,
    batches: Iterable[Sequence[Any]],
    preprocess: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    gather: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run a frozen encoder over labelled batches and return its features and the labels.

    Each batch is a tuple ``(images, labels, ...)``; extra fields (e.g. indices) are ignored.
    Images go to ``device``, through ``preprocess`` (e.g. uint8 -> normalised float), then
    through ``encoder``. Outputs with more than two dimensions are flattened per sample.

    An ``nn.Module`` encoder (or the module owning a bound-method encoder such as
    ``method.embed``) is put in eval mode for the duration, so BatchNorm uses (and
    never updates) its running statistics and dropout is off; afterwards every submodule gets
    back its own previous ``training`` flag (a model with deliberately frozen BN stays so).
    Nothing is moved: ``device`` defaults to the encoder's parameter device, else CPU.

    Args:
        encoder: ``(B, C, H, W) -> (B, D)`` callable or module.
        batches: iterable of ``(images (B, C, H, W), labels (B,), ...)``.
        preprocess: optional transform applied to each image batch on ``device``.
        device: where images are sent and the encoder runs.
        gather: if True and torch.distributed is initialised, return the features and labels
            of every process concatenated in rank order (per-rank sizes may differ). Use a
            sampler that does not pad with duplicates (DistributedSampler does) if every
            sample must count exactly once.

    Returns:
        ``features`` ``(N, D)`` float32 on CPU and ``labels`` ``(N,)`` int64 on CPU.
    """
    module = _owning_module(encoder)
    run_device = torch.device(device) if device is not None else _infer_device(module)

    saved_modes: list[tuple[nn.Module, bool]] = []
    if module is not None:
        saved_modes = [(m, m.training) for m in module.modules()]
        module.eval()

    feature_chunks: list[Tensor] = []
    label_chunks: list[Tensor] = []
    try:
        # no_grad rather than inference_mode: inference tensors cannot be saved for backward,
        # and a linear probe trained on these features needs exactly that.
        with torch.no_grad():
            for batch in batches:
                images, labels = _unpack(batch)
                images = images.to(run_device, non_blocking=True)
                if preprocess is not None:
                    images = preprocess(images)
                out = encoder(images)
                if not isinstance(out, Tensor):
                    raise TypeError(f"encoder must return a Tensor, got {type(out).__name__}")
                if out.shape[0] != labels.reshape(-1).shape[0]:
                    raise ValueError(f"encoder returned {out.shape[0]} rows for {labels.reshape(-1).shape[0]} labels")
                # Accumulate on CPU so device memory stays bounded by one batch.
                feature_chunks.append(out.reshape(out.shape[0], -1).float().cpu())
                label_chunks.append(labels.reshape(-1).to(torch.int64).cpu())
    finally:
        for module, was_training in saved_modes:
            module.training = was_training

    if not feature_chunks:
        raise ValueError("batches yielded no data")
    features = torch.cat(feature_chunks)
    labels_all = torch.cat(label_chunks)

    if gather and _dist_ready():
        features = _all_gather_uneven(features)
        labels_all = _all_gather_uneven(labels_all)
    return features, labels_all
