"""Shared test settings and a tiny-run config factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfsup.config import Config, load_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


# One intra-op thread: the suite's tensors are tiny, where thread hand-offs cost more than
# they give (and CI shares 2 cores between pytest and the 2-process distributed tests).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    # Runs through the CLI apply `train.threads` to the whole process; reset it so every test
    # computes with the same thread count (reduction order) as its reference.
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny_config(tmp_path: Path, method: str = "simclr", *overrides: str) -> Config:
    """A seconds-long run on scikit-learn's digits with a narrow ConvNet."""
    return load_config(
        None,
        [
            "data.name=digits",
            "backbone.name=convnet",
            "backbone.width=8",
            f"method.name={method}",
            "train.batch_size=64",
            "train.epochs=1",
            "train.log_every=1",
            "train.knn_every=0",
            "train.progress=false",
            "eval.linear_epochs=5",
            "eval.baselines=false",
            "eval.at_end=false",
            f"run.out_dir={tmp_path}",
            "run.name=tiny",
            "run.tensorboard=false",
            *overrides,
        ],
    )
