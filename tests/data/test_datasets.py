"""Tests of selfsup.data: dataset builders, splits, statistics and batch iteration."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (
    DataError,
    DataSplits,
    EpochBatchSampler,
    ImageFolderDataset,
    TensorImageDataset,
    build_data,
    channel_stats,
    iterate_batches,
    iterate_eval,
    resize_images,
    stratified_split,
)
from selfsup.data.datasets import (
    build_cifar,
    build_digits,
    build_fashion_mnist,
    build_image_folder,
    build_npz,
)
from selfsup.registry import DATASETS

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------ helpers


def _rng_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> None:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fmnist(root: Path) -> dict[str, np.ndarray]:
    """A tiny Fashion-MNIST root: 12 train and 5 test 6x6 images."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)  # local generator, not NumPy's global RNG
    arrays = {
        "train-images-idx3-ubyte": g.integers(0, 256, (12, 6, 6)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": g.integers(0, 256, (5, 6, 6)),
        "t10k-labels-idx1-ubyte": np.array([9, 2, 1, 1, 6]),
    }
    for stem, arr in arrays.items():
        _write_idx(root / f"{stem}.gz", arr)
    return arrays


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _folder(root: Path, per_class: int = 4, corrupt: bool = False) -> None:
    """Class folders "cat" and "dog" of 8x8 PNGs (RGB and grayscale mixed, one nested)."""
    for cls in ["dog", "cat"]:  # created unsorted on purpose
        for i in range(per_class):
            value = 40 * i + (100 if cls == "cat" else 0)
            if i % 2:
                arr = np.full((8, 8), value)  # grayscale
            else:
                arr = np.full((8, 8, 3), value)  # RGB
            sub = "nested" if i == 0 else ""
            _save_png(root / cls / sub / f"{i}.png", arr)
    if corrupt:
        (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


# ---------------------------------------------------------------------------------- digits


def test_digits_splits_shapes_dtypes_stratified() -> None:
    s = build_digits()
    assert isinstance(s, DataSplits)
    assert (len(s.train), len(s.test)) == (1437, 360)
    assert s.pretrain is s.train
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 8)
    assert isinstance(s.train, TensorImageDataset)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape == (1437, 1, 8, 8)
    assert s.train.labels is not None and s.train.labels.dtype == torch.int64
    assert int(s.train.images.max()) == 255  # 0..16 scaled to the full byte range
    image, label, index = s.test[3]
    assert image.shape == (1, 8, 8) and isinstance(label, int) and index == 3
    # Stratified: each class's share of the test set matches its share of the data.
    assert s.test.labels is not None
    all_counts = torch.bincount(torch.cat([s.train.labels, s.test.labels]), minlength=10)
    expected = all_counts.double() * 360 / 1797
    assert (torch.bincount(s.test.labels, minlength=10).double() - expected).abs().max() <= 1.0
    # mean/std are those of the pretrain images scaled to [0, 1].
    x = s.pretrain.images.double() / 255
    assert s.mean[0] == pytest.approx(x.mean().item(), abs=1e-9)
    assert s.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-9)


def test_digits_deterministic_and_seeded() -> None:
    a, b, c = build_digits(seed=0), build_digits(seed=0), build_digits(seed=1)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, c.test.images)
    small = build_digits(limit=50, image_size=16)
    assert (len(small.pretrain), len(small.test)) == (50, 50)
    assert small.pretrain.images.shape[1:] == (1, 16, 16) and small.image_size == 16


def test_stratified_split_is_a_partition() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, test = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(16))
    # ceil(16 * 0.2) = 4 held out; quotas 2.5/1.25/0.25: the largest remainder (class 0)
    # gets the leftover sample, and the singleton class stays in train.
    assert torch.bincount(labels[test], minlength=3).tolist() == [3, 1, 0]
    with pytest.raises(DataError, match="test_fraction"):
        stratified_split(labels, 1.5, torch.Generator())


# --------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_parses_fake_idx_root(tmp_path: Path) -> None:
    arrays = _fake_fmnist(tmp_path / "fm")
    s = build_fashion_mnist(root=str(tmp_path / "fm"))
    assert (len(s.pretrain), len(s.train), len(s.test)) == (12, 12, 5)
    assert s.pretrain is s.train and s.num_classes == 10
    assert isinstance(s.train, TensorImageDataset) and isinstance(s.test, TensorImageDataset)
    stored = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8))
    assert torch.equal(s.train.images[:, 0], stored)
    assert s.test.labels is not None and s.test.labels.tolist() == [9, 2, 1, 1, 6]
    assert s.train.class_names is not None and s.train.class_names[9] == "Ankle boot"
    resized = build_fashion_mnist(root=str(tmp_path / "fm"), image_size=12, limit=4)
    assert resized.pretrain.images.shape == (4, 1, 12, 12) and len(resized.test) == 4


def test_fashion_mnist_uncompressed_files(tmp_path: Path) -> None:
    arrays = _fake_fmnist(tmp_path)
    stem = "t10k-images-idx3-ubyte"
    (tmp_path / f"{stem}.gz").unlink()
    _write_idx(tmp_path / stem, arrays[stem], compress=False)
    assert len(build_fashion_mnist(root=str(tmp_path)).test) == 5


def test_fashion_mnist_corrupt_files(tmp_path: Path) -> None:
    arrays = _fake_fmnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(bad, arrays["train-images-idx3-ubyte"], magic=0x0801)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*magic number"):
        build_fashion_mnist(root=str(tmp_path))
    # Header promises more bytes than the file holds.
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, 12, 6, 6) + bytes(100))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds 100 data bytes"):
        build_fashion_mnist(root=str(tmp_path))
    # A truncated gzip stream.
    _write_idx(bad, arrays["train-images-idx3-ubyte"])
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
        build_fashion_mnist(root=str(tmp_path))


def test_fashion_mnist_missing_root_mentions_apt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist") as err:
        build_fashion_mnist(root=str(tmp_path / "nowhere"))
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte.gz"):
        build_fashion_mnist(root=str(tmp_path))


@pytest.mark.skipif(not (FMNIST_ROOT / "t10k-labels-idx1-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_real_files() -> None:
    s = build_data("fashion-mnist")
    assert (len(s.pretrain), len(s.train), len(s.test)) == (60000, 60000, 10000)
    assert isinstance(s.train, TensorImageDataset) and s.train.images.shape == (60000, 1, 28, 28)
    assert s.train.labels is not None and s.test.labels is not None
    assert s.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert s.test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert s.mean[0] == pytest.approx(0.2860, abs=2e-3) and s.std[0] == pytest.approx(0.3530, abs=2e-3)


# ----------------------------------------------------------------------------- image folder


def test_image_folder_labelled_split_and_mode(tmp_path: Path) -> None:
    _folder(tmp_path / "imgs", per_class=5)
    s = build_image_folder(root=str(tmp_path / "imgs"), image_size=4, mode="RGB")
    assert s.num_classes == 2 and (s.in_channels, s.image_size) == (3, 4)
    assert s.pretrain is s.train and (len(s.train), len(s.test)) == (8, 2)
    assert isinstance(s.train, ImageFolderDataset) and s.train.class_names == ["cat", "dog"]
    assert s.test.labels is not None and sorted(s.test.labels.tolist()) == [0, 1]  # stratified
    for i in range(len(s.train)):
        sample = s.train[i]
        assert sample is not None
        image, label, index = sample
        assert image.shape == (3, 4, 4) and image.dtype == torch.uint8 and index == i
        path = s.train.path(i)
        assert label == (0 if "/cat/" in path else 1)
        # grayscale files were converted: all channels equal the stored gray value
        expected = 40 * int(Path(path).stem) + (100 if label == 0 else 0)
        assert torch.all(image == expected)
    gray = build_image_folder(root=str(tmp_path / "imgs"), image_size=4, mode="L")
    assert gray.in_channels == 1 and gray.train[0] is not None and gray.train[0][0].shape == (1, 4, 4)
    assert len(gray.mean) == 1


def test_image_folder_mode_auto_and_resize_center_crop(tmp_path: Path) -> None:
    # 12x6 (w x h), dark borders outside the central square (columns 3..9): a squashing
    # resize would mix them in, a center crop must not.
    arr = np.zeros((6, 12), dtype=np.uint8)
    arr[:, 3:9] = 200
    _save_png(tmp_path / "a" / "wide.png", arr)
    _save_png(tmp_path / "b" / "other.png", np.full((6, 6), 10))
    s = build_image_folder(root=str(tmp_path), test_root=str(tmp_path), image_size=3, mode="auto")
    assert s.in_channels == 1
    sample = s.train[0]
    assert sample is not None and torch.all(sample[0] == 200)


def test_image_folder_corrupt_skip_and_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder(tmp_path, per_class=3, corrupt=True)
    broken = str(tmp_path / "cat" / "broken.png")
    with caplog.at_level(logging.WARNING, logger="selfsup.data.datasets"):
        s = build_image_folder(root=str(tmp_path), test_root=str(tmp_path), image_size=4, stats_samples=100)
    assert isinstance(s.train, ImageFolderDataset)
    assert s.train.num_skipped == 1 and s.train.skipped_paths == [broken]
    assert sum(broken in r.getMessage() for r in caplog.records) == 1  # warned once
    i = [s.train.path(k) for k in range(len(s.train))].index(broken)
    assert s.train[i] is None
    with pytest.raises(DataError, match="broken.png"):
        build_image_folder(root=str(tmp_path), test_root=str(tmp_path), image_size=4, on_error="raise")


def test_image_folder_errors_and_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_image_folder(root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        build_image_folder(root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="image_size"):
        build_image_folder(root=str(tmp_path / "empty"), image_size=None)
    flat = tmp_path / "flat"
    for i in range(3):
        _save_png(flat / f"{i}.png", np.full((5, 7, 3), 50 * i))
    s = build_data("image-folder", root=str(flat), image_size=4)
    assert s.num_classes == 0 and len(s.pretrain) == 3 and len(s.train) == len(s.test) == 0
    sample = s.pretrain[1]
    assert sample is not None and sample[1] == -1 and s.pretrain.labels is None
    with pytest.raises(DataError, match="unlabelled"):
        build_image_folder(root=str(flat), test_root=str(flat))
    _save_png(flat / "cls" / "x.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match="mixes"):
        build_image_folder(root=str(flat))


def test_image_folder_train_and_test_roots(tmp_path: Path) -> None:
    for i in range(3):
        _save_png(tmp_path / "pool" / f"{i}.png", np.full((4, 4, 3), i))
    _folder(tmp_path / "train", per_class=2)
    _save_png(tmp_path / "test" / "dog" / "t.png", np.full((4, 4, 3), 9))
    s = build_image_folder(
        root=str(tmp_path / "pool"),
        train_root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        image_size=4,
    )
    assert (len(s.pretrain), len(s.train), len(s.test)) == (3, 4, 1)
    assert s.test.labels is not None and s.test.labels.tolist() == [1]  # "dog" is class 1 of train
    _save_png(tmp_path / "test" / "bird" / "b.png", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match="bird"):
        build_image_folder(
            root=str(tmp_path / "pool"), train_root=str(tmp_path / "train"), test_root=str(tmp_path / "test")
        )


# ------------------------------------------------------------------------------------ CIFAR


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_and_cifar100_fake(tmp_path: Path) -> None:
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 251
    for i in range(1, 6):
        _pickle(c10 / f"data_batch_{i}", {b"data": data.astype(np.uint8), b"labels": [i % 10, 0]})
    _pickle(c10 / "test_batch", {b"data": data[:1].astype(np.uint8), b"labels": [7]})
    _pickle(c10 / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    s = build_cifar(root=str(tmp_path))  # the parent folder is accepted too
    assert s.name == "cifar10" and s.num_classes == 10 and (s.in_channels, s.image_size) == (3, 32)
    assert (len(s.train), len(s.test)) == (10, 1)
    assert isinstance(s.train, TensorImageDataset) and s.train.labels is not None
    assert s.train.labels.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    assert int(s.train.images[0, 1, 0, 2]) == (1024 + 2) % 251
    assert int(s.train.images[0, 2, 1, 0]) == (2048 + 32) % 251
    assert s.train.class_names is not None and s.train.class_names[3] == "c3"

    c100 = tmp_path / "c100"
    c100.mkdir()
    _pickle(c100 / "train", {b"data": data.astype(np.uint8), b"fine_labels": [99, 5], b"coarse_labels": [1, 2]})
    _pickle(c100 / "test", {b"data": data.astype(np.uint8), b"fine_labels": [3, 4]})
    s100 = build_cifar(root=str(c100), image_size=16)
    assert s100.name == "cifar100" and s100.num_classes == 100 and s100.image_size == 16
    assert s100.train.labels is not None and s100.train.labels.tolist() == [99, 5]


def test_cifar_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data_batch_1"):
        build_cifar(root=str(tmp_path))
    _pickle(tmp_path / "train", {b"data": np.zeros((1, 10), np.uint8), b"fine_labels": [0]})
    _pickle(tmp_path / "test", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(DataError, match=r"train: expected uint8 data \(N, 3072\)"):
        build_cifar(root=str(tmp_path))
    # A pickle that would run code is refused, not executed.
    with open(tmp_path / "train", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)
    with pytest.raises(DataError, match="refusing to load global"):
        build_cifar(root=str(tmp_path))


# -------------------------------------------------------------------------------------- npz


def test_npz_layouts(tmp_path: Path) -> None:
    base = _rng_images(20, 3, 5, 5)
    y = torch.arange(20) % 4
    path = tmp_path / "d.npz"
    for x in (base.numpy(), base.permute(0, 2, 3, 1).numpy(), base.numpy().astype(np.float32) / 255):
        np.savez(path, x_train=x, y_train=y.numpy())
        s = build_npz(path=str(path))
        assert (s.in_channels, s.image_size, s.num_classes) == (3, 5, 4)
        assert (len(s.train), len(s.test)) == (16, 4)
        full = torch.cat([s.train.images, s.test.images])  # type: ignore[attr-defined]
        assert torch.equal(full.sort(dim=0).values, base.sort(dim=0).values)
    np.savez(
        path,
        x_train=base[:, 0].numpy(),
        y_train=y.numpy(),
        x_test=base[:3, 0].numpy(),
        y_test=np.array([[0], [1], [5]]),
        x_unlabeled=base[:7, 0].numpy(),
    )
    s = build_npz(path=str(path))
    assert s.in_channels == 1 and s.num_classes == 6 and len(s.test) == 3
    assert len(s.train) == 20 and len(s.pretrain) == 27
    assert s.pretrain.labels is not None and s.pretrain.labels[20:].eq(-1).all()


def test_npz_rejects_ambiguous_and_bad(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    y = np.zeros(4, dtype=np.int64)
    np.savez(path, x_train=np.zeros((4, 3, 6, 3), np.uint8), y_train=y)
    with pytest.raises(DataError, match="ambiguous.*layout="):
        build_npz(path=str(path))
    assert build_npz(path=str(path), layout="NCHW", image_size=3).in_channels == 3
    np.savez(path, x_train=np.full((4, 6, 6), 7.0), y_train=y)
    with pytest.raises(DataError, match=r"x_train.*\[0, 1\]"):
        build_npz(path=str(path))
    np.savez(path, x_train=np.zeros((4, 6, 6), np.uint8), y_train=y.astype(np.float32))
    with pytest.raises(DataError, match="y_train.*integers"):
        build_npz(path=str(path))
    np.savez(path, images=np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(DataError, match="x_train.*images"):
        build_npz(path=str(path))
    np.savez(path, x_train=np.zeros((4, 6, 8), np.uint8), y_train=y)
    with pytest.raises(DataError, match="not square"):
        build_npz(path=str(path))


# --------------------------------------------------------------------------------- helpers


def test_resize_and_channel_stats() -> None:
    x = torch.full((3, 2, 6, 10), 77, dtype=torch.uint8)
    x[..., :2] = 0  # columns cropped away by the center crop
    out = resize_images(x, 3)
    assert out.shape == (3, 2, 3, 3) and torch.all(out == 77)
    ds = TensorImageDataset(_rng_images(50, 3, 4, 4))
    mean, std = channel_stats(ds, max_samples=10_000)
    ref = ds.images.double().div(255)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref.std(dim=(0, 2, 3), unbiased=False))


def test_tensor_dataset_get_batch_and_validation() -> None:
    images = _rng_images(10, 1, 3, 3)
    ds = TensorImageDataset(images, torch.arange(10) % 3)
    imgs, labels, idx = ds.get_batch(torch.tensor([4, 0, 9]))
    assert torch.equal(imgs, images[[4, 0, 9]]) and labels.tolist() == [1, 0, 0] and idx.tolist() == [4, 0, 9]
    assert ds.num_classes == 3 and ds[-1][2] == 9
    _, unl, _ = TensorImageDataset(images).get_batch(torch.tensor([1, 2]))
    assert unl.tolist() == [-1, -1]
    with pytest.raises(DataError, match="uint8"):
        TensorImageDataset(images.float())
    with pytest.raises(DataError, match="labels have shape"):
        TensorImageDataset(images, torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------- sampler


def test_sampler_reshuffles_reproducibly_and_resumes() -> None:
    s = EpochBatchSampler(103, batch_size=10, seed=5)
    assert s.steps_per_epoch == len(s) == 10
    e0 = list(s.batches(0))
    assert all(b.shape == (10,) and b.dtype == torch.int64 for b in e0)
    flat = torch.cat(e0)
    assert len(set(flat.tolist())) == 100  # no repeats within an epoch; 3 dropped
    assert all(torch.equal(a, b) for a, b in zip(e0, EpochBatchSampler(103, 10, seed=5).batches(0)))
    assert not torch.equal(flat, torch.cat(list(s.batches(1))))
    assert not torch.equal(flat, torch.cat(list(EpochBatchSampler(103, 10, seed=6).batches(0))))
    resumed = list(s.batches(0, start_batch=7))
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(resumed, e0[7:]))
    assert list(s.batches(0, start_batch=10)) == []
    with pytest.raises(DataError, match="start_batch"):
        s.batches(0, start_batch=11)
    ordered = EpochBatchSampler(25, 10, seed=0, shuffle=False, drop_last=False)
    assert [b.tolist() for b in ordered.batches(3)][-1] == list(range(20, 25))
    assert ordered.steps_per_epoch == 3


def test_sampler_ranks_concatenate_to_single_process() -> None:
    single = EpochBatchSampler(50, batch_size=8, seed=3)
    r0 = EpochBatchSampler(50, batch_size=4, seed=3, rank=0, world_size=2)
    r1 = EpochBatchSampler(50, batch_size=4, seed=3, rank=1, world_size=2)
    assert single.steps_per_epoch == r0.steps_per_epoch == 6
    for epoch in (0, 1):
        for b, b0, b1 in zip(single.batches(epoch), r0.batches(epoch), r1.batches(epoch)):
            assert torch.equal(torch.cat([b0, b1]), b)
    # drop_last=False: the final global batch of 2 samples is split between the ranks.
    tail = [list(EpochBatchSampler(50, 4, 3, drop_last=False, rank=r, world_size=2).batches(0))[-1] for r in (0, 1)]
    assert torch.equal(torch.cat(tail), list(EpochBatchSampler(50, 8, 3, drop_last=False).batches(0))[-1])
    with pytest.raises(DataError, match="do not fill one global batch"):
        EpochBatchSampler(7, batch_size=4, seed=0, world_size=2)
    with pytest.raises(DataError, match="rank"):
        EpochBatchSampler(70, batch_size=4, seed=0, rank=2, world_size=2)


# ------------------------------------------------------------------------------- iteration


def test_iterate_batches_tensor_dataset_matches_sampler() -> None:
    ds = TensorImageDataset(_rng_images(30, 1, 4, 4), torch.arange(30) % 5)
    sampler = EpochBatchSampler(30, batch_size=8, seed=1)
    batches = list(iterate_batches(ds, sampler, epoch=2, start_batch=1))
    expected = list(sampler.batches(2))[1:]
    assert len(batches) == 2
    for (imgs, labels, idx), want in zip(batches, expected):
        assert torch.equal(idx, want) and torch.equal(imgs, ds.images[want])
        assert torch.equal(labels, want % 5)
    with pytest.raises(DataError, match="sampler was built for 31"):
        iterate_batches(ds, EpochBatchSampler(31, 8, 1), epoch=0)
    evald = list(iterate_eval(ds, batch_size=8))
    assert [len(b[2]) for b in evald] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b[2] for b in evald]), torch.arange(30))


def test_iterate_batches_folder_workers_and_skips(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=6, corrupt=True)
    outs = {}
    for workers in (0, 2):
        s = build_image_folder(root=str(tmp_path), test_root=str(tmp_path), image_size=4, stats_samples=1)
        ds = s.train
        assert isinstance(ds, ImageFolderDataset) and len(ds) == 13
        sampler = EpochBatchSampler(len(ds), batch_size=4, seed=0, drop_last=False)
        batches = list(iterate_batches(ds, sampler, epoch=0, num_workers=workers))
        assert len(batches) == sampler.steps_per_epoch == 4  # one item per sampler batch
        for (imgs, labels, idx), want in zip(batches, sampler.batches(0)):
            assert imgs.shape[1:] == (3, 4, 4) and imgs.dtype == torch.uint8
            assert set(idx.tolist()) <= set(want.tolist()) and len(idx) == len(labels) == len(imgs)
        assert sum(len(b[2]) for b in batches) == 12  # the broken file was dropped
        assert ds.num_skipped == 1  # reported back from the workers
        outs[workers] = batches
        evald = list(iterate_eval(ds, batch_size=5, num_workers=workers))
        readable = torch.tensor([i for i in range(13) if ds[i] is not None])
        assert torch.equal(torch.cat([b[2] for b in evald]), readable)
    for a, b in zip(outs[0], outs[2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------- build


def test_build_data_registry_and_unknown_kwarg() -> None:
    assert {"fashion-mnist", "digits", "image-folder", "cifar", "npz"} <= set(DATASETS.names())
    with pytest.raises(DataError) as err:
        build_data("digits", imgae_size=16)
    msg = str(err.value)
    assert "imgae_size" in msg and "did you mean 'image_size'" in msg and "test_fraction" in msg
    with pytest.raises(DataError, match="needs path="):
        build_data("npz")
    assert build_data("digits", limit=20).summary().startswith("digits: pretrain=20")


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path: Path) -> None:

    from selfsup.data import ImageFolderDataset

    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    ds = ImageFolderDataset([str(tmp_path / "deep.png")], None, image_size=16, mode="L")
    image = ds.load(0)[0]
    assert torch.equal(image, torch.arange(256, dtype=torch.uint8).reshape(16, 16))


def test_skipped_images_are_counted_and_listed_in_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from selfsup.engine.run import PretrainRun
    from tests.conftest import tiny_config

    root = tmp_path / "images"
    root.mkdir()
    for i in range(40):
        Image.new("L", (10, 10), color=i * 5).save(root / f"ok{i:02d}.png")
    for i in range(3):
        (root / f"bad{i}.png").write_bytes(b"broken")
    run = PretrainRun(
        tiny_config(
            tmp_path / "runs",
            "simclr",
            "data.name=image-folder",
            f"data.root={root}",
            "data.image_size=8",
            "train.batch_size=16",
            "train.max_steps=2",
        )
    )
    run.fit()
    listed = (run.run_dir / "skipped.txt").read_text().split()
    assert listed == [str(root / f"bad{i}.png") for i in range(3)]
    assert "skipped 3 unreadable image(s) of 43" in capsys.readouterr().err


# ------------------------------------------------------------------------- image-folder masks


def _masked_folder(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Class folders of 8x12 (H x W) RGB images with 8x12 masks, and each image's expected
    4x4 mask: the central 8x8 square (columns 2..9) sampled at source pixels 1, 3, 5, 7."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    expected: dict[str, np.ndarray] = {}
    for cls in ["a", "b"]:
        for i in range(3):
            mask = np.zeros((8, 12), dtype=np.uint8)
            if cls == "a":
                mask[2:6, 4:8] = 2  # crop columns 2..9 -> square at rows 2:6, cols 2:6
            else:
                mask[:, 2 + 4 :] = 1  # right half of the crop is class 1 ...
                mask[0:2, 2:4] = 3  # ... with a class-3 corner at the crop's top left
            image = np.full((8, 12, 3), 30 * i + (0 if cls == "a" else 100), dtype=np.uint8)
            _save_png(root / cls / f"{i}.png", image)
            _save_png(masks / cls / f"{i}.png", mask)
            crop = mask[:, 2:10].astype(np.int64)
            expected[f"{cls}/{i}"] = crop[1::2, 1::2]
    return root, masks, expected


def _expected_masks(ds: ImageFolderDataset, root: Path, expected: dict[str, np.ndarray]) -> torch.Tensor:
    keys = [os.path.splitext(os.path.relpath(ds.path(i), root))[0] for i in range(len(ds))]
    return torch.from_numpy(np.stack([expected[k] for k in keys]))


def test_image_folder_masks_follow_the_image_geometry_and_subsets(tmp_path: Path) -> None:
    from selfsup.engine.dense import check_masks

    root, masks, expected = _masked_folder(tmp_path)
    splits = build_image_folder(str(root), image_size=4, masks=str(masks), test_fraction=0.34)
    assert check_masks(splits) == 4  # ids 0..3 found by the build-time scan
    for ds in (splits.train, splits.test):
        assert isinstance(ds, ImageFolderDataset) and ds.num_mask_classes == 4
        got = ds.get_masks(torch.arange(len(ds)))
        assert got.dtype == torch.int64 and got.shape == (len(ds), 4, 4)
        assert torch.equal(got, _expected_masks(ds, root, expected))
    # The masks follow a subset, and the eval loader's indices address them.
    sub = splits.train.subset([2, 0])
    assert isinstance(sub, ImageFolderDataset) and sub.num_mask_classes == 4
    assert torch.equal(sub.get_masks(torch.tensor([0, 1])), _expected_masks(sub, root, expected))
    _, _, indices = next(iterate_eval(splits.test, 8))
    assert torch.equal(splits.test.get_masks(indices), _expected_masks(splits.test, root, expected)[indices])
    # An explicit class count skips the scan; an id beyond it is a one-line error.
    given = build_image_folder(str(root), image_size=4, masks=str(masks), mask_classes=10)
    assert check_masks(given) == 10
    small = build_image_folder(str(root), image_size=4, masks=str(masks), mask_classes=2)
    with pytest.raises(DataError, match="raise mask_classes"):
        small.train.get_masks(torch.arange(len(small.train)))  # type: ignore[attr-defined]


def test_image_folder_without_masks_is_refused_by_dense(tmp_path: Path) -> None:
    from selfsup.config import ConfigError
    from selfsup.engine.dense import check_masks

    root, _, _ = _masked_folder(tmp_path)
    splits = build_image_folder(str(root), image_size=4)
    assert not hasattr(splits.train, "num_mask_classes")
    with pytest.raises(ConfigError, match="dense needs a data set with masks"):
        check_masks(splits)


def test_image_folder_mask_errors(tmp_path: Path) -> None:
    root, masks, _ = _masked_folder(tmp_path)
    (masks / "b" / "1.png").unlink()
    with pytest.raises(DataError, match=r"has no mask file .*1\.png'; add it") as info:
        build_image_folder(str(root), image_size=4, masks=str(masks))
    assert "\n" not in str(info.value)
    # With mask_classes given there is no scan: the error comes from get_masks.
    splits = build_image_folder(str(root), image_size=4, masks=str(masks), mask_classes=4, test_fraction=0.5)
    with pytest.raises(DataError, match="has no mask file"):
        for ds in (splits.train, splits.test):
            ds.get_masks(torch.arange(len(ds)))  # type: ignore[attr-defined]
    _save_png(masks / "b" / "1.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"is 8x8px but its image .* is 12x8px; save the mask"):
        build_image_folder(str(root), image_size=4, masks=str(masks))
    _save_png(masks / "b" / "1.png", np.zeros((8, 12, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="not a single-channel integer image"):
        build_image_folder(str(root), image_size=4, masks=str(masks))
    with pytest.raises(DataError, match="does not exist"):
        build_image_folder(str(root), image_size=4, masks=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="pass test_masks=<folder>"):
        build_image_folder(str(root), test_root=str(root), image_size=4, masks=str(masks))
    with pytest.raises(DataError, match="mirrors test_root"):
        build_image_folder(str(root), image_size=4, test_masks=str(masks))
