"""Registered dataset builders: each returns :class:`~selfsup.data.base.DataSplits`.

Every builder accepts ``limit`` (cap on the number of samples of each split: a seeded random
subset, for tests and quick runs) and ``image_size`` (resize the shorter side, then
center-crop; ``None`` keeps the native size where the images are all the same size).

==================  ==========================================================================
``fashion-mnist``   idx ``.gz`` files (Debian: ``apt-get install -y dataset-fashion-mnist``)
``digits``          scikit-learn's bundled 8x8 digits, stratified train/test split
``image-folder``    a folder of images, labelled by class sub-folder or unlabelled (+ masks)
``cifar``           an extracted ``cifar-10-batches-py`` or ``cifar-100-python`` folder
``npz``             arrays ``x_train``/``y_train`` (+ optional test and unlabelled images)
``scenes``          synthetic: generated coloured shapes with masks and captions (no files)
==================  ==========================================================================
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import get_worker_info

from selfsup.data.base import (
    DataError,
    DataSplits,
    ImageDataset,
    Sample,
    TensorImageDataset,
    channel_stats,
    check_positive,
    limit_indices,
    resize_images,
    stratified_split,
)
from selfsup.registry import DATASETS

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _finish(
    name: str,
    pretrain: ImageDataset,
    train: ImageDataset,
    test: ImageDataset,
    num_classes: int,
    limit: int | None,
    seed: int,
    stats_samples: int = 10_000,
) -> DataSplits:
    """Apply ``limit`` to every split (keeping ``pretrain is train`` shared) and compute
    the pretrain statistics."""
    same = pretrain is train
    subsets = []
    for ds in (pretrain, train, test):
        idx = limit_indices(len(ds), limit, seed)
        subsets.append(ds if idx is None else ds.subset(idx))
    pretrain, train, test = subsets
    if same:
        train = pretrain
    mean, std = channel_stats(pretrain, max_samples=stats_samples, seed=seed, require_readable=True)
    return DataSplits(
        name=name,
        pretrain=pretrain,
        train=train,
        test=test,
        num_classes=num_classes,
        in_channels=pretrain.in_channels,
        image_size=pretrain.image_size,
        mean=mean,
        std=std,
    )


def _maybe_resize(images: Tensor, image_size: int | None) -> Tensor:
    """``(N, C, H, W) -> (N, C, S, S)`` uint8 with :func:`resize_images`, or unchanged."""
    return images if image_size is None else resize_images(images, image_size)


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_APT_HINT = "apt-get install -y dataset-fashion-mnist"


def read_idx(path: Path, ndim: int) -> Tensor:
    """Parse an idx file of unsigned bytes (gzip-compressed when the name ends in ``.gz``).

    The format is a big-endian header (magic ``0x0000 08 <ndim>``, then ``ndim`` int32
    sizes) followed by the raw bytes. The magic number, the number of dimensions and the
    payload length are checked, so a truncated or foreign file raises :class:`DataError`.

    Returns:
        uint8 tensor of the stored shape, e.g. ``(N, H, W)`` images or ``(N,)`` labels.
    """
    fix = f"the file is truncated or corrupt: reinstall it (`{_APT_HINT}`) or download it again"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}; {fix}") from e
    expected_magic = 0x0800 | ndim  # 0x08 = unsigned byte data
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is only {len(data)} bytes, shorter than an idx header; {fix}")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} for a "
            f"{ndim}-d idx file of unsigned bytes; {fix}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(f"{path} holds {len(data) - header} data bytes but its header {shape} needs {expected}; {fix}")
    # copy(): frombuffer over immutable bytes gives a read-only array torch cannot own.
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


def _find_idx(root: Path, stem: str) -> Path | None:
    """The compressed (preferred) or uncompressed idx file ``stem`` in ``root``, if any."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register("fashion-mnist")
def build_fashion_mnist(
    root: str = "/usr/share/datasets/fashion-mnist",
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """Fashion-MNIST: 60k train / 10k test grayscale 28x28 images of 10 clothing classes.

    ``pretrain`` and ``train`` are the same 60k images (the engine hides labels from the
    pretraining method); ``test`` is the 10k test set.

    Args:
        root: folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (uncompressed
            files without ``.gz`` work too).
        limit: cap on the samples of each split (seeded random subset).
        image_size: resize to this side (bilinear, antialiased); ``None`` keeps 28.
        seed: seed of the ``limit`` subset.

    References:
        Xiao et al., "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
        Algorithms", 2017.
    """
    check_positive("limit", limit)
    check_positive("image_size", image_size)
    base = Path(root)
    paths = {key: _find_idx(base, stem) for key, stem in _IDX_FILES.items()}
    missing = [f"{_IDX_FILES[k]}.gz" for k, p in paths.items() if p is None]
    if missing:
        where = "does not exist" if not base.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(
            f"Fashion-MNIST not found: {base} {where}. Expected the files "
            f"{', '.join(s + '.gz' for s in _IDX_FILES.values())} there. Install them with "
            f"`{_APT_HINT}` (Debian/Ubuntu) or pass root=... pointing at a folder holding them."
        )
    arrays: dict[str, Tensor] = {}
    for key, path in paths.items():
        assert path is not None
        arrays[key] = read_idx(path, ndim=3 if key.endswith("images") else 1)
    splits: dict[str, TensorImageDataset] = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].to(torch.int64)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{paths[f'{split}_images']} has {images.shape[0]} images but "
                f"{paths[f'{split}_labels']} has {labels.shape[0]} labels; the files do not match"
            )
        if len(labels) and int(labels.max()) >= 10:
            raise DataError(f"{paths[f'{split}_labels']} has labels >= 10; not Fashion-MNIST")
        images = _maybe_resize(images.unsqueeze(1), image_size)
        splits[split] = TensorImageDataset(images, labels, 10, FASHION_MNIST_CLASSES)
    return _finish("fashion-mnist", splits["train"], splits["train"], splits["test"], 10, limit, seed)


# ----------------------------------------------------------------------------------- digits


@DATASETS.register("digits")
def build_digits(
    limit: int | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """scikit-learn's bundled handwritten digits: 1797 grayscale 8x8 images, 10 classes.

    Pixel values 0-16 are scaled to uint8 0-255. Train/test is a stratified split seeded
    by ``seed`` (1437/360 for the default ``test_fraction=0.2``); ``pretrain`` is ``train``.

    Args:
        limit: cap on the samples of each split (seeded random subset).
        image_size: resize to this side; ``None`` keeps 8.
        test_fraction: fraction of each class held out for ``test``.
        seed: seed of the split and of the ``limit`` subset.
    """
    check_positive("limit", limit)
    check_positive("image_size", image_size)
    from sklearn.datasets import load_digits  # deferred: importing sklearn costs ~1 s

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255.0 / 16.0)).round_().clamp_(0, 255)
    images = _maybe_resize(images.to(torch.uint8).unsqueeze(1), image_size)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, torch.Generator().manual_seed(seed))
    names = [str(d) for d in range(10)]
    full = TensorImageDataset(images, labels, 10, names)
    train, test = full.subset(train_idx), full.subset(test_idx)
    return _finish("digits", train, train, test, 10, limit, seed)


# ----------------------------------------------------------------------------- image folder


def _is_image(name: str) -> bool:
    """Whether a file name is a visible file with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


#: Index files are written only for folders of at least this many images: smaller ones scan
#: in milliseconds, and caching them would litter the cache with every temporary folder.
INDEX_CACHE_MIN_FILES = 1000
#: A folder modified this recently before its index was built may have changed within the
#: file system's time-stamp granularity (up to 2 s on FAT); such an index is not trusted.
_RACY_NS = 2_000_000_000
_INDEX_VERSION = 1


def _walk_images(folder: str, rel: str, dirs: dict[str, int], seen: set[tuple[int, int]]) -> list[str]:
    """Image files under ``folder`` (recursively, following links), as paths relative to
    the scanned root (``rel`` is ``folder``'s), in ``os.walk`` order: a folder's files
    sorted, then each sub-folder's, sorted. Records every folder's ``st_mtime_ns`` in
    ``dirs`` (``rel`` -> ns); a folder reached twice through links is walked once.

    One ``os.scandir`` per folder and no ``stat`` per file: the directory entries' types
    tell files from folders, so a million files index in seconds.
    """
    files: list[str] = []
    subdirs: list[str] = []
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a link cycle, or a folder linked twice
            return []
        seen.add((info.st_dev, info.st_ino))
        dirs[rel] = info.st_mtime_ns
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():
                    subdirs.append(name)
                elif name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(name)
    except OSError as err:  # skipped like os.walk does; -1 keeps a cached index from hiding it
        logger.warning("cannot list %s (%s); skipping its images", folder, err)
        dirs[rel] = -1
        return []
    prefix = rel + "/" if rel else ""
    found = [prefix + name for name in sorted(files)]
    for name in sorted(subdirs):
        found.extend(_walk_images(os.path.join(folder, name), prefix + name, dirs, seen))
    return found


def index_cache_dir(index_cache: str | None = "auto") -> Path | None:
    """Folder of the image-folder index files: ``index_cache`` itself, or for ``"auto"``
    ``$SELFSUP_CACHE_DIR``, else ``$XDG_CACHE_HOME/selfsup``, else ``~/.cache/selfsup``
    (never the data folder, which may be read-only); ``None`` = no caching."""
    if index_cache is None:
        return None
    if index_cache != "auto":
        return Path(index_cache).expanduser()
    if os.environ.get("SELFSUP_CACHE_DIR"):
        return Path(os.environ["SELFSUP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "selfsup"


def _index_file(base: Path, cache: Path) -> tuple[Path, str]:
    """The index file of folder ``base`` under ``cache`` and the folder's resolved path."""
    real = os.path.realpath(base)
    digest = hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache / "index" / f"{digest}.json", real


def _read_index(file: Path, real: str) -> dict | None:
    """The cached scan of folder ``real``, or ``None`` when there is none or it is stale: a
    folder (the root, a class folder or one below) was added, removed or modified since."""
    try:
        data = json.loads(file.read_text())
        if data.get("version") != _INDEX_VERSION or data.get("root") != real:
            return None
        built = int(data["built_ns"])
        for rel, mtime in data["dirs"].items():
            if mtime >= built - _RACY_NS or os.stat(os.path.join(real, rel)).st_mtime_ns != mtime:
                return None
        return data
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable or from another version: scan again


def _write_index(file: Path, data: dict) -> None:
    """Writes the index atomically (a concurrent reader sees the old or the new file);
    a cache that cannot be written is only a slower next start."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, file)
    except OSError as err:
        logger.debug("cannot write the image index %s: %s", file, err)


def _scan_folder(base: Path, cache: Path | None) -> dict:
    """The raw scan of ``base``: ``{"loose": [names], "classes": [[name, [relative paths]]]}``
    (class folders in name order, empty ones included), from the index cache when valid."""
    file, real = _index_file(base, cache) if cache is not None else (None, "")
    if file is not None:
        cached = _read_index(file, real)
        if cached is not None:
            return cached
    built = time.time_ns()
    dirs: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    info = os.stat(base)
    seen.add((info.st_dev, info.st_ino))
    dirs[""] = info.st_mtime_ns
    loose: list[str] = []
    subdirs: list[str] = []
    with os.scandir(base) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(entry.name)
            elif entry.is_file() and _is_image(entry.name):
                loose.append(entry.name)
    classes = [[name, _walk_images(os.path.join(base, name), name, dirs, seen)] for name in sorted(subdirs)]
    data = {"version": _INDEX_VERSION, "root": real, "built_ns": built, "dirs": dirs}
    data.update(loose=sorted(loose), classes=classes)
    if file is not None and len(loose) + sum(len(files) for _, files in classes) >= INDEX_CACHE_MIN_FILES:
        _write_index(file, data)
    return data


def scan_image_folder(
    root: str | Path, what: str = "root", index_cache: str | None = "auto"
) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Discover the images of a folder and their labels.

    Layouts:
        * ``root/<class>/**/<image>``: labelled; classes are the sorted sub-folder names.
        * ``root/<image>``: unlabelled.

    Folders of :data:`INDEX_CACHE_MIN_FILES` images or more keep their index (the file
    list) in ``index_cache`` (see :func:`index_cache_dir`), reused while no folder under
    ``root`` has changed (their modification times are compared), rebuilt otherwise.

    Args:
        root: the folder.
        what: the argument name, used in error messages.
        index_cache: index cache folder, ``"auto"`` or ``None`` (always scan).

    Returns:
        ``(paths, labels, class_names)``; ``labels`` and ``class_names`` are ``None`` for
        an unlabelled folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{what}={str(root)!r} does not exist or is not a directory")
    scan = _scan_folder(base, index_cache_dir(index_cache))
    prefix = os.path.join(str(base), "")
    loose = [prefix + name for name in scan["loose"]]
    paths: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    for name, files in scan["classes"]:
        if not files:
            logger.warning("%s: class folder %s holds no images; ignoring it", what, prefix + name)
            continue
        labels.extend([len(class_names)] * len(files))
        class_names.append(name)
        paths.extend(prefix + f for f in files)
    if class_names and loose:
        raise DataError(
            f"{what}={str(root)!r} mixes images in class sub-folders with loose images such as "
            f"{loose[0]!r}; move the loose images into a class folder (labelled) or keep only "
            "loose images (unlabelled)"
        )
    if class_names:
        return paths, labels, class_names
    if loose:
        return loose, None, None
    raise DataError(
        f"{what}={str(root)!r} holds no images: expected files ending in "
        f"{', '.join(IMAGE_EXTENSIONS)} directly in it (unlabelled) or in class sub-folders"
    )


def _detect_mode(paths: Sequence[str]) -> str:
    """``"L"`` if the first readable image is grayscale, else ``"RGB"``."""
    for path in paths:
        try:
            with Image.open(path) as img:
                return "L" if Image.getmodebase(img.mode) == "L" else "RGB"
        except _DECODE_ERRORS:
            continue
    raise DataError(f"mode='auto': none of the {len(paths)} images could be read (first: {paths[0]!r})")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG, TIFF: modes ``I;16*`` and ``I``) scaled to 8 bits.

    PIL's own conversion of these modes to ``L`` clips at 255, which turns nearly every
    16-bit image white; here 0..65535 maps to 0..255 (rounded). A 32-bit ``I`` image with
    values beyond 16 bits is scaled by its maximum.
    """
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    array = np.asarray(img).astype(np.float64)
    top = 65535.0 if array.size == 0 or array.max() <= 65535 else float(array.max())
    scaled = np.rint(np.clip(array, 0, None) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 (H, W): mode "L"


class ImageFolderDataset(ImageDataset):
    """Images decoded lazily from files with PIL, resized and center-cropped to a square.

    Decoding happens in ``__getitem__``, so it runs in DataLoader worker processes.

    Args:
        paths: image file paths.
        labels: ``(N,)`` labels, or ``None`` when unlabelled.
        image_size: output side (the shorter side is resized, then center-cropped).
        mode: ``"RGB"`` or ``"L"``; every image is converted to it.
        on_error: ``"skip"``: an unreadable image yields ``None`` and is counted in
            :attr:`num_skipped` (a warning names the first one); ``"raise"``: it raises
            :class:`DataError` naming the file.
        num_classes: number of classes (``None`` when unlabelled).
        class_names: class names in label order.
        mask_paths: one segmentation mask file per image (a single-channel PNG of class
            ids), or ``None``. With masks the dataset has :meth:`get_masks` and
            :attr:`num_mask_classes` (what ``selfsup eval dense`` needs).
        num_mask_classes: number of mask classes; with ``mask_paths`` and ``None`` the
            builder sets :attr:`num_mask_classes` after scanning the masks.
    """

    #: Number of mask classes (ids ``0..num_mask_classes-1``); only set when the dataset has
    #: masks, so ``hasattr(ds, "num_mask_classes")`` tells whether it has any.
    num_mask_classes: int

    def __init__(
        self,
        paths: Sequence[str],
        labels: Tensor | None,
        image_size: int,
        mode: str = "RGB",
        on_error: str = "skip",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        mask_paths: Sequence[str] | None = None,
        num_mask_classes: int | None = None,
    ) -> None:
        if mode not in ("RGB", "L"):
            raise DataError(f"mode must be 'RGB' or 'L', got {mode!r}")
        if on_error not in ("skip", "raise"):
            raise DataError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        check_positive("image_size", image_size)
        # A numpy string array instead of a list of str: forked DataLoader workers touching
        # millions of Python objects would copy every page through refcount writes.
        self._paths = np.array(list(paths), dtype=str)
        if labels is not None and len(labels) != len(self._paths):
            raise DataError(f"{len(labels)} labels for {len(self._paths)} images")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.image_size = image_size
        self.mode = mode
        self.in_channels = 1 if mode == "L" else 3
        self.on_error = on_error
        self.num_classes = num_classes
        self.class_names = class_names
        self._failed: set[int] = set()
        self._warned = False
        self._mask_paths = None if mask_paths is None else np.array(list(mask_paths), dtype=str)
        if self._mask_paths is not None and len(self._mask_paths) != len(self._paths):
            raise DataError(f"{len(self._mask_paths)} mask paths for {len(self._paths)} images")
        if self._mask_paths is not None and num_mask_classes is not None:
            check_positive("mask_classes", num_mask_classes)
            self.num_mask_classes = num_mask_classes

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """File path of sample ``index``."""
        return str(self._paths[index])

    @property
    def num_skipped(self) -> int:
        """Number of distinct samples that failed to decode so far (seen by this process;
        the loaders report failures from worker processes back to it)."""
        return len(self._failed)

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the samples that failed to decode, sorted."""
        return sorted(self.path(i) for i in self._failed)

    def note_failures(self, indices: Iterable[int]) -> None:
        """Record samples that failed to decode; log a warning the first time."""
        new = [i for i in indices if i not in self._failed]
        if not new:
            return
        self._failed.update(new)
        if not self._warned:
            self._warned = True
            logger.warning(
                "skipping unreadable image %s (on_error='skip'; further failures are counted "
                "silently in dataset.num_skipped)",
                self.path(new[0]),
            )

    def load(self, index: int) -> Tensor:
        """Decode, convert, resize and crop sample ``index`` to uint8 ``(C, S, S)``.

        Raises PIL/OS errors for unreadable files.
        """
        size = self.image_size
        img: Image.Image  # Image.open gives an ImageFile; convert, crop and resize give plain Images
        with Image.open(self.path(index)) as img:
            # draft lets JPEG decode at a reduced scale (still >= size): big photos decode
            # several times faster.
            img.draft(self.mode, (size, size))
            img = _to_8bit(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns converting such palettes directly
            if img.mode != self.mode:
                img = img.convert(self.mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            # Crop the central square first, then resize: the same result as "resize the
            # shorter side, center-crop" without the filter reaching outside the square
            # (matches resize_images for the in-memory datasets).
            img = img.crop((left, top, left + side, top + side))
            if side != size:
                # Image.Resampling needs Pillow >= 9.1 (we support 9.0); its stubs omit the constant.
                img = img.resize((size, size), Image.BILINEAR)  # type: ignore[attr-defined]
            array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            return torch.from_numpy(array.copy()).unsqueeze(0)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def _read_mask(self, index: int, skip_unreadable: bool = False) -> np.ndarray | None:
        """The full-size mask of sample ``index``: int64 ``(H, W)`` class ids, checked to
        exist, be single-channel, hold ids >= 0 and have its image's size; ``None`` for an
        unreadable image with ``skip_unreadable`` and ``on_error="skip"``."""
        assert self._mask_paths is not None
        image_path, mask_path = self.path(index), str(self._mask_paths[index])
        if not os.path.isfile(mask_path):
            raise DataError(
                f"image {image_path!r} has no mask file {mask_path!r}; add it (a single-channel "
                "PNG of class ids at the image's relative path under masks=) or remove the image"
            )
        try:
            with Image.open(image_path) as img:
                image_wh = img.size  # the header only: no pixel decoding
        except _DECODE_ERRORS as e:
            if skip_unreadable and self.on_error == "skip":
                return None
            raise DataError(f"cannot read image {image_path!r}: {e}; delete or replace the file") from e
        try:
            with Image.open(mask_path) as mask:
                array = np.asarray(mask)  # "P": palette indices, "I;16"/"I": 16/32-bit ids
        except _DECODE_ERRORS as e:
            raise DataError(f"cannot read mask {mask_path!r}: {e}; replace the file") from e
        if array.ndim != 2 or array.dtype.kind not in "biu":
            raise DataError(
                f"mask {mask_path!r} is not a single-channel integer image (shape {array.shape}, "
                f"{array.dtype}); save class ids as a grayscale ('L') or palette ('P') PNG"
            )
        if (array.shape[1], array.shape[0]) != image_wh:
            raise DataError(
                f"mask {mask_path!r} is {array.shape[1]}x{array.shape[0]}px but its image "
                f"{image_path!r} is {image_wh[0]}x{image_wh[1]}px; save the mask at the image's size"
            )
        array = array.astype(np.int64)
        if array.size and array.min() < 0:
            raise DataError(f"mask {mask_path!r} holds negative class ids; class ids must be >= 0")
        return array

    @property
    def has_masks(self) -> bool:
        """Whether the dataset has a mask file per image."""
        return self._mask_paths is not None

    def mask_max_id(self) -> int:
        """The largest class id over every mask of the dataset (-1 when empty): decodes
        every mask once, checking it like :meth:`get_masks` (images that cannot be read are
        left out under ``on_error="skip"``, as the loaders leave them out)."""
        top = -1
        for i in range(len(self)):
            mask = self._read_mask(i, skip_unreadable=True)
            if mask is not None and mask.size:
                top = max(top, int(mask.max()))
        return top

    def get_masks(self, indices: Tensor) -> Tensor:
        """int64 masks ``(B, S, S)`` of the samples ``indices``, with the images' geometry:
        the central square of the shorter side, resized nearest-neighbour (pixel centres,
        as ``F.interpolate(mode="nearest-exact")``) so class ids stay ids.

        Raises :class:`DataError` for a missing mask file, a mask whose size differs from its
        image's, or a class id ``>= num_mask_classes``.
        """
        if self._mask_paths is None:
            raise DataError("this image-folder data set has no masks; pass masks=<folder> to the data set")
        size = self.image_size
        out = torch.empty((len(indices), size, size), dtype=torch.int64)
        for row, index in enumerate(torch.as_tensor(indices, dtype=torch.int64).tolist()):
            mask = self._read_mask(index)
            assert mask is not None
            h, w = mask.shape
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            # Source pixel of output pixel i: floor((i + 0.5) * side / size), in integers.
            src = (2 * np.arange(size) + 1) * side // (2 * size)
            out[row] = torch.from_numpy(mask[np.ix_(top + src, left + src)])
            limit = getattr(self, "num_mask_classes", None)
            if limit is not None and int(out[row].max()) >= limit:
                raise DataError(
                    f"mask {self._mask_paths[index]!r} holds class id {int(out[row].max())} >= "
                    f"mask_classes={limit}; raise mask_classes or fix the mask"
                )
        return out

    def __getitem__(self, index: int) -> Sample | None:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index = int(index) % n
        try:
            image = self.load(index)
        except _DECODE_ERRORS as e:
            if self.on_error == "raise":
                raise DataError(
                    f"cannot decode image {self.path(index)!r}: {e}; delete or replace the "
                    "file, or pass on_error='skip' to skip unreadable images"
                ) from e
            # In a worker the count would die with the worker's copy of the dataset; the
            # loader reports failures to the main process's copy instead.
            if get_worker_info() is None:
                self.note_failures([index])
            return None
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFolderDataset:
        """A new dataset of the given samples (indices renumbered from 0)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[idx]
        masks = None if self._mask_paths is None else self._mask_paths[idx.numpy()].tolist()
        return ImageFolderDataset(
            self._paths[idx.numpy()].tolist(),
            labels,
            self.image_size,
            self.mode,
            self.on_error,
            self.num_classes,
            self.class_names,
            masks,
            getattr(self, "num_mask_classes", None),
        )


def _relabel(labels: list[int], names: list[str], classes: list[str], what: str, root: str) -> Tensor:
    """Map ``labels`` indexing ``names`` onto the indices of ``classes``."""
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(
            f"{what}={root!r} has class folders {unknown} that the training images lack "
            f"(training classes: {classes}); the class sub-folder names must match"
        )
    lookup = torch.tensor([classes.index(n) for n in names], dtype=torch.int64)
    return lookup[torch.tensor(labels, dtype=torch.int64)]


def _mask_paths(paths: Sequence[str], root: str, masks: str | None, what: str) -> list[str] | None:
    """The mask file of each image: its path relative to ``root`` under ``masks``, ``.png``."""
    if masks is None:
        return None
    if not Path(masks).is_dir():
        raise DataError(f"{what}={masks!r} does not exist or is not a directory")
    return [os.path.join(masks, os.path.splitext(os.path.relpath(p, root))[0] + ".png") for p in paths]


def _keep_listed(paths: list[str], labels: list[int] | None, list_file: str) -> tuple[list[str], list[int] | None]:
    """The images of ``paths`` named in ``list_file`` (one path per line, absolute or relative
    to the list's folder; blank lines and ``#`` comments ignored), e.g. ``selfsup curate``'s
    ``curated.txt``; the folder's order is kept."""
    listing = Path(list_file)
    if not listing.is_file():
        raise DataError(f"list_file={list_file!r} does not exist or is not a file")
    lines = [line.strip() for line in listing.read_text().splitlines()]
    wanted = {os.path.abspath(os.path.join(listing.parent, x)) for x in lines if x and not x.startswith("#")}
    if not wanted:
        raise DataError(f"list_file={list_file!r} names no images; give one image path per line")
    keep = [i for i, path in enumerate(paths) if os.path.abspath(path) in wanted]
    if len(keep) != len(wanted):
        found = {os.path.abspath(paths[i]) for i in keep}
        missing = sorted(wanted - found)
        raise DataError(
            f"list_file={list_file!r} names {len(missing)} image(s) that are not under root, such as "
            f"{missing[0]!r}; list images of root only (or point root at their folder)"
        )
    return [paths[i] for i in keep], None if labels is None else [labels[i] for i in keep]


@DATASETS.register("image-folder")
def build_image_folder(
    root: str,
    train_root: str | None = None,
    test_root: str | None = None,
    image_size: int | None = 64,
    mode: str = "RGB",
    on_error: str = "skip",
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    stats_samples: int = 2000,
    masks: str | None = None,
    train_masks: str | None = None,
    test_masks: str | None = None,
    mask_classes: int | None = None,
    list_file: str | None = None,
    index_cache: str | None = "auto",
) -> DataSplits:
    """Images in folders, labelled by class sub-folder (``root/<class>/**/<img>``) or
    unlabelled (``root/<img>``).

    Splits:
        * only ``root`` with class folders: seeded stratified ``test_fraction`` split into
          ``train``/``test``; ``pretrain`` is ``train``.
        * ``root`` + ``test_root``: ``pretrain = train = root``, ``test = test_root``.
        * ``root`` + ``train_root`` (+ ``test_root``): ``pretrain`` is all of ``root``
          (labelled or not, e.g. STL-10's unlabelled pool), ``train``/``test`` come from
          ``train_root`` (split as above when ``test_root`` is missing).
        * only an unlabelled ``root``: ``pretrain`` is every image, ``train``/``test`` are
          empty and ``num_classes`` is 0 (kNN / linear evaluation are impossible).

    Args:
        root: pretraining images.
        train_root: labelled training images for evaluation (class sub-folders).
        test_root: labelled test images (class sub-folder names must be training classes).
        image_size: output side; the shorter side is resized (bilinear), then center-cropped.
        mode: ``"RGB"``, ``"L"`` (grayscale) or ``"auto"`` (from the first image); images
            of the other kind are converted.
        on_error: ``"skip"`` unreadable images (counted in each dataset's ``num_skipped``,
            a warning names the first) or ``"raise"`` a :class:`DataError` naming the file.
        test_fraction: fraction of each class held out when no ``test_root`` is given.
        seed: seed of the split and of the ``limit`` subset.
        limit: cap on the samples of each split (seeded random subset).
        stats_samples: images decoded to estimate the mean/std (decoding is the cost).
        masks: segmentation masks of ``root``'s images (for ``selfsup eval dense``): a folder
            mirroring ``root``, one single-channel PNG per image at the same relative path
            with extension ``.png`` (``root/cat/a.jpg`` -> ``masks/cat/a.png``), whose pixel
            values are class ids (0 = background by convention), at the image's size. Masks
            follow the images' geometry (central square, resized nearest-neighbour).
        train_masks: the same for ``train_root`` (needed with ``train_root`` and ``masks``).
        test_masks: the same for ``test_root`` (needed with ``test_root`` and masks).
        mask_classes: number of mask classes; ``None`` scans the masks of the ``train`` and
            ``test`` splits once at build time (after ``limit``; this also checks every mask
            early) and takes the largest id + 1. Give it to skip the scan on big folders.
        list_file: keep only the images of ``root`` named in this text file (one path per
            line, absolute or relative to the file's folder), e.g. the ``curated.txt`` that
            ``selfsup curate`` writes (DINOv2's curated pool).
        index_cache: where the file lists of big folders are cached (reused while the
            folders are unchanged): ``"auto"`` (``$SELFSUP_CACHE_DIR`` or
            ``~/.cache/selfsup``), a folder, or ``None`` to scan every time.
    """
    if image_size is None:
        raise DataError(
            "image-folder needs image_size=<int> (default 64): images of different sizes must be resized to be batched"
        )
    check_positive("image_size", image_size)
    check_positive("limit", limit)
    check_positive("stats_samples", stats_samples)
    if mode not in ("RGB", "L", "auto"):
        raise DataError(f"mode must be 'RGB', 'L' or 'auto', got {mode!r}")
    if on_error not in ("skip", "raise"):
        raise DataError(f"on_error must be 'skip' or 'raise', got {on_error!r}")

    check_positive("mask_classes", mask_classes)
    for option, value, folder in (("train_masks", train_masks, train_root), ("test_masks", test_masks, test_root)):
        if value is not None and folder is None:
            raise DataError(f"{option}={value!r} mirrors {option[:-5]}root, which is not given; pass both or neither")
    has_masks = any(m is not None for m in (masks, train_masks, test_masks))
    if has_masks:
        needed = {"train_masks": train_masks} if train_root is not None else {"masks": masks}
        if test_root is not None:
            needed["test_masks"] = test_masks
        missing = [option for option, value in needed.items() if value is None]
        if missing:
            raise DataError(f"with masks, both the train and the test images need them: pass {missing[0]}=<folder> too")

    root_paths, root_labels, root_classes = scan_image_folder(root, "root", index_cache)
    if list_file is not None:
        root_paths, root_labels = _keep_listed(root_paths, root_labels, list_file)
    if mode == "auto":
        mode = _detect_mode(root_paths)
    if has_masks and root_classes is None and train_root is None:
        raise DataError(
            f"masks: root={root!r} holds loose images, so there are no train/test splits to "
            "probe; put the images in one class sub-folder (root/all/<image>, masks/all/<mask>)"
        )
    mask_roots = {
        root: ("masks", masks),
        train_root: ("train_masks", train_masks),
        test_root: ("test_masks", test_masks),
    }

    def make(
        paths: Sequence[str], labels: Tensor | None, classes: list[str] | None, where: str | None = None
    ) -> ImageFolderDataset:
        """A dataset sharing this call's size, mode and error policy (with the masks of the
        folder ``where`` the paths come from, if it has any)."""
        num = None if classes is None else len(classes)
        option, folder = mask_roots.get(where, ("masks", None))
        mask_paths = _mask_paths(paths, where, folder, option) if where is not None else None
        return ImageFolderDataset(paths, labels, image_size, mode, on_error, num, classes, mask_paths, mask_classes)

    def split(
        paths: list[str], labels: list[int], classes: list[str], where: str
    ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        """Seeded stratified train/test split of one labelled folder."""
        full = make(paths, torch.tensor(labels, dtype=torch.int64), classes, where)
        assert full.labels is not None
        gen = torch.Generator().manual_seed(seed)
        train_idx, test_idx = stratified_split(full.labels, test_fraction, gen)
        return full.subset(train_idx), full.subset(test_idx)

    if train_root is not None:
        pretrain = make(root_paths, None, None, root)
        train_paths, train_labels, classes = scan_image_folder(train_root, "train_root", index_cache)
        train_where = train_root
        if classes is None or train_labels is None:
            raise DataError(
                f"train_root={train_root!r} holds loose images; labelled training images must "
                "sit in class sub-folders (train_root/<class>/<image>)"
            )
    elif root_classes is not None and root_labels is not None:
        train_paths, train_labels, classes = root_paths, root_labels, root_classes
        train_where = root
        pretrain = None
    else:
        if test_root is not None:
            raise DataError(
                f"test_root={test_root!r} needs labelled training images, but root={root!r} "
                "is unlabelled: put root's images in class sub-folders or pass train_root"
            )
        pretrain = make(root_paths, None, None)
        empty = make([], None, None)
        return _finish("image-folder", pretrain, empty, make([], None, None), 0, limit, seed, stats_samples)

    if test_root is not None:
        test_paths, test_labels, test_classes = scan_image_folder(test_root, "test_root", index_cache)
        if test_classes is None or test_labels is None:
            raise DataError(
                f"test_root={test_root!r} holds loose images; test images must sit in class "
                "sub-folders named like the training classes"
            )
        train = make(train_paths, torch.tensor(train_labels, dtype=torch.int64), classes, train_where)
        test_labels_t = _relabel(test_labels, test_classes, classes, "test_root", test_root)
        test = make(test_paths, test_labels_t, classes, test_root)
    else:
        train, test = split(train_paths, train_labels, classes, train_where)
    if pretrain is None:
        pretrain = train
    splits = _finish("image-folder", pretrain, train, test, len(classes), limit, seed, stats_samples)
    if has_masks and mask_classes is None:
        # One pass over the masks the dense probe reads (train and test), not pretrain's.
        probed = [d for d in (splits.train, splits.test) if isinstance(d, ImageFolderDataset)]
        found = max(d.mask_max_id() for d in probed)
        for d in (splits.pretrain, splits.train, splits.test):
            if isinstance(d, ImageFolderDataset) and d.has_masks:
                d.num_mask_classes = max(found + 1, 1)
    return splits


# ------------------------------------------------------------------------------------ CIFAR

# The CIFAR pickles hold only dicts, lists, bytes and numpy arrays; refusing every other
# global keeps a malicious pickle from running code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR pickle needs."""

    def find_class(self, module: str, name: str) -> object:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if target[0] == "numpy":
            # numpy 2 moved numpy.core to numpy._core; resolve whichever exists without
            # touching the deprecated alias.
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray  # type: ignore[no-redef]
            return getattr(np, name) if name in ("ndarray", "dtype") else getattr(multiarray, name)
        import _codecs

        return _codecs.encode


def _load_pickle(path: Path) -> dict:
    """Load a python-format CIFAR pickle (a dict with bytes keys) safely."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(
            f"cannot read CIFAR pickle {path}: {e}; the file is truncated or not in the "
            "python CIFAR format: extract the python version of the archive again"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict; not a python-format CIFAR batch")
    return obj


def _cifar_batch(path: Path, label_key: bytes) -> tuple[Tensor, Tensor]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of one CIFAR pickle."""
    d = _load_pickle(path)
    if b"data" not in d or label_key not in d:
        raise DataError(
            f"{path} lacks key {b'data' if b'data' not in d else label_key!r} "
            f"(has {sorted(d)}); not a python-format CIFAR batch"
        )
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: expected uint8 data (N, 3072) and N labels, got data {data.dtype} "
            f"{data.shape} and labels {labels.shape}"
        )
    # Rows are the red, green then blue planes of a 32x32 image: already CHW order.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


@DATASETS.register("cifar")
def build_cifar(
    root: str,
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """CIFAR-10 or CIFAR-100 in the python pickle format, detected from the files.

    ``pretrain`` and ``train`` are the 50k training images; ``test`` the 10k test images.
    CIFAR-100 uses the 100 fine labels.

    Args:
        root: the extracted ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``)
            or ``cifar-100-python`` (``train``, ``test``) folder, or a folder containing one.
        limit: cap on the samples of each split (seeded random subset).
        image_size: resize to this side; ``None`` keeps 32.
        seed: seed of the ``limit`` subset.

    References:
        Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    """
    check_positive("limit", limit)
    check_positive("image_size", image_size)
    base = Path(root)
    if base.is_file():
        raise DataError(
            f"root={root!r} is a file; extract the archive (tar xzf {base.name}) and pass the "
            "cifar-10-batches-py or cifar-100-python folder"
        )
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (base / sub).is_dir():
            base = base / sub
            break
    if (base / "data_batch_1").is_file() or (base / "test_batch").is_file():
        name, label_key, num_classes = "cifar10", b"labels", 10
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, names_key = base / "test_batch", base / "batches.meta", b"label_names"
    elif (base / "train").is_file() and (base / "test").is_file():
        name, label_key, num_classes = "cifar100", b"fine_labels", 100
        train_files = [base / "train"]
        test_file, meta_file, names_key = base / "test", base / "meta", b"fine_label_names"
    else:
        raise DataError(
            f"root={root!r} is not an extracted python-format CIFAR folder: expected "
            "data_batch_1..data_batch_5 and test_batch (cifar-10-batches-py) or train and "
            "test (cifar-100-python)"
        )
    for f in (*train_files, test_file):
        if not f.is_file():
            raise DataError(f"CIFAR file {f} is missing; extract the full archive again")
    parts = [_cifar_batch(f, label_key) for f in train_files]
    train_images = torch.cat([p[0] for p in parts])
    train_labels = torch.cat([p[1] for p in parts])
    test_images, test_labels = _cifar_batch(test_file, label_key)
    for labels, f in ((train_labels, train_files[0]), (test_labels, test_file)):
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise DataError(f"{f}: labels outside 0..{num_classes - 1}; not {name}")
    class_names = None
    if meta_file.is_file():
        meta = _load_pickle(meta_file)
        if names_key in meta:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    train_images = _maybe_resize(train_images, image_size)
    test_images = _maybe_resize(test_images, image_size)
    train = TensorImageDataset(train_images, train_labels, num_classes, class_names)
    test = TensorImageDataset(test_images, test_labels, num_classes, class_names)
    return _finish(name, train, train, test, num_classes, limit, seed)


# -------------------------------------------------------------------------------------- npz

_LAYOUTS = ("NHW", "NHWC", "NCHW")


def _images_from_array(arr: np.ndarray, key: str, path: str, layout: str | None) -> Tensor:
    """Convert one npz image array to uint8 ``(N, C, H, W)`` (see :func:`build_npz`)."""
    where = f"{path}[{key!r}]"
    if arr.ndim == 3:
        if layout not in (None, "NHW"):
            raise DataError(f"{where} is 3-d {arr.shape}, which only fits layout 'NHW', not {layout!r}")
        arr = arr[:, None]
    elif arr.ndim == 4:
        if layout is None:
            first, last = arr.shape[1] in (1, 3), arr.shape[3] in (1, 3)
            if first and last:
                raise DataError(
                    f"{where} has shape {arr.shape}: ambiguous, both axis 1 and axis 3 could be "
                    "channels; pass layout='NHWC' or layout='NCHW'"
                )
            if not (first or last):
                raise DataError(
                    f"{where} has shape {arr.shape}: no channel axis of size 1 or 3 at position "
                    "1 (N, C, H, W) or 3 (N, H, W, C); drop an alpha channel or pass layout=..."
                )
            layout = "NCHW" if first else "NHWC"
        if layout == "NHWC":
            arr = arr.transpose(0, 3, 1, 2)
        elif layout != "NCHW":
            raise DataError(f"{where} is 4-d {arr.shape}; layout must be 'NHWC' or 'NCHW', not {layout!r}")
        if arr.shape[1] not in (1, 3):
            raise DataError(f"{where}: {arr.shape[1]} channels in layout {layout}; expected 1 or 3")
    else:
        raise DataError(f"{where} has shape {arr.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"{where} has dtype {arr.dtype}; expected uint8 or float in [0, 1]")
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{where} is {arr.dtype} with values outside 0..255; expected uint8 pixels")
        out = arr.astype(np.uint8)
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{where} is {arr.dtype} with values in [{lo}, {hi}]; float images must lie in "
                "[0, 1]: divide by 255 (or save uint8 pixels)"
            )
        out = np.rint(arr * 255.0).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out))


def _labels_from_array(arr: np.ndarray, key: str, path: str, n: int) -> Tensor:
    """Validate an npz label array and return it as int64 ``(n,)``."""
    where = f"{path}[{key!r}]"
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where} has dtype {arr.dtype}; labels must be integers (astype(np.int64))")
    if arr.shape != (n,):
        raise DataError(f"{where} has shape {arr.shape}; expected ({n},), one label per image")
    if n and arr.min() < 0:
        raise DataError(f"{where} has negative labels; classes must be numbered 0..K-1")
    return torch.from_numpy(arr.astype(np.int64))


@DATASETS.register("npz")
def build_npz(
    path: str,
    layout: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """Images and labels from a NumPy ``.npz`` archive.

    Keys:
        * ``x_train`` (required): training images.
        * ``y_train``: integer labels ``(N,)`` (or ``(N, 1)``) numbered ``0..K-1``. Without
          it the archive is unlabelled: ``train``/``test`` are empty and ``num_classes`` 0.
        * ``x_test`` + ``y_test`` (optional, together): held-out test set; when absent a
          seeded stratified ``test_fraction`` of the training images is held out.
        * ``x_unlabeled`` (optional): extra images added to ``pretrain`` (label -1).

    Image layouts: ``(N, H, W)`` grayscale, ``(N, H, W, C)`` or ``(N, C, H, W)`` with
    ``C`` in {1, 3}, detected from which axis has size 1 or 3. A shape where both axis 1
    and axis 3 could be channels (e.g. ``(N, 3, 32, 3)``) is rejected unless ``layout``
    ("NHW", "NHWC" or "NCHW") says which. Pixels are uint8 (or integers in 0..255) or
    floats in [0, 1]; anything else is rejected. Non-square images need ``image_size``.

    Args:
        path: the ``.npz`` file.
        layout: force the image layout instead of detecting it.
        test_fraction: held-out fraction per class when there is no ``x_test``.
        seed: seed of the split and of the ``limit`` subset.
        limit: cap on the samples of each split (seeded random subset).
        image_size: resize the shorter side to this, then center-crop.
    """
    check_positive("limit", limit)
    check_positive("image_size", image_size)
    if layout is not None and layout not in _LAYOUTS:
        raise DataError(f"layout must be one of {_LAYOUTS} or None, got {layout!r}")
    if not Path(path).is_file():
        raise DataError(f"npz file path={path!r} does not exist")
    try:
        # allow_pickle=False: an .npz must not be able to run code when loaded.
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path!r} as an .npz of plain numeric arrays: {e}") from e
    if "x_train" not in arrays:
        raise DataError(f"{path!r} lacks the required key 'x_train' (has {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path!r}: 'x_test' and 'y_test' must be given together")
    if "x_test" in arrays and "y_train" not in arrays:
        raise DataError(f"{path!r} has a labelled test set but no 'y_train' for the training images")

    images = {
        k: _images_from_array(arrays[k], k, path, layout) for k in ("x_train", "x_test", "x_unlabeled") if k in arrays
    }
    channels = {k: v.shape[1] for k, v in images.items()}
    if len(set(channels.values())) > 1:
        raise DataError(f"{path!r}: image arrays have different channel counts {channels}")
    for k, v in list(images.items()):
        if image_size is None and v.shape[2] != v.shape[3]:
            raise DataError(
                f"{path}[{k!r}] images are {v.shape[2]}x{v.shape[3]}, not square; pass "
                "image_size=... to resize the shorter side and center-crop"
            )
        images[k] = _maybe_resize(v, image_size)
    sizes = {k: v.shape[-1] for k, v in images.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{path!r}: image arrays have different sizes {sizes}; pass image_size=...")

    x_train = images["x_train"]
    if "y_train" not in arrays:
        parts = [x_train] + ([images["x_unlabeled"]] if "x_unlabeled" in images else [])
        pool = TensorImageDataset(torch.cat(parts))
        c, s = pool.in_channels, pool.image_size
        empty = TensorImageDataset(torch.empty((0, c, s, s), dtype=torch.uint8))
        return _finish("npz", pool, empty, empty.subset([]), 0, limit, seed)

    y_train = _labels_from_array(arrays["y_train"], "y_train", path, len(x_train))
    if "x_test" in images:
        x_test = images["x_test"]
        y_test = _labels_from_array(arrays["y_test"], "y_test", path, len(x_test))
        num_classes = int(torch.cat([y_train, y_test]).max()) + 1
        train = TensorImageDataset(x_train, y_train, num_classes)
        test = TensorImageDataset(x_test, y_test, num_classes)
    else:
        num_classes = int(y_train.max()) + 1 if len(y_train) else 0
        full = TensorImageDataset(x_train, y_train, num_classes)
        train_idx, test_idx = stratified_split(y_train, test_fraction, torch.Generator().manual_seed(seed))
        train, test = full.subset(train_idx), full.subset(test_idx)
    pretrain: ImageDataset = train
    if "x_unlabeled" in images:
        extra = images["x_unlabeled"]
        assert train.labels is not None
        pretrain = TensorImageDataset(
            torch.cat([train.images, extra]),
            torch.cat([train.labels, torch.full((len(extra),), -1, dtype=torch.int64)]),
            num_classes,
        )
    return _finish("npz", pretrain, train, test, num_classes, limit, seed)
