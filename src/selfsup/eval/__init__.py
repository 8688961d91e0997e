"""Evaluation of frozen representations: features, kNN, linear probe, clustering, retrieval,
semi-supervised label subsets, monitors.

Everything here works on tensors, iterables of ``(images, labels, ...)`` batches and
callables, without the trainer. Accuracies are fractions in ``[0, 1]``.
"""

from selfsup.eval.baselines import evaluate_features, raw_pixel_features
from selfsup.eval.clustering import cluster_accuracy, clustering_metrics
from selfsup.eval.features import extract_features
from selfsup.eval.hog import hog, hog_dim
from selfsup.eval.knn import knn_classify, knn_predict
from selfsup.eval.label_subset import balanced_label_subset
from selfsup.eval.linear import (
    DEFAULT_WEIGHT_DECAYS,
    LinearProbe,
    linear_probe,
    linear_probe_encoder,
    train_linear_head,
)
from selfsup.eval.retrieval import retrieval_metrics
from selfsup.eval.semi_supervised import semi_supervised_subsets
from selfsup.monitors import effective_rank, feature_std

__all__ = [
    "balanced_label_subset",
    "DEFAULT_WEIGHT_DECAYS",
    "LinearProbe",
    "cluster_accuracy",
    "clustering_metrics",
    "effective_rank",
    "evaluate_features",
    "extract_features",
    "feature_std",
    "hog",
    "hog_dim",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "linear_probe_encoder",
    "raw_pixel_features",
    "retrieval_metrics",
    "semi_supervised_subsets",
    "train_linear_head",
]
