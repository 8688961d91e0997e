"""Evaluation protocols of a run's encoder beyond kNN and the linear probe, with baselines.

- ``cluster``: k-means on the frozen test features (k = classes), ACC / NMI / ARI;
- ``retrieval``: test-to-train image retrieval on frozen features, mAP@R and Recall@1/5;
- ``semi``: fine-tuning on 1% and 10% of the labels against the same recipe from random init.

``selfsup eval cluster|retrieval|semi RUN`` call these; a pretraining run computes the same
numbers at its end when ``eval.cluster`` / ``eval.retrieval`` / ``eval.semi`` are set (the
frozen-feature ones inside :func:`selfsup.engine.evaluation.evaluate_features`, so they share
the features of the kNN and the probe). The scoring functions live in :mod:`selfsup.eval`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.engine.build import build_views, random_init_encoder
from selfsup.engine.evaluation import HOGFeatures, encode, eval_mode, frozen_protocol_metrics
from selfsup.engine.finetune import finetune, finetune_encoder, finetune_recipe
from selfsup.eval.semi_supervised import fraction_name, semi_supervised_subsets

if TYPE_CHECKING:
    from collections.abc import Callable

    from selfsup.config import Config
    from selfsup.data.base import DataSplits, ImageDataset
    from selfsup.methods.base import Method

__all__ = [
    "FROZEN_PROTOCOLS",
    "encoder_row_names",
    "finetune_from_config",
    "frozen_protocol_rows",
    "semi_supervised_rows",
    "semi_supervised_splits",
]

#: Protocols on frozen features (no training of the encoder).
FROZEN_PROTOCOLS = ("cluster", "retrieval")


def encoder_row_names(cfg: Config, method: Method | None = None) -> tuple[str, str]:
    """The results.json row names of the run's encoder and of its random-init baseline; when
    the method evaluates its own encoder around the backbone (``embedder()`` with a spec, e.g.
    jigsaw's tiles), the baseline row says so: it is that encoder untrained, not the bare
    backbone that other runs' "random-init <backbone>" rows measure."""
    name, backbone = cfg.method["name"], cfg.backbone["name"]
    own_encoder = method is not None and method.embedder()[1] is not None
    random_row = f"random-init {name} encoder ({backbone})" if own_encoder else f"random-init {backbone}"
    return f"{name} ({backbone})", random_row


def frozen_protocol_rows(
    protocol: str,
    method: Method,
    cfg: Config,
    splits: DataSplits,
    eval_views: nn.Module,
    device: torch.device,
    baselines: bool = False,
    *,
    precision: str,
) -> dict[str, dict[str, float]]:
    """``{row: metrics}`` of ``protocol`` (``"cluster"`` or ``"retrieval"``) for the run's
    encoder and, with ``baselines``, a random-init encoder of the same architecture (seeded
    by ``train.seed``), raw pixels and HOG, all on the un-augmented eval view, encoded at
    ``precision`` (``train.precision`` resolved for the device: ``Components.precision``)."""
    if protocol not in FROZEN_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(FROZEN_PROTOCOLS)}")
    run_row, random_row = encoder_row_names(cfg, method)
    encoders: list[tuple[str, Callable[[Tensor], Tensor], nn.Module]] = [(run_row, method.embed, method)]
    if baselines:
        random_init = random_init_encoder(cfg, splits, method).to(device)
        encoders.append((random_row, random_init, random_init))
        fixed: dict[str, nn.Module] = {"raw pixels": nn.Flatten(), "HOG": HOGFeatures()}
        encoders += [(name, module, module) for name, module in fixed.items()]
    e = cfg.eval
    rows: dict[str, dict[str, float]] = {}
    for name, encoder, module in encoders:
        with eval_mode(module):
            test = encode(encoder, splits.test, eval_views, device, e.batch_size, precision=precision)
            # k-means needs the test features only; retrieval searches the training split.
            train = (
                encode(encoder, splits.train, eval_views, device, e.batch_size, precision=precision)
                if protocol == "retrieval"
                else test
            )
        rows[name] = frozen_protocol_metrics(
            train, test, splits.num_classes, protocol == "cluster", protocol == "retrieval", cfg.train.seed
        )
    return rows


def finetune_from_config(
    encoder: nn.Module,
    num_features: int,
    train: ImageDataset,
    cfg: Config,
    splits: DataSplits,
    eval_views: nn.Module,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """:func:`~selfsup.engine.finetune.finetune` with the ``eval.finetune_*`` recipe of ``cfg``
    on ``train`` (a labelled subset or the whole training split), tested on the test split;
    ``precision``: ``train.precision`` resolved for the device (``Components.precision``)."""
    return finetune(
        encoder,
        num_features,
        train,
        splits.test,
        splits.num_classes,
        train_views=build_views(cfg, splits, "single_view").to(device),
        eval_views=eval_views,
        device=device,
        **finetune_recipe(cfg, precision),
    )


def semi_supervised_splits(cfg: Config, splits: DataSplits) -> dict[float, Tensor]:
    """The labelled training subset of each of ``eval.semi_fractions`` (class-balanced, seeded
    by ``train.seed``); a pretraining run with ``eval.semi`` calls it before its first step.

    Raises:
        ConfigError: the training split has no labels up front, or a fraction leaves a class
            without a label.
    """
    labels = splits.train.labels
    if labels is None or splits.num_classes < 2:
        raise ConfigError(
            f"eval.semi needs a dataset whose labels are known up front; {splits.name!r} has none (set eval.semi=false)"
        )
    try:
        return semi_supervised_subsets(labels, cfg.eval.semi_fractions, cfg.train.seed)
    except ValueError as err:
        raise ConfigError(f"eval.semi_fractions: {err}") from None


def semi_supervised_rows(
    method: Method, cfg: Config, splits: DataSplits, eval_views: nn.Module, device: torch.device, precision: str
) -> dict[str, dict[str, float]]:
    """The semi-supervised protocol (SimCLR, Chen et al. 2020, arXiv:2002.05709, sec. 4.2):
    for each of ``eval.semi_fractions``, fine-tune the run's encoder and, as the baseline, a
    random-init encoder of the same architecture on the same class-balanced, seeded labelled
    subset with the same ``eval.finetune_*`` recipe; test top-1 on the whole test split.

    Returns:
        ``{run row: {"semi_top1@1%": ..., "semi_top1@10%": ...}, "random-init <backbone>":
        {the same keys}}`` (fractions in ``[0, 1]``).

    Raises:
        ConfigError: the training split has no labels up front, or a fraction leaves a class
            without a label.
    """
    subsets = semi_supervised_splits(cfg, splits)
    run_row, random_row = encoder_row_names(cfg)
    rows: dict[str, dict[str, float]] = {run_row: {}, random_row: {}}
    for fraction, indices in subsets.items():
        train = splits.train.subset(indices)
        for row, from_scratch in ((run_row, False), (random_row, True)):
            encoder = finetune_encoder(method, cfg, splits, from_scratch=from_scratch)
            metrics = finetune_from_config(
                encoder, method.num_features, train, cfg, splits, eval_views, device, precision
            )
            rows[row][f"semi_top1@{fraction_name(fraction)}"] = metrics["finetune_top1"]
    return rows
