"""Tests of the packed data set: ``selfsup data pack`` shards, their reading, sharding and resume."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from selfsup.cli import main
from selfsup.data import DataError, DataSplits, EpochBatchSampler, TensorImageDataset, build_data, iterate_batches
from selfsup.data.datasets import build_image_folder
from selfsup.data.loader import default_num_workers, iterate_eval
from selfsup.data.packed import MANIFEST, PackedDataset, pack, read_manifest, verify_pack
from tests.multiprocess import results_on_ranks

N = 96  # images of the synthetic set: 96 = 2 ranks x 2 steps x batch 8 x 3 epochs' worth


def _indexed_splits(n: int = N, test: int = 20) -> DataSplits:
    """1x8x8 images whose first two pixels spell their index (so a read proves which image it
    was), labels ``index % 3``; ``pretrain is train``."""
    idx = torch.arange(n + test)
    images = torch.randint(0, 256, (n + test, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    full = TensorImageDataset(images, idx % 3, 3, ["a", "b", "c"])
    train, held = full.subset(torch.arange(n)), full.subset(torch.arange(n, n + test))
    return DataSplits("synthetic", train, train, held, 3, 1, 8, (0.5,), (0.25,))


def _index_of(images: torch.Tensor) -> torch.Tensor:
    """The index spelled by the first two pixels of each ``(B, 1, 8, 8)`` image."""
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataSplits]:
    out = tmp_path_factory.mktemp("pack") / "p"
    splits = _indexed_splits()
    pack(splits, out, shard_size=40, batch_size=16, num_workers=0)  # shards of 40, 40, 16
    return out, splits


# ------------------------------------------------------------------------------- round trip
def _png_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            array[0, 0] = (c, i, 0)
            Image.fromarray(array).save(root / cls / f"{i}.png")
    return root


def test_pack_a_png_folder_reads_back_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _png_folder(tmp_path / "images")
    out = tmp_path / "packed"
    assert main(["data", "pack", str(root), str(out), "--size", "8", "--shard-size", "5", "--workers", "0"]) == 0
    assert "data.name=packed" in capsys.readouterr().out
    source = build_image_folder(root=str(root), image_size=8, index_cache=None)
    got = build_data("packed", root=str(out))
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["cat", "dog"] and manifest["image_size"] == 8 and manifest["channels"] == 3
    assert manifest["splits"] == {"pretrain": "pretrain", "train": "pretrain", "test": "test"}
    assert [s["count"] for s in manifest["groups"]["pretrain"]["shards"]] == [5, 4]  # 9 of 12 train, 3 test
    assert got.pretrain is got.train and got.num_classes == 2
    for split in ("train", "test"):
        want, have = getattr(source, split), getattr(got, split)
        assert isinstance(have, PackedDataset) and len(have) == len(want)
        wanted = torch.stack([want[i][0] for i in range(len(want))])
        images, labels, _ = have.get_batch(torch.arange(len(have)))
        assert torch.equal(images, wanted)  # decoded once, bit-identical
        assert torch.equal(labels, want.labels) and torch.equal(have.labels, want.labels)
        assert have.class_names == ["cat", "dog"]
    # Exact statistics of all pretraining pixels (the folder's own are a sample's estimate).
    pixels = torch.stack([source.pretrain[i][0] for i in range(len(source.pretrain))]).double() / 255
    assert np.allclose(got.mean, pixels.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(got.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy())
    assert main(["data", "verify", str(out)]) == 0


def test_batches_cross_shards_and_subsets(packed: tuple[Path, DataSplits]) -> None:
    out, splits = packed
    got = build_data("packed", root=str(out))
    assert got.summary() == f"packed: pretrain={N} train={N} test=20 classes=3 images=1x8x8"
    want = splits.train
    assert isinstance(want, TensorImageDataset)
    idx = torch.tensor([95, 0, 41, 39, 40, 7, 80])  # all three shards, unsorted
    images, labels, indices = got.train.get_batch(idx)  # type: ignore[attr-defined]
    assert torch.equal(images, want.images[idx]) and torch.equal(labels, idx % 3) and torch.equal(indices, idx)
    sub = got.train.subset([5, 90, 44])
    assert torch.equal(_index_of(sub.get_batch(torch.tensor([2, 0]))[0]), torch.tensor([44, 5]))  # type: ignore[attr-defined]
    image, label, i = sub[1]
    assert _index_of(image[None]).item() == 90 and label == 0 and i == 1
    limited = build_data("packed", root=str(out), limit=10, seed=1)
    assert len(limited.pretrain) == len(limited.test) == 10 and limited.pretrain is limited.train
    assert [b[2].tolist() for b in iterate_eval(got.test, 8)] == [list(range(8)), list(range(8, 16)), [16, 17, 18, 19]]
    # A worker started with spawn gets the dataset pickled: the memory maps must not travel.
    assert got.train.group._maps is not None  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(got.train)).group._maps is None


def test_unlabelled_pack(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    pool = TensorImageDataset(images)
    empty = TensorImageDataset(images[:0])
    pack(DataSplits("pool", pool, empty, empty, 0, 3, 4, (0.5,) * 3, (0.2,) * 3), tmp_path / "p", num_workers=0)
    got = build_data("packed", root=str(tmp_path / "p"))
    assert got.num_classes == 0 and len(got.train) == len(got.test) == 0 and got.pretrain.labels is None
    assert torch.equal(got.pretrain.get_batch(torch.arange(12))[0], images)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_packs_are_one_line_data_errors(packed: tuple[Path, DataSplits], tmp_path: Path) -> None:
    out, _ = packed
    with pytest.raises(DataError, match="has no manifest.json"):
        build_data("packed", root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        build_data("packed", root=str(tmp_path / "nowhere"))
    bad = _copy(out, tmp_path / "json")
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="is not a valid pack manifest"):
        build_data("packed", root=str(bad))
    bad = _copy(out, tmp_path / "keys")
    manifest = json.loads((bad / MANIFEST).read_text())
    del manifest["groups"]["test"]
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="split 'test' names no group"):
        build_data("packed", root=str(bad))
    bad = _copy(out, tmp_path / "size")  # a shard of another size
    np.save(bad / "pretrain-00001-images.npy", np.zeros((39, 1, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"pretrain-00001-images.npy holds uint8 \(39, 1, 8, 8\), but manifest"):
        build_data("packed", root=str(bad)).train.get_batch(torch.tensor([50]))  # type: ignore[attr-defined]
    bad = _copy(out, tmp_path / "cut")  # a truncated shard
    data = (bad / "pretrain-00000-images.npy").read_bytes()
    (bad / "pretrain-00000-images.npy").write_bytes(data[:-100])
    with pytest.raises(DataError, match="not a readable .npy shard"):
        build_data("packed", root=str(bad)).train[0]
    bad = _copy(out, tmp_path / "labels")
    (bad / "test-00000-labels.npy").unlink()
    with pytest.raises(DataError, match="test-00000-labels.npy is missing"):
        build_data("packed", root=str(bad))
    bad = _copy(out, tmp_path / "flip")
    shard = np.load(bad / "pretrain-00000-images.npy", mmap_mode="r+")
    shard[3, 0, 2, 2] ^= 1
    shard.flush()
    del shard
    with pytest.raises(DataError, match="checksum differs"):
        verify_pack(bad)
    with pytest.raises(DataError, match="checksum differs"):
        build_data("packed", root=str(bad), verify=True)
    assert verify_pack(out) == N + 20
    with pytest.raises(DataError, match="exists and is not an empty folder"):
        pack(_indexed_splits(), out)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "pack", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is neither a folder nor a registered data set" in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "has no manifest.json" in err and "\n" not in err


# ------------------------------------------------------------------------------- iteration
def test_epochs_are_seeded_resumable_and_equal_with_workers(packed: tuple[Path, DataSplits]) -> None:
    out, _ = packed
    ds = build_data("packed", root=str(out)).pretrain
    sampler = EpochBatchSampler(len(ds), batch_size=8, seed=3)
    full = [b[2] for b in iterate_batches(ds, sampler, epoch=1, num_workers=0)]
    assert sorted(torch.cat(full).tolist()) == list(range(N))  # every image once
    again = list(iterate_batches(ds, sampler, epoch=1, num_workers=2))
    assert all(torch.equal(a, b[2]) and torch.equal(_index_of(b[0]), a) for a, b in zip(full, again))
    other = [b[2] for b in iterate_batches(ds, sampler, epoch=2)]
    assert not all(torch.equal(a, b) for a, b in zip(full, other))  # another epoch, another order
    for start in (5, len(full) - 1):  # resume mid-epoch: the remaining batches, same order
        rest = list(iterate_batches(ds, sampler, epoch=1, start_batch=start, num_workers=2))
        assert len(rest) == len(full) - start
        assert all(torch.equal(a, b[2]) and torch.equal(_index_of(b[0]), a) for a, b in zip(full[start:], rest))


def _rank_epoch(rank: int, root: str, workers: int) -> dict[str, list[int]]:
    """One epoch on this rank: the indices it was given and those its images spell."""
    # mp.spawn made "spawn" this process's default: workers would re-import torch (seconds
    # each); a torchrun process forks them, as here.
    multiprocessing.set_start_method("fork", force=True)
    ds = build_data("packed", root=root).pretrain
    sampler = EpochBatchSampler(len(ds), 8, seed=0, rank=dist.get_rank(), world_size=dist.get_world_size())
    batches = list(iterate_batches(ds, sampler, epoch=0, num_workers=workers))
    resumed = list(iterate_batches(ds, sampler, epoch=0, start_batch=3, num_workers=workers))
    return {
        "indices": torch.cat([b[2] for b in batches]).tolist(),
        "read": torch.cat([_index_of(b[0]) for b in batches]).tolist(),
        "resumed": torch.cat([_index_of(b[0]) for b in resumed]).tolist(),
    }


@pytest.mark.slow
def test_two_processes_read_every_image_once(packed: tuple[Path, DataSplits], tmp_path: Path) -> None:
    out, _ = packed
    ranks = results_on_ranks(functools.partial(_rank_epoch, root=str(out), workers=2), 2, tmp_path)
    read = [r["read"] for r in ranks]
    assert all(r["read"] == r["indices"] for r in ranks)  # the images are the ones asked for
    assert sorted(read[0] + read[1]) == list(range(N))  # union = all, no duplicates
    assert len(read[0]) == len(read[1]) == N // 2
    for r in ranks:  # resume at batch 3: the same remaining batches
        assert r["resumed"] == r["read"][3 * 8 :]


def test_default_workers_from_cores(packed: tuple[Path, DataSplits], monkeypatch: pytest.MonkeyPatch) -> None:
    out, splits = packed
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_num_workers(build_data("packed", root=str(out)).pretrain) == 4
    assert default_num_workers(splits.pretrain) == 0  # in-memory: batched in this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers(build_data("packed", root=str(out)).pretrain) == 0


# ------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_pretrain_on_a_pack_logs_data_wait(packed: tuple[Path, DataSplits], tmp_path: Path) -> None:
    from selfsup.engine.run import PretrainRun
    from tests.conftest import tiny_config

    out, _ = packed
    cfg = tiny_config(
        tmp_path,
        "simclr",
        "data.name=packed",
        f"data.root={out}",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.num_workers=1",
    )
    PretrainRun(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in records if "data_wait" in r]
    assert len(waits) == 4 and all(0.0 <= w <= 1.0 for w in waits)
