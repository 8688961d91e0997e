"""``scenes``: a synthetic, procedurally generated data set of coloured multi-object scenes.

Nothing is read from disk: every image is drawn from ``(seed, split, index)`` by
counter-based hashing (a 32-bit integer mix of the counters, in vectorised torch int64 ops),
so sample ``i`` is the same image on every process, after a resume and whichever batch or
chunk it is generated in. There is no ``torch.Generator`` per sample and no Python loop over
samples: a chunk of images is rendered at once, looping only over the few objects of a scene
and the shape types.

A scene: a textured background (a dark base colour, a gradient, a sinusoidal grating and
per-pixel noise) with ``min_objects..max_objects`` objects painted in order (later objects
occlude earlier ones). Each object has a shape (:data:`SHAPES`), a named colour
(:data:`COLORS`), a texture (:data:`TEXTURES`: solid, or stripes/checks of the colour and a
light tint of it), a size (small / large, with jitter) and a random position. Alongside the
images the data set keeps

* ``masks``: uint8 ``(N, H, W)`` semantic masks, 0 = background, ``k + 1`` = shape class ``k``
  (:meth:`ScenesDataset.get_masks` gives them as int64 for indices);
* ``instance_masks``: uint8 ``(N, H, W)``, 0 = background, ``j + 1`` = object ``j`` (painting
  order) where it is visible;
* ``objects``: int64 ``(N, K, 5)`` per-object ``[shape, colour, texture, size, visible
  pixels]`` (``shape = -1`` for the unused slots of a scene with fewer than ``K`` objects) and
  ``positions`` float32 ``(N, K, 3)`` ``[x, y, radius]`` in pixels;
* ``captions``: one English sentence per scene, e.g. ``"a small red triangle left of a large
  striped blue circle"`` (visible objects from left to right; built on first access).

The label (option ``label``) is the shape of the largest visible object (``"shape"``, the
default), its colour (``"color"``) or both (``"shape_color"``, class ``shape * 8 + colour``).
``hold_out`` lists attribute combinations such as ``["green triangle", "small striped
star"]``: no object of the train/pretrain split has all the attributes of a held-out
combination, while the test split is drawn without the restriction (for compositional tests).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from selfsup.data.base import DataError, DataSplits, TensorImageDataset, check_positive
from selfsup.data.datasets import _finish
from selfsup.registry import DATASETS

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "pink")
TEXTURES = ("solid", "striped", "checkered")
SIZES = ("small", "large")
_FIELDS = (SHAPES, COLORS, TEXTURES, SIZES)
LABELS = ("shape", "color", "shape_color")

#: RGB of each named colour: every one has a channel >= 180, above any background pixel.
_RGB = torch.tensor(
    [
        [220, 40, 40],
        [40, 190, 60],
        [50, 80, 235],
        [235, 215, 50],
        [160, 60, 210],
        [50, 210, 220],
        [245, 140, 30],
        [245, 130, 190],
    ],
    dtype=torch.float32,
)
#: Radius of a small / large object as a fraction of the image side (jittered by +-10%).
_RADIUS = (0.13, 0.24)
#: Brightest background value before noise: base <= 80, gradient and grating <= 16 each.
_MAX_OBJECTS = 8
_MIN_SIZE = 16

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# Draw counters: background fields, then 16 per object, then per-attempt re-draws.
_BG, _OBJ, _RETRY, _NOISE = 0, 64, 4096, 1 << 20


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values in ``[0, 2^32)``.

    The multiplier is below 2^27, so every product stays below 2^59: no int64 overflow.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def scene_keys(seed: int, split: int, indices: Tensor) -> Tensor:
    """The hash key ``(B,)`` int64 of each scene: a function of ``(seed, split, index)`` only."""
    k = _mix32(torch.tensor((seed * _GOLDEN + split) & _M32, dtype=torch.int64))
    k = _mix32((k ^ _mix32(torch.tensor(seed >> 32 & _M32, dtype=torch.int64))) & _M32)
    return _mix32((indices.to(torch.int64) & _M32) ^ k)


def _bits(keys: Tensor, draw: int | Tensor) -> Tensor:
    """32 random bits ``(B,)`` (or broadcast shape) for draw number ``draw`` of each key."""
    return _mix32((keys + _mix32(torch.as_tensor(draw, dtype=torch.int64) * _GOLDEN & _M32)) & _M32)


def _uniform(keys: Tensor, draw: int | Tensor) -> Tensor:
    """Uniform floats in ``[0, 1)`` (the broadcast shape of ``keys`` and ``draw``, e.g.
    ``(B,)`` or ``(B, D)``) for draw number(s) ``draw`` (24 random bits)."""
    return (_bits(keys, draw) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _choice(keys: Tensor, draw: int, n: int) -> Tensor:
    """Uniform integers in ``[0, n)`` ``(B,)``."""
    return (_uniform(keys, draw) * n).to(torch.int64).clamp_(max=n - 1)


def parse_hold_out(hold_out: Sequence[str] | None) -> Tensor:
    """Held-out combinations as an int64 ``(M, 4)`` table of ``[shape, colour, texture, size]``
    with ``-1`` for "any" (e.g. ``"green triangle"`` -> ``[2, 1, -1, -1]``)."""
    if hold_out is None:
        return torch.empty((0, 4), dtype=torch.int64)
    if isinstance(hold_out, str) or not isinstance(hold_out, Sequence):
        raise DataError(
            f"hold_out must be a list of attribute combinations such as ['green triangle'], got {hold_out!r}"
        )
    vocab = {name: (field, i) for field, names in enumerate(_FIELDS) for i, name in enumerate(names)}
    rows = []
    for combo in hold_out:
        words = str(combo).lower().split()
        row = [-1, -1, -1, -1]
        for word in words:
            if word not in vocab:
                raise DataError(
                    f"hold_out: unknown attribute {word!r} in {combo!r} (known: shapes {', '.join(SHAPES)}; "
                    f"colours {', '.join(COLORS)}; textures {', '.join(TEXTURES)}; sizes {', '.join(SIZES)})"
                )
            field, value = vocab[word]
            if row[field] != -1:
                raise DataError(f"hold_out: {combo!r} names two values of the same attribute")
            row[field] = value
        if len(words) < 2:
            raise DataError(f"hold_out: {combo!r} must combine at least two attributes, e.g. 'green triangle'")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def _held_out(attrs: Tensor, table: Tensor) -> Tensor:
    """Whether each object's ``[shape, colour, texture, size]`` ``(..., 4)`` matches a row of ``table``."""
    if table.numel() == 0:
        return torch.zeros(attrs.shape[:-1], dtype=torch.bool)
    match = (table == -1) | (attrs.unsqueeze(-2) == table)  # (..., M, 4)
    return match.all(-1).any(-1)


def _tie_colour_to_shape(attrs: Tensor, u: Tensor, color_by_shape: float) -> Tensor:
    """``attrs`` ``(B, 4)`` with the colour replaced by the shape's own colour (shape ``k`` ->
    ``COLORS[k]``: circle red, square green, triangle blue, cross yellow, star purple) where
    the uniform ``u`` ``(B,)`` is below ``color_by_shape``."""
    if color_by_shape <= 0:
        return attrs
    colour = torch.where(u < color_by_shape, attrs[:, 0], attrs[:, 1])
    return torch.stack([attrs[:, 0], colour, attrs[:, 2], attrs[:, 3]], 1)


def _draw_attributes(keys: Tensor, j: int, attempt: int, color_by_shape: float = 0.0) -> Tensor:
    """``(B, 4)`` int64 ``[shape, colour, texture, size]`` of object ``j`` (draw ``attempt``)."""
    base = _OBJ + 16 * j + _RETRY * attempt
    attrs = torch.stack([_choice(keys, base + f, len(v)) for f, v in enumerate(_FIELDS)], 1)
    return _tie_colour_to_shape(attrs, _uniform(keys, base + 8), color_by_shape)


def _shape_masks(shape: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Inside-mask ``(B, S, S)`` of each object's shape (``shape`` ``(B,)`` indexes
    :data:`SHAPES`) for pixel coordinates relative to its centre in units of its radius."""
    ax, ay = px.abs(), py.abs()
    rho2 = px * px + py * py
    # Five-pointed star: the radius oscillates with cos(5 theta), evaluated as the Chebyshev
    # polynomial T5 of cos(theta) = -y / rho (pointing up), which avoids atan2.
    rho = rho2.sqrt().clamp_min_(1e-6)
    c = -py / rho
    c2 = c * c
    cos5 = c * (16 * c2 * c2 - 20 * c2 + 5)
    masks = (
        rho2 <= 1.0,
        torch.maximum(ax, ay) <= 0.85,
        (py <= 0.55) & (py >= 1.7320508 * ax - 1.1),
        (torch.minimum(ax, ay) <= 0.33) & (torch.maximum(ax, ay) <= 1.0),
        rho <= 0.7 + 0.35 * cos5,
    )
    inside = torch.zeros_like(masks[0])
    for k, mask in enumerate(masks):
        inside |= mask & (shape == k).view(-1, 1, 1)
    return inside


@functools.lru_cache(maxsize=4)
def _noise_field(size: int) -> Tensor:
    """A fixed field of uniform noise in ``[-1, 1]``, ``(3, 256 + size, 256 + size)``: each
    scene takes a window of it at a hashed offset (cheaper than hashing every pixel)."""
    side = 256 + size
    bits = _mix32(torch.arange(3 * side * side, dtype=torch.int64) + _NOISE) & 0xFFFF
    return (bits.to(torch.float32) * (2.0 / 0xFFFF) - 1.0).view(3, side, side)


def render_scenes(
    indices: Tensor,
    *,
    seed: int = 0,
    split: int = 0,
    image_size: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    noise: float = 10.0,
    hold_out: Tensor | None = None,
    color_by_shape: float = 0.0,
) -> dict[str, Tensor]:
    """Render the scenes of ``indices`` (any order, any batching gives the same scenes).

    Args:
        indices: ``(B,)`` int64 scene indices.
        seed, split: the stream; scene ``i`` depends only on ``(seed, split, i)`` and the
            options below.
        image_size: side ``S`` of the square images.
        min_objects, max_objects: range of objects per scene (inclusive).
        noise: amplitude of the uniform per-pixel noise, in 0..255 units.
        hold_out: ``(M, 4)`` table from :func:`parse_hold_out`; matching objects are redrawn
            (a few attempts, then one attribute at a time is stepped until none matches).
        color_by_shape: probability that an object takes its shape's own colour instead of
            a uniformly drawn one (0: colour independent of shape). On natural images colour
            follows content; this gives colour prediction (colorization) something to learn.

    Returns:
        ``images`` uint8 ``(B, 3, S, S)``, ``masks`` and ``instance_masks`` uint8 ``(B, S, S)``,
        ``objects`` int64 ``(B, K, 5)`` and ``positions`` float32 ``(B, K, 3)`` (see the module
        docstring).
    """
    n, s, k = indices.shape[0], image_size, max_objects
    keys = scene_keys(seed, split, indices)
    # All first-attempt draws of a scene in one hashing pass: (B, D) uniforms.
    draws = _uniform(keys.view(n, 1), torch.arange(_OBJ + 16 * k))

    def u(draw: int) -> Tensor:
        return draws[:, draw]

    def pick(draw: int, m: int) -> Tensor:
        return (draws[:, draw] * m).to(torch.int64).clamp_(max=m - 1)

    table = torch.empty((0, 4), dtype=torch.int64) if hold_out is None else hold_out
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    ys, xs = coords.view(1, s, 1), coords.view(1, 1, s)

    # Background: base colour, linear gradient, a sinusoidal grating (texture).
    base = torch.stack([u(_BG + c) for c in range(3)], 1) * 60 + 20  # (B, 3)
    angle = u(_BG + 3) * 6.2831853
    gx, gy = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1)
    ramp = ((xs - s / 2) * gx + (ys - s / 2) * gy) / s  # (B, S, S) in [-0.71, 0.71]
    freq = (1 + 3 * u(_BG + 4)).view(n, 1, 1) * (6.2831853 / s)
    theta = u(_BG + 5) * 3.1415927
    tx, ty = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    phase = (u(_BG + 6) * 6.2831853).view(n, 1, 1)
    grating = torch.sin((xs * tx + ys * ty) * freq + phase)
    amp = (4 + 8 * u(_BG + 7)).view(n, 1, 1)
    canvas = base.view(n, 3, 1, 1) + (11 * ramp + amp * grating).unsqueeze(1)  # (B, 3, S, S)

    count = min_objects + pick(_BG + 8, max_objects - min_objects + 1)
    instance = torch.zeros((n, s, s), dtype=torch.uint8)
    objects = torch.full((n, k, 5), -1, dtype=torch.int64)
    positions = torch.zeros((n, k, 3), dtype=torch.float32)
    tint = 0.55
    for j in range(k):
        attrs = torch.stack([pick(_OBJ + 16 * j + f, len(v)) for f, v in enumerate(_FIELDS)], 1)
        attrs = _tie_colour_to_shape(attrs, u(_OBJ + 16 * j + 8), color_by_shape)
        for attempt in range(1, 9):
            bad = _held_out(attrs, table)
            if not bool(bad.any()):
                break
            attrs = torch.where(bad.unsqueeze(1), _draw_attributes(keys, j, attempt, color_by_shape), attrs)
        # Still held out after the re-draws (rare): step one attribute at a time.
        for field, values in enumerate(_FIELDS):
            for _ in range(len(values)):
                bad = _held_out(attrs, table)
                if not bool(bad.any()):
                    break
                attrs[:, field] = torch.where(bad, (attrs[:, field] + 1) % len(values), attrs[:, field])
        if bool(_held_out(attrs, table).any()):
            raise DataError("hold_out excludes every attribute combination of some objects; hold out fewer")
        shape, color, texture, size = attrs.unbind(1)
        base_j = _OBJ + 16 * j
        radius = torch.tensor(_RADIUS)[size] * s * (0.9 + 0.2 * u(base_j + 4))
        # Centres keep at least half the radius inside the image: the centre pixel is in every shape.
        lo = 0.5 * radius
        cx = lo + (s - 2 * lo) * u(base_j + 5)
        cy = lo + (s - 2 * lo) * u(base_j + 6)
        active = j < count
        r = radius.view(n, 1, 1)
        dx, dy = xs - cx.view(n, 1, 1), ys - cy.view(n, 1, 1)
        inside = _shape_masks(shape, dx / r, dy / r)
        inside &= active.view(n, 1, 1)
        # Texture: stripes or checks of the colour and its light tint; period ~ radius / 2.
        period = (radius / 2).clamp_min(1.5).view(n, 1, 1)
        stripe_angle = pick(base_j + 7, 4).to(torch.float32) * 0.7853982
        sx, sy = stripe_angle.cos().view(n, 1, 1), stripe_angle.sin().view(n, 1, 1)
        # Parity of the band / cell index (int32 & 1 is the parity for negatives too).
        stripes = ((dx * sx + dy * sy) / period).floor_().to(torch.int32)
        checks = (dx / period).floor_().to(torch.int32) + (dy / period).floor_().to(torch.int32)
        striped, checkered = (texture == 1).view(n, 1, 1), (texture == 2).view(n, 1, 1)
        pattern = ((stripes & 1).bool() & striped) | ((checks & 1).bool() & checkered)
        rgb = _RGB[color].view(n, 3, 1, 1)
        light = rgb + (255 - rgb) * tint
        paint = torch.where(pattern.unsqueeze(1), light, rgb)
        canvas = torch.where(inside.unsqueeze(1), paint, canvas)
        instance = torch.where(inside, torch.tensor(j + 1, dtype=torch.uint8), instance)
        objects[:, j, :4] = torch.where(active.unsqueeze(1), attrs, -1)
        positions[:, j] = torch.stack([cx, cy, radius], 1) * active.unsqueeze(1)

    # Per-pixel noise, uniform in [-noise, noise]: a window of a fixed noise field at a
    # hashed offset per scene.
    if noise > 0:
        noise_field = _noise_field(s)
        field_side = noise_field.shape[-1]
        ar = torch.arange(s)
        oy, ox = pick(_BG + 9, 256), pick(_BG + 10, 256)
        flat = (oy.view(n, 1, 1) + ar.view(1, s, 1)) * field_side + ox.view(n, 1, 1) + ar.view(1, 1, s)
        canvas += noise_field.view(3, -1)[:, flat].transpose(0, 1) * noise
    images = canvas.round_().clamp_(0, 255).to(torch.uint8)

    visible = torch.stack([(instance == j + 1).sum((1, 2)) for j in range(k)], 1)
    objects[..., 4] = torch.where(objects[..., 0] >= 0, visible, -1)
    shapes = objects[..., 0]
    padded = torch.where(shapes >= 0, shapes + 1, 0)
    masks = torch.cat([torch.zeros((n, 1), dtype=torch.int64), padded], 1).gather(
        1, instance.to(torch.int64).view(n, -1)
    )
    return {
        "images": images,
        "masks": masks.view(n, s, s).to(torch.uint8),
        "instance_masks": instance,
        "objects": objects,
        "positions": positions,
    }


def largest_object(objects: Tensor, positions: Tensor) -> Tensor:
    """Index ``(N,)`` of each scene's largest visible object (by radius)."""
    radius = torch.where(objects[..., 4] > 0, positions[..., 2], -1.0)
    return radius.argmax(1)


def scene_labels(objects: Tensor, positions: Tensor, label: str) -> Tensor:
    """``(N,)`` int64 labels of the scenes under the ``label`` option (see the module docstring)."""
    big = largest_object(objects, positions)
    attrs = objects.gather(1, big.view(-1, 1, 1).expand(-1, 1, objects.shape[-1]))[:, 0]
    if label == "shape":
        return attrs[:, 0]
    if label == "color":
        return attrs[:, 1]
    return attrs[:, 0] * len(COLORS) + attrs[:, 1]


def class_names_for(label: str) -> list[str]:
    """Class names in label order for the ``label`` option."""
    if label == "shape":
        return list(SHAPES)
    if label == "color":
        return list(COLORS)
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def describe(objects: Tensor, positions: Tensor) -> str:
    """The caption of one scene (``objects`` ``(K, 5)``, ``positions`` ``(K, 3)``)."""
    rows = [(float(p[0]), float(p[1]), o) for o, p in zip(objects.tolist(), positions) if o[0] >= 0 and o[4] > 0]
    rows.sort(key=lambda r: r[0])
    phrases = []
    for _, _, (shape, color, texture, size, _) in rows:
        words = [SIZES[size]] + ([TEXTURES[texture]] if texture else []) + [COLORS[color], SHAPES[shape]]
        phrases.append("a " + " ".join(words))
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        (x0, y0, _), (x1, y1, _) = rows
        if abs(y1 - y0) > abs(x1 - x0):
            return f"{phrases[0]} {'above' if y0 < y1 else 'below'} {phrases[1]}"
        return f"{phrases[0]} left of {phrases[1]}"
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}, from left to right"


class ScenesDataset(TensorImageDataset):
    """A :class:`TensorImageDataset` of generated scenes that also keeps their masks,
    per-object attributes and captions (see the module docstring for the fields).

    ``masks`` and ``instance_masks`` are stored as uint8 (a quarter of the images' memory);
    :meth:`get_masks` returns int64 semantic masks for a batch of indices.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        class_names: list[str],
        masks: Tensor,
        instance_masks: Tensor,
        objects: Tensor,
        positions: Tensor,
    ) -> None:
        super().__init__(images, labels, num_classes, class_names)
        self.masks = masks
        self.instance_masks = instance_masks
        self.objects = objects
        self.positions = positions
        #: Number of classes of the semantic masks: background + one per shape.
        self.num_mask_classes = len(SHAPES) + 1
        self.mask_class_names = ["background", *SHAPES]

    def get_masks(self, indices: Tensor) -> Tensor:
        """int64 semantic masks ``(B, H, W)`` of the samples ``indices``."""
        return self.masks[indices.to(torch.int64)].to(torch.int64)

    @cached_property
    def captions(self) -> list[str]:
        """One caption per scene (built on first access: string work, not rendering)."""
        return [describe(o, p) for o, p in zip(self.objects, self.positions)]

    def subset(self, indices: Sequence[int] | Tensor) -> ScenesDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        assert self.labels is not None and self.num_classes is not None and self.class_names is not None
        return ScenesDataset(
            self.images[idx],
            self.labels[idx],
            self.num_classes,
            self.class_names,
            self.masks[idx],
            self.instance_masks[idx],
            self.objects[idx],
            self.positions[idx],
        )


def generate_scenes(
    n: int,
    *,
    seed: int = 0,
    split: int = 0,
    label: str = "shape",
    image_size: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    noise: float = 10.0,
    hold_out: Tensor | None = None,
    color_by_shape: float = 0.0,
    chunk: int = 256,
) -> ScenesDataset:
    """Scenes ``0..n-1`` of a stream, rendered in chunks of ``chunk`` (bounded scratch memory;
    256 keeps a chunk's float planes in cache, 1.5x faster than 1024);
    the options are those of :func:`render_scenes`."""
    parts = [
        render_scenes(
            torch.arange(start, min(start + chunk, n)) if n else torch.arange(0),
            seed=seed,
            split=split,
            image_size=image_size,
            min_objects=min_objects,
            max_objects=max_objects,
            noise=noise,
            hold_out=hold_out,
            color_by_shape=color_by_shape,
        )
        for start in range(0, max(n, 1), chunk)
    ]
    data = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    names = class_names_for(label)
    labels = scene_labels(data["objects"], data["positions"], label)
    return ScenesDataset(
        data["images"],
        labels,
        len(names),
        names,
        data["masks"],
        data["instance_masks"],
        data["objects"],
        data["positions"],
    )


@DATASETS.register("scenes")
def build_scenes(
    num_train: int = 50_000,
    num_test: int = 10_000,
    image_size: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    label: str = "shape",
    hold_out: Sequence[str] | None = None,
    noise: float = 10.0,
    color_by_shape: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Synthetic scenes (generated, no files): coloured shapes on textured backgrounds, with
    semantic/instance masks and captions; see :mod:`selfsup.data.scenes`.

    ``pretrain`` and ``train`` are the same ``num_train`` scenes (stream 0), ``test`` the
    ``num_test`` scenes of stream 1. Held-out combinations never occur in train/pretrain.

    Args:
        num_train: scenes of the train/pretrain split.
        num_test: scenes of the test split.
        image_size: side of the images (>= 16).
        min_objects, max_objects: objects per scene (1 <= min <= max <= 8).
        label: ``"shape"`` (largest object's shape), ``"color"`` or ``"shape_color"``.
        hold_out: attribute combinations absent from train, e.g. ``["green triangle"]``.
        noise: per-pixel noise amplitude (0..255 units).
        color_by_shape: probability that an object has its shape's own colour (circle red,
            square green, triangle blue, cross yellow, star purple) rather than a uniformly
            drawn one; 0 (default) = colour independent of shape. Same in every split.
        seed: seed of the generator; scene ``i`` depends only on ``(seed, split, i)``.
        limit: cap on the scenes of each split: the first ``limit`` (generation is per
            index, so this is the same as a smaller ``num_train``/``num_test``).
    """
    check_positive("num_train", num_train)
    check_positive("num_test", num_test)
    check_positive("limit", limit)
    check_positive("image_size", image_size)
    check_positive("min_objects", min_objects)
    check_positive("max_objects", max_objects)
    if image_size < _MIN_SIZE:
        raise DataError(f"image_size={image_size} is too small for scenes: use image_size >= {_MIN_SIZE}")
    if not min_objects <= max_objects <= _MAX_OBJECTS:
        raise DataError(
            f"min_objects={min_objects}, max_objects={max_objects}: "
            f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}"
        )
    if label not in LABELS:
        raise DataError(f"label={label!r} is not one of {', '.join(LABELS)}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 64:
        raise DataError(f"noise={noise!r} must be a number in [0, 64]")
    if isinstance(color_by_shape, bool) or not isinstance(color_by_shape, (int, float)) or not 0 <= color_by_shape <= 1:
        raise DataError(f"color_by_shape={color_by_shape!r} must be a probability in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer")
    table = parse_hold_out(hold_out)
    cap = limit if limit is not None else max(num_train, num_test)
    train, test = (
        generate_scenes(
            min(num, cap),
            seed=seed,
            split=split,
            label=label,
            image_size=image_size,
            min_objects=min_objects,
            max_objects=max_objects,
            noise=float(noise),
            hold_out=table if split == 0 else None,
            color_by_shape=float(color_by_shape),
        )
        for split, num in ((0, num_train), (1, num_test))
    )
    return _finish("scenes", train, train, test, len(class_names_for(label)), None, seed)
