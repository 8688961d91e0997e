"""DINOv2 data curation (selfsup.engine.curate, ``selfsup curate``, ``data.list_file``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.data import DataError
from selfsup.data.datasets import build_image_folder
from selfsup.engine.curate import curate_features
from selfsup.engine.run import PretrainRun
from tests.conftest import tiny_config


def test_curate_features_keeps_one_per_group_and_retrieves_from_the_kept() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(20, 8, generator=g)
    pool = torch.cat([pool, pool[[2, 2, 5]] + 1e-3 * torch.randn(3, 8, generator=g)])  # rows 20, 21, 22
    # A seed that is row 2 itself: its nearest images are 2, 20, 21, but only 2 is kept.
    seeds = pool[[2]].clone()
    result = curate_features(pool, seeds, threshold=0.99, dedup_k=8, retrieve_k=2, backend="torch")
    assert result.removed.tolist() == [20, 21, 22]
    assert result.group[[20, 21, 22]].tolist() == [2, 2, 5]
    assert result.kept.tolist() == list(range(20))
    assert 2 in result.retrieved.tolist() and len(result.retrieved) == 2
    assert not set(result.retrieved.tolist()) & {20, 21, 22}
    with pytest.raises(ConfigError, match="lower --k"):
        curate_features(pool, seeds, threshold=0.99, retrieve_k=21, backend="torch")


def _folder(root: Path, images: np.ndarray) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for i, pixels in enumerate(images):
        path = root / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_curate_command_writes_a_list_the_image_folder_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path / "runs", "simclr", "train.max_steps=1", "train.batch_size=32")
    run = PretrainRun(cfg)
    run.fit()
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (12, 8, 8), generator=g, dtype=torch.uint8).numpy()
    pool = np.concatenate([base, base[[0, 3]]])  # exact copies: rows 12 and 13
    pool_paths = _folder(tmp_path / "pool", pool)
    _folder(tmp_path / "seeds", base[[0, 7]])
    out = tmp_path / "curated"
    monkeypatch.chdir(tmp_path)  # folders given relative to here; the list must not depend on it
    code = main(
        ["curate", str(run.run_dir), "pool", "seeds", "-o", str(out)]
        + ["--k", "2", "--threshold", "0.999", "--workers", "0", "--device", "cpu", "--backend", "torch"]
    )
    assert code == 0
    dup_lines = (out / "duplicates.tsv").read_text().splitlines()[1:]
    assert sorted(dup_lines) == sorted([f"{pool_paths[12]}\t{pool_paths[0]}", f"{pool_paths[13]}\t{pool_paths[3]}"])
    curated = (out / "curated.txt").read_text().splitlines()
    assert all(Path(line).is_absolute() for line in curated)
    assert {str(pool_paths[0]), str(pool_paths[7])} <= set(curated)  # each seed finds itself
    assert 2 <= len(curated) <= 4
    splits = build_image_folder(str(tmp_path / "pool"), image_size=8, mode="L", list_file=str(out / "curated.txt"))
    assert len(splits.pretrain) == len(curated)

    bad = tmp_path / "bad.txt"
    bad.write_text("/elsewhere/x.png\n")
    with pytest.raises(DataError, match="not under root"):
        build_image_folder(str(tmp_path / "pool"), image_size=8, mode="L", list_file=str(bad))
