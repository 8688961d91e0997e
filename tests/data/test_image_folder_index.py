"""Tests of the image-folder index: the scandir walk and its cache of big folders' file lists."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from selfsup.data import DataError, scan_image_folder
from selfsup.data import datasets as ds_module
from selfsup.data.datasets import IMAGE_EXTENSIONS, build_image_folder, index_cache_dir

PAST = time.time() - 3600  # folder times an hour old: outside the racy window


def _reference_scan(root: Path) -> tuple[list[str], list[int] | None, list[str] | None]:
    """The layout rules written out with os.walk (the scan before the index existed)."""

    def images(folder: str) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        return found

    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for entry in (e for e in entries if e.is_dir()):
        files = images(entry.path)
        if files:
            labels += [len(classes)] * len(files)
            classes.append(entry.name)
            paths += files
    if classes:
        return paths, labels, classes
    return [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)], None, None


def _touch_all(root: Path, when: float = PAST) -> None:
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (when, when))


def _labelled(root: Path, per_class: int = 100) -> Path:
    """Three classes of empty ``.png`` files (the index never opens them), one nested folder,
    hidden and non-image files, an empty class folder; all folder times an hour old."""
    for cls in ("b_dog", "a_cat", "c_owl"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / cls / f"{i:03d}.PNG" if i % 7 == 0 else root / cls / f"{i:03d}.png").touch()
    (root / "a_cat" / "nested" / "deeper").mkdir(parents=True)
    (root / "a_cat" / "nested" / "x.jpg").touch()
    (root / "a_cat" / "nested" / "deeper" / "y.webp").touch()
    (root / "a_cat" / ".hidden.png").touch()
    (root / "a_cat" / "notes.txt").touch()
    (root / ".git").mkdir()
    (root / "empty_class").mkdir()
    _touch_all(root)
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(folder))
    monkeypatch.setattr(ds_module, "INDEX_CACHE_MIN_FILES", 10)
    return folder


class _Spy:
    """Counts the folder walks of the scan."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = ds_module._walk_images

        def walk(*args: object) -> list[str]:
            self.calls += 1
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(ds_module, "_walk_images", walk)


def test_scan_matches_the_os_walk_rules(tmp_path: Path, cache: Path) -> None:
    root = _labelled(tmp_path / "data")
    got = scan_image_folder(root)
    assert got == _reference_scan(root)
    paths, labels, classes = got
    assert classes == ["a_cat", "b_dog", "c_owl"] and labels is not None and len(paths) == 302
    assert paths[100:102] == [str(root / "a_cat" / "nested" / "x.jpg"), str(root / "a_cat/nested/deeper/y.webp")]
    assert scan_image_folder(root) == got  # from the cache: the same lists
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("b.png", "a.jpg", "c.txt"):
        (loose / name).touch()
    assert (
        scan_image_folder(loose)
        == _reference_scan(loose)
        == (sorted(str(loose / n) for n in ("a.jpg", "b.png")), None, None)
    )
    (loose / "cls").mkdir()
    (loose / "cls" / "x.png").touch()
    with pytest.raises(DataError, match="mixes images in class sub-folders with loose images"):
        scan_image_folder(loose)


def test_the_cache_is_reused_until_a_folder_changes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _labelled(tmp_path / "data")
    spy = _Spy(monkeypatch)
    first = scan_image_folder(root)
    assert spy.calls > 0 and len(list((cache / "index").glob("*.json"))) == 1
    spy.calls = 0
    with caplog.at_level("WARNING"):
        assert scan_image_folder(root) == first
    assert spy.calls == 0  # no walk: the index file answered
    assert "empty_class holds no images" in caplog.text  # the warning still comes
    # A new file in a class folder changes that folder's time: rebuilt, with the file.
    (root / "b_dog" / "new.png").touch()
    paths, labels, classes = scan_image_folder(root)
    assert spy.calls > 0 and str(root / "b_dog" / "new.png") in paths and len(paths) == 303
    # A new file two levels down: only that folder's time changes, and it is checked too.
    _touch_all(root)
    scan_image_folder(root)
    spy.calls = 0
    (root / "a_cat" / "nested" / "deeper" / "z.png").touch()
    assert str(root / "a_cat/nested/deeper/z.png") in scan_image_folder(root)[0] and spy.calls > 0
    # A removed class folder.
    _touch_all(root)
    scan_image_folder(root)
    for f in (root / "c_owl").iterdir():
        f.unlink()
    (root / "c_owl").rmdir()
    assert scan_image_folder(root)[2] == ["a_cat", "b_dog"]
    # The builder passes its index_cache option on: None scans without the cache.
    _touch_all(root)
    spy.calls = 0
    with pytest.raises(DataError, match="could be decoded"):  # empty files; the scan came first
        build_image_folder(root=str(root), image_size=8, index_cache=None, stats_samples=1)
    assert spy.calls > 0


def test_a_just_modified_folder_is_not_trusted(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder changed within the file system's time granularity of the scan may change again
    # without a new time: its index is rebuilt until the folder is older.
    root = _labelled(tmp_path / "data")
    _touch_all(root, time.time())
    spy = _Spy(monkeypatch)
    scan_image_folder(root)
    calls = spy.calls
    scan_image_folder(root)
    assert spy.calls == 2 * calls


def test_small_folders_unwritable_caches_and_broken_indexes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _labelled(tmp_path / "data", per_class=2)
    monkeypatch.setattr(ds_module, "INDEX_CACHE_MIN_FILES", 1000)
    scan_image_folder(root)
    assert not cache.exists()  # a small folder scans in milliseconds: no index file
    monkeypatch.setattr(ds_module, "INDEX_CACHE_MIN_FILES", 1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert scan_image_folder(root, index_cache=str(blocker)) == _reference_scan(root)  # cannot write: still scans
    want = scan_image_folder(root)
    (index,) = (cache / "index").glob("*.json")
    index.write_text("{broken")
    assert scan_image_folder(root) == want
    data = json.loads(index.read_text())  # rewritten
    assert data["root"] == os.path.realpath(root) and scan_image_folder(root) == want


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SELFSUP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert index_cache_dir() == tmp_path / "selfsup"
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(tmp_path / "c"))
    assert index_cache_dir() == tmp_path / "c" and index_cache_dir("/x") == Path("/x") and index_cache_dir(None) is None


def test_link_cycles_are_walked_once(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a.png").touch()
    os.symlink(root / "cls", root / "cls" / "loop")
    paths, labels, classes = scan_image_folder(root)
    assert paths == [str(root / "cls" / "a.png")] and classes == ["cls"]
