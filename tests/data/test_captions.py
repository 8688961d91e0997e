"""Image-text data: caption files (JSONL, CSV, COCO JSON), per-epoch caption sampling, the
scenes captions with held-out combinations, and the one-line errors for bad caption data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import DataError, build_data
from selfsup.data.captions import (
    caption_lists,
    has_captions,
    held_out_samples,
    read_caption_file,
    sample_captions,
    training_captions,
)
from selfsup.engine.build import provided_fields


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(np.full((12, 12, 3), 20 * i, dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_jsonl_csv_and_coco_give_the_same_captions_grouped_per_image(tmp_path: Path) -> None:
    names = _images(tmp_path, 3)
    pairs = [(names[0], "a dark square"), (names[1], "a grey square"), (names[0], "something dark")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in pairs))
    (tmp_path / "c.csv").write_text("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in pairs))
    coco = {
        "images": [{"id": 7 + i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": 7 + names.index(p), "caption": c} for p, c in pairs],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    for file in ("c.jsonl", "c.csv", "c.json"):
        paths, captions, labels = read_caption_file(tmp_path / file)
        assert [Path(p).name for p in paths] == names[:2], file
        assert captions == [["a dark square", "something dark"], ["a grey square"]], file
        assert labels == [None, None]


def test_caption_folder_dataset_splits_and_labels(tmp_path: Path) -> None:
    names = _images(tmp_path / "imgs", 10)
    rows = [{"path": n, "captions": [f"picture {i}", f"photo {i}"], "label": "even" if i % 2 == 0 else "odd"}
            for i, n in enumerate(names)]  # fmt: skip
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = build_data("captions", file=str(tmp_path / "caps.jsonl"), images=str(tmp_path / "imgs"),
                        image_size=8, test_fraction=0.2)  # fmt: skip
    assert splits.num_classes == 2 and len(splits.train) == 8 and len(splits.test) == 2
    assert splits.test.class_names == ["even", "odd"]
    assert has_captions(splits.pretrain) and "text" in provided_fields(splits.pretrain)
    lists = caption_lists(splits.test)
    assert all(len(c) == 2 for c in lists)
    # A subset keeps each image's own captions (the label says which picture it is).
    for captions, label in zip(lists, splits.test.labels.tolist()):
        assert int(captions[0].split()[-1]) % 2 == label


def test_sample_captions_is_deterministic_per_epoch_and_covers_every_caption() -> None:
    lists = [[f"img {i} cap {j}" for j in range(3)] for i in range(50)]
    idx = torch.arange(50)
    first = sample_captions(lists, idx, epoch=0, seed=0)
    assert first == sample_captions(lists, idx.flip(0), epoch=0, seed=0)[::-1]  # order-free
    assert first != sample_captions(lists, idx, epoch=1, seed=0)
    assert first != sample_captions(lists, idx, epoch=0, seed=1)
    assert all(c.startswith(f"img {i} ") for i, c in enumerate(first))
    seen = {c for e in range(40) for c in sample_captions(lists, idx, e, 0)}
    assert len(seen) == 150


def test_scenes_captions_hold_out_combinations_from_training() -> None:
    splits = build_data(
        "scenes", num_train=400, num_test=400, image_size=16, max_objects=1, label="shape_color",
        hold_out=["green triangle"],
    )  # fmt: skip
    train = training_captions(splits.pretrain)
    assert len(train) == 3 * 400 and not any("green triangle" in c for c in train)
    assert not held_out_samples(splits.pretrain, ["green triangle"]).any()
    held = held_out_samples(splits.test, ["green triangle"])
    assert held is not None and 0 < int(held.sum()) < 400
    test_lists = caption_lists(splits.test)
    for i in torch.nonzero(held).flatten().tolist():
        assert "green triangle" in test_lists[i][0]
        assert splits.test.class_names[int(splits.test.labels[i])] == "green triangle"
    assert held_out_samples(splits.test, None) is None


def test_missing_images_empty_captions_and_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    names = _images(tmp_path, 1)
    bad = tmp_path / "missing.jsonl"
    bad.write_text(
        json.dumps({"path": names[0], "caption": "ok"}) + "\n" + json.dumps({"path": "nope.png", "caption": "x"})
    )
    with pytest.raises(DataError, match=r"1 of 2 images do not exist \(first: .*nope.png") as err:
        read_caption_file(bad)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty.csv"
    empty.write_text(f"path,caption\n{names[0]},\n")
    with pytest.raises(DataError, match=r"empty.csv line 2: empty caption"):
        read_caption_file(empty)
    header = tmp_path / "header.csv"
    header.write_text(f"file,text\n{names[0]},a\n")
    with pytest.raises(DataError, match="header with the columns path,caption"):
        read_caption_file(header)
    with pytest.raises(DataError, match=r"must end in \.jsonl, \.csv or \.json"):
        read_caption_file(tmp_path / names[0])
    with pytest.raises(DataError, match="does not exist"):
        read_caption_file(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="has no captions"):
        caption_lists(build_data("digits", limit=20).pretrain)
