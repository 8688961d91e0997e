"""Evaluation of a run's encoder against the baselines (random-init encoder, raw pixels, HOG).

Features always come from un-augmented images (the "eval" view recipe) with the encoder in
eval mode; the evaluation functions themselves live in ``selfsup.eval``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import EvalConfig
from selfsup.data import ImageDataset
from selfsup.data.loader import iterate_eval
from selfsup.eval import clustering_metrics, extract_features
from selfsup.eval import evaluate_features as eval_features
from selfsup.eval.hog import hog
from selfsup.eval.retrieval import retrieval_metrics
from selfsup.methods.base import Method
from selfsup.nn.distributed import rank as dist_rank
from selfsup.nn.distributed import world_size as dist_world_size
from selfsup.transforms import to_float


def _limited(batches: Iterator[tuple[Tensor, ...]], limit: int | None) -> Iterator[tuple[Tensor, ...]]:
    """The first ``limit`` samples of an in-order batch stream."""
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + batch[0].shape[0] > limit:
            batch = tuple(t[: limit - seen] for t in batch)
        seen += batch[0].shape[0]
        yield batch


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (BN running statistics, no dropout) for the block, then the previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def shard(n: int, rank: int, world_size: int) -> range:
    """This process's contiguous share of ``range(n)``: shares differ in size by at most one
    and, concatenated in rank order, give ``range(n)`` back."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def encode(
    encoder: Callable[[Tensor], Tensor],
    dataset: ImageDataset,
    eval_views: nn.Module,
    device: torch.device,
    batch_size: int = 512,
    limit: int | None = None,
    precision: str = "fp32",
    num_workers: int | None = 0,
    gather: bool = False,
) -> tuple[Tensor, Tensor]:
    """Features ``(N, D)`` float32 and labels ``(N,)`` of (the first ``limit`` of) a split.

    With ``gather`` and several processes, each process encodes only its contiguous shard
    of the ``N`` samples and the shards are gathered in rank order, so every process returns
    the same ``(N, D)`` in dataset order, as a single process would (encoding the whole split
    everywhere and gathering would repeat every sample ``world_size`` times).
    """

    def preprocess(images: Tensor) -> Tensor:
        return eval_views(to_float(images.to(device, non_blocking=True)))[0]

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if gather and dist_world_size() > 1:
        dataset, limit = dataset.subset(list(shard(n, dist_rank(), dist_world_size()))), None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        features, labels = extract_features(
            encoder,
            _limited(iterate_eval(dataset, batch_size, num_workers), limit),
            preprocess=preprocess,
            device=device,
            gather=gather,
        )
    return features.float(), labels


def evaluate_features(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    cfg: EvalConfig,
    linear: bool | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """kNN at every ``cfg.knn_k``, (optionally) a linear probe and the collapse monitors of the
    test features, as one flat metric dict (the probe's chosen weight decay and validation
    score are left out)."""
    metrics = eval_features(
        train[0],
        train[1],
        test[0],
        test[1],
        num_classes=num_classes,
        knn_k=cfg.knn_k,
        knn_temperature=cfg.knn_temperature,
        linear=cfg.linear if linear is None else linear,
        linear_epochs=cfg.linear_epochs,
        collapse_monitors=True,
        seed=seed,
    )
    keep = ("knn_", "linear_top", *MONITOR_COLUMNS)
    metrics = {k: v for k, v in metrics.items() if k.startswith(keep)}
    return {**metrics, **frozen_protocol_metrics(train, test, num_classes, cfg.cluster, cfg.retrieval, seed)}


def frozen_protocol_metrics(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    cluster: bool,
    retrieval: bool,
    seed: int = 0,
) -> dict[str, float]:
    """The frozen-feature protocols beyond kNN and the linear probe: k-means on the test
    features (k = ``num_classes``; ``cluster_acc``, ``nmi``, ``ari``) and test-to-train
    retrieval (``retrieval_map@r``, ``retrieval_recall@1``, ``retrieval_recall@5``)."""
    metrics: dict[str, float] = {}
    if cluster:
        metrics.update(clustering_metrics(test[0], test[1], num_classes, seed=seed))
    if retrieval:
        metrics.update(retrieval_metrics(test[0], test[1], train[0], train[1], ks=(1, 5)))
    return metrics


def evaluate_encoder(
    encoder: Callable[[Tensor], Tensor],
    module: nn.Module,
    train_set: ImageDataset,
    test_set: ImageDataset,
    num_classes: int,
    eval_views: nn.Module,
    cfg: EvalConfig,
    device: torch.device,
    precision: str = "fp32",
    limit: int | None = None,
    linear: bool | None = None,
    seed: int = 0,
    gather: bool = False,
) -> dict[str, float]:
    """Extracts train and test features with ``encoder`` (``module`` in eval mode) and scores them."""
    with eval_mode(module):
        train = encode(encoder, train_set, eval_views, device, cfg.batch_size, limit, precision, gather=gather)
        test = encode(encoder, test_set, eval_views, device, cfg.batch_size, limit, precision, gather=gather)
    return evaluate_features(train, test, num_classes, cfg, linear, seed)


def tokenizer_metrics(
    method: Method,
    dataset: ImageDataset,
    eval_views: nn.Module,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int | None = 0,
) -> dict[str, float]:
    """``method.evaluate_tokens`` over every image of ``dataset`` (the test split), un-augmented
    and normalised by the eval view, in float32: reconstruction error and codebook use of a
    tokenizer; ``{}`` for a method that is none (the images are then never read)."""

    def batches() -> Iterator[Tensor]:
        for images, *_ in iterate_eval(dataset, batch_size, num_workers):
            yield eval_views(to_float(images.to(device, non_blocking=True)))[0]

    return method.evaluate_tokens(batches())


def format_tokenizer_metrics(metrics: dict[str, float], split: str = "test") -> str:
    """One line: ``tokenizer (test split): reconstruction 0.0412, 93.6% of 512 codes used,
    perplexity 301.2``."""
    return (
        f"tokenizer ({split} split): reconstruction {metrics['tokenizer_reconstruction']:.4f}, "
        f"{100 * metrics['codebook_usage']:.1f}% of {metrics['codebook_size']:.0f} codes used, "
        f"perplexity {metrics['codebook_perplexity']:.1f}"
    )


class HOGFeatures(nn.Module):
    """``(B, C, H, W) -> (B, D)`` HOG descriptors (Dalal & Triggs 2005) as a baseline encoder:
    9 orientations, 4-pixel cells, 2x2-cell blocks, L2-Hys (1296-d on 28 px), the handcrafted
    bar a learned encoder should clear. Computed on the eval view's normalised images: a
    per-channel affine change of intensity scales every gradient alike, which the block
    normalisation removes (up to its epsilon)."""

    def forward(self, images: Tensor) -> Tensor:
        return hog(images, orientations=9, pixels_per_cell=4, cells_per_block=2, block_norm="L2-Hys")


def baseline_rows(
    train_set: ImageDataset,
    test_set: ImageDataset,
    num_classes: int,
    eval_views: nn.Module,
    cfg: EvalConfig,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """The encoder-free baselines of every results table under the same kNN and linear probe:
    raw pixels (the eval view's normalised pixels, flattened) and :class:`HOGFeatures`."""
    encoders: dict[str, nn.Module] = {"raw pixels": nn.Flatten(), "HOG": HOGFeatures()}
    return {
        name: evaluate_encoder(encoder, encoder, train_set, test_set, num_classes, eval_views, cfg, device)
        for name, encoder in encoders.items()
    }


MONITOR_COLUMNS = ("feature_std", "effective_rank")
#: Scores of the cluster, retrieval and dense protocols (fractions, shown in percent like accuracies).
PROTOCOL_COLUMNS = (
    *("cluster_acc", "nmi", "ari", "retrieval_map@r", "retrieval_recall@1", "retrieval_recall@5"),
    *("dense_miou", "dense_pixel_acc"),
)


def _cell(column: str, metrics: dict[str, Any]) -> str:
    if column not in metrics:
        return "-"
    if column == "feature_std":
        return f"{metrics[column]:.4f}"
    if column in MONITOR_COLUMNS:
        return f"{metrics[column]:.1f}"
    return f"{100 * metrics[column]:.2f}"


def format_table(rows: dict[str, dict[str, Any]], title: str = "") -> str:
    """A plain-text table: one row per encoder, one column per top-1 accuracy (the metrics
    are fractions; the table shows percent), then the collapse monitors when present."""
    columns: list[str] = []
    for metrics in rows.values():
        shown = [k for k in metrics if "top1" in k or k in MONITOR_COLUMNS or k in PROTOCOL_COLUMNS]
        columns += [k for k in shown if k not in columns]
    name_width = max([len("encoder")] + [len(r) for r in rows])
    widths = [max(len(c), 6) for c in columns]
    lines = [title] if title else []
    header = "encoder".ljust(name_width) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    lines += [header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = [_cell(c, metrics) for c in columns]
        lines.append(name.ljust(name_width) + "  " + "  ".join(v.rjust(w) for v, w in zip(cells, widths)))
    return "\n".join(lines)
