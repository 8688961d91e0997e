"""The synthetic ``scenes`` data set: determinism per index, masks, labels, captions, hold-out."""

from __future__ import annotations

import pytest
import torch

from selfsup.cli import main
from selfsup.data import DataError, build_data
from selfsup.data.scenes import COLORS, SHAPES, SIZES, TEXTURES, ScenesDataset, generate_scenes, render_scenes


@pytest.fixture(scope="module")
def scenes() -> ScenesDataset:
    return generate_scenes(96, seed=3, max_objects=4)


def test_same_index_same_scene_whatever_the_batch() -> None:
    whole = render_scenes(torch.arange(40), seed=5)
    picked = render_scenes(torch.tensor([37, 3, 12, 3]), seed=5)
    for key, value in picked.items():
        assert torch.equal(value, whole[key][torch.tensor([37, 3, 12, 3])]), key
    a = generate_scenes(50, seed=5, chunk=7)
    b = generate_scenes(50, seed=5, chunk=256)
    assert a.labels is not None and b.labels is not None
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.images[:40], whole["images"])
    other = render_scenes(torch.arange(40), seed=6)
    assert not torch.equal(other["images"], whole["images"])
    test_stream = render_scenes(torch.arange(40), seed=5, split=1)
    assert not torch.equal(test_stream["images"], whole["images"])


def test_build_splits_shapes_dtypes_and_limit() -> None:
    splits = build_data("scenes", num_train=48, num_test=20, image_size=24, seed=1)
    assert splits.pretrain is splits.train
    assert (len(splits.train), len(splits.test)) == (48, 20)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (len(SHAPES), 3, 24)
    train = splits.train
    assert isinstance(train, ScenesDataset)
    assert train.images.dtype == torch.uint8 and train.images.shape == (48, 3, 24, 24)
    assert train.masks.shape == (48, 24, 24) and train.instance_masks.shape == (48, 24, 24)
    assert train.objects.shape == (48, 3, 5) and train.positions.shape == (48, 3, 3)
    assert train.class_names == list(SHAPES)
    idx = torch.tensor([5, 0, 7])
    images, labels, got = train.get_batch(idx)
    assert torch.equal(images, train.images[idx]) and torch.equal(got, idx)
    assert train.get_masks(idx).dtype == torch.int64
    sub = train.subset([7, 5])
    assert isinstance(sub, ScenesDataset) and torch.equal(sub.masks, train.masks[torch.tensor([7, 5])])
    assert sub.captions == [train.captions[7], train.captions[5]]
    assert all(0 < m < 1 for m in splits.mean) and all(0 < s < 1 for s in splits.std)
    limited = build_data("scenes", num_train=48, num_test=20, image_size=24, seed=1, limit=10)
    assert len(limited.train) == 10 and len(limited.test) == 10
    assert torch.equal(limited.train.images, train.images[:10])  # type: ignore[attr-defined]


def test_masks_agree_with_pixels_and_objects(scenes: ScenesDataset) -> None:
    brightest = scenes.images.max(dim=1).values  # (N, H, W)
    background = scenes.masks == 0
    # Every palette colour has a channel >= 190; the background stays below ~110 (+ noise 10).
    assert int(brightest[background].max()) <= 125
    assert int(brightest[~background].min()) >= 170
    assert background.any() and (~background).any()
    # Semantic mask = 1 + shape of the visible (top-most) object; instance pixel counts stored.
    for i in range(len(scenes)):
        for j in range(scenes.objects.shape[1]):
            shape, _, _, _, visible = scenes.objects[i, j].tolist()
            where = scenes.instance_masks[i] == j + 1
            assert int(where.sum()) == max(visible, 0)
            if shape >= 0:
                assert bool((scenes.masks[i][where] == shape + 1).all())
    assert torch.equal(scenes.masks == 0, scenes.instance_masks == 0)
    assert int(scenes.masks.max()) <= len(SHAPES)


def test_label_is_the_largest_visible_objects_shape(scenes: ScenesDataset) -> None:
    assert scenes.labels is not None
    for i in range(len(scenes)):
        best, best_r = None, -1.0
        for j in range(scenes.objects.shape[1]):
            shape, _, _, _, visible = scenes.objects[i, j].tolist()
            radius = float(scenes.positions[i, j, 2])
            if shape >= 0 and visible > 0 and radius > best_r:
                best, best_r = shape, radius
        assert int(scenes.labels[i]) == best
    # Every shape class occurs (a 5-way problem, not a degenerate one).
    assert set(scenes.labels.tolist()) == set(range(len(SHAPES)))
    color = generate_scenes(96, seed=3, max_objects=4, label="color")
    both = generate_scenes(96, seed=3, max_objects=4, label="shape_color")
    assert both.labels is not None and color.labels is not None
    assert torch.equal(both.labels, scenes.labels * len(COLORS) + color.labels)
    assert both.num_classes == len(SHAPES) * len(COLORS) and both.class_names is not None
    name = f"{COLORS[int(color.labels[0])]} {SHAPES[int(scenes.labels[0])]}"
    assert both.class_names[int(both.labels[0])] == name


def test_captions_mention_the_visible_objects(scenes: ScenesDataset) -> None:
    captions = scenes.captions
    assert len(captions) == len(scenes)
    for i, caption in enumerate(captions):
        visible = [o for o in scenes.objects[i].tolist() if o[0] >= 0 and o[4] > 0]
        assert caption.count("a ") >= len(visible) > 0
        for shape, color, texture, size, _ in visible:
            phrase = " ".join([SIZES[size]] + ([TEXTURES[texture]] if texture else []) + [COLORS[color], SHAPES[shape]])
            assert phrase in caption, (caption, phrase)
    two = next(c for c, o in zip(captions, scenes.objects) if int((o[:, 4] > 0).sum()) == 2)
    assert any(rel in two for rel in (" left of ", " above ", " below "))


def test_held_out_combinations_absent_from_train_present_in_test() -> None:
    splits = build_data(
        "scenes", num_train=400, num_test=400, max_objects=4, hold_out=["green triangle", "small striped star"]
    )
    shape_i, green = SHAPES.index("triangle"), COLORS.index("green")
    star, striped, small = SHAPES.index("star"), TEXTURES.index("striped"), SIZES.index("small")

    def counts(ds: ScenesDataset) -> tuple[int, int]:
        o = ds.objects
        a = int(((o[..., 0] == shape_i) & (o[..., 1] == green)).sum())
        b = int(((o[..., 0] == star) & (o[..., 2] == striped) & (o[..., 3] == small)).sum())
        return a, b

    assert counts(splits.train) == (0, 0)  # type: ignore[arg-type]
    a, b = counts(splits.test)  # type: ignore[arg-type]
    assert a > 0 and b > 0
    # Other combinations of the same attributes stay in train.
    o = splits.train.objects  # type: ignore[attr-defined]
    assert int(((o[..., 0] == shape_i) & (o[..., 1] != green)).sum()) > 0
    assert int(((o[..., 1] == green) & (o[..., 0] != shape_i)).sum()) > 0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"image_size": 8}, "image_size"),
        ({"hold_out": ["green hexagon"]}, "hold_out"),
        ({"hold_out": "green triangle"}, "hold_out"),
        ({"hold_out": ["green"]}, "hold_out"),
        ({"hold_out": ["red green"]}, "hold_out"),
        ({"label": "size"}, "label"),
        ({"min_objects": 3, "max_objects": 2}, "max_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"num_train": 0}, "num_train"),
        ({"noise": -1}, "noise"),
        ({"color_by_shape": 1.5}, "color_by_shape"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict, needle: str) -> None:
    with pytest.raises(DataError) as err:
        build_data("scenes", **{"num_train": 8, "num_test": 8, **options})
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_listed_as_a_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "datasets"]) == 0
    assert "scenes" in capsys.readouterr().out.split()


def test_hold_out_fallback_when_redraws_rarely_succeed() -> None:
    # Every shape but the star held out: 80% of draws match, so the attribute stepping after
    # the re-draws is exercised; train then holds only stars.
    hold = [f"{size} {shape}" for shape in SHAPES[:-1] for size in SIZES]
    splits = build_data("scenes", num_train=200, num_test=50, max_objects=4, hold_out=hold)
    shapes = splits.train.objects[..., 0]  # type: ignore[attr-defined]
    assert set(shapes[shapes >= 0].tolist()) == {SHAPES.index("star")}
    everything = [f"{size} {shape}" for shape in SHAPES for size in SIZES]
    with pytest.raises(DataError, match="hold_out"):
        build_data("scenes", num_train=20, num_test=5, hold_out=everything)


def test_color_by_shape_ties_colour_to_shape_at_the_given_rate() -> None:
    """color_by_shape=p: an object has its shape's own colour (shape k -> COLORS[k]) with
    probability p + (1 - p) / 8; everything but the colour is the same scene; p=0 is the default."""
    idx = torch.arange(400)
    plain = render_scenes(idx, seed=2, max_objects=4)
    default = render_scenes(idx, seed=2, max_objects=4, color_by_shape=0.0)
    assert torch.equal(plain["images"], default["images"])
    for p in (1.0, 0.7):
        tied = render_scenes(idx, seed=2, max_objects=4, color_by_shape=p)
        present = plain["objects"][..., 0] >= 0
        same = tied["objects"][..., [0, 2, 3]] == plain["objects"][..., [0, 2, 3]]
        assert bool(same.all()) and torch.equal(tied["positions"], plain["positions"])
        o = tied["objects"][present]
        own = (o[:, 1] == o[:, 0]).float().mean().item()
        expected = p + (1 - p) / len(COLORS)
        assert abs(own - expected) < 0.05, (p, own, expected)
    # Held-out combinations still never occur when the tie would produce them.
    splits = build_data("scenes", num_train=200, num_test=50, color_by_shape=1.0, hold_out=["red circle"])
    o = splits.train.objects  # type: ignore[attr-defined]
    assert int(((o[..., 0] == SHAPES.index("circle")) & (o[..., 1] == COLORS.index("red"))).sum()) == 0
