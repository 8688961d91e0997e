"""Builds a run's components (data, backbone, method, views) from a validated config."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.config import Config, ConfigError, check_options
from selfsup.data import DataError, DataSplits, ImageDataset
from selfsup.data.captions import has_captions, training_captions
from selfsup.engine.loop import resolve_precision
from selfsup.methods.base import ENGINE_FACTS, Method
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEW_RECIPES, RegistryError

# Keyword arguments the engine fills in itself; users cannot set them in a config.
BACKBONE_RESERVED = ("in_channels", "image_size")
METHOD_RESERVED = ("backbone", *ENGINE_FACTS)
VIEWS_RESERVED = ("image_size", "in_channels", "mean", "std")


def _factory(registry: Any, name: Any, section: str) -> Any:
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name must be a string, got {name!r}")
    try:
        return registry.get(name)
    except RegistryError as err:
        raise ConfigError(f"{section}.name: {err}") from None


def validate_components(cfg: Config) -> None:
    """Checks every component section against its factory's signature (raises ConfigError)."""
    check_options(_factory(DATASETS, cfg.data["name"], "data"), cfg.options("data"), "data", require=True)
    check_options(
        _factory(BACKBONES, cfg.backbone["name"], "backbone"), cfg.options("backbone"), "backbone", BACKBONE_RESERVED
    )
    method_cls = _factory(METHODS, cfg.method["name"], "method")
    check_options(method_cls, cfg.options("method"), "method", METHOD_RESERVED)
    views = _factory(VIEW_RECIPES, view_recipe_name(cfg), "views")
    view_options = check_options(views, cfg.options("views"), "views", VIEWS_RESERVED)
    for section in ("method", "views"):
        for key, value in cfg.options(section).items():
            if _is_temperature(key) and isinstance(value, (int, float)) and not value > 0:
                raise ConfigError(f"{section}.{key}={value!r} is out of range (a temperature must be > 0)")
    # The recipe checks its own options (crop scales, probabilities) when built; building it
    # on a stand-in image geometry draws no random numbers and needs no data.
    with _as_config_error("views"):
        views(image_size=32, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, **view_options)


def _is_temperature(key: str) -> bool:
    return key == "temperature" or key.endswith(("_temperature", "_temp"))


@contextlib.contextmanager
def _as_config_error(section: str) -> Iterator[None]:
    """A factory's own argument checks (``ValueError``) become a ``ConfigError`` naming the
    config section; a missing optional package becomes one naming what to install."""
    try:
        yield
    except ConfigError:
        raise
    except ImportError as err:
        # A backbone's own install hint ("pip install selfsup[timm]") or the module's name.
        hint = str(err).strip().splitlines()[0] if str(err).strip() else f"cannot import {err.name}"
        raise ConfigError(f"{section}: an optional package is missing: {hint}") from None
    except (ValueError, TypeError) as err:
        if isinstance(err, DataError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{section}: {first}") from None


def view_recipe_name(cfg: Config) -> str:
    name = cfg.views.get("name")
    if name:
        return name
    return str(METHODS.get(cfg.method["name"]).view_recipe)  # type: ignore[attr-defined]


def build_data(cfg: Config) -> DataSplits:
    factory = _factory(DATASETS, cfg.data["name"], "data")
    return factory(**check_options(factory, cfg.options("data"), "data", require=True))


def build_backbone(cfg: Config, splits: DataSplits) -> nn.Module:
    factory = _factory(BACKBONES, cfg.backbone["name"], "backbone")
    options = check_options(factory, cfg.options("backbone"), "backbone", BACKBONE_RESERVED)
    with _as_config_error("backbone"):
        return factory(in_channels=splits.in_channels, image_size=splits.image_size, **options)


def random_init_encoder(cfg: Config, splits: DataSplits, method: Method) -> nn.Module:
    """The "random-init" baseline of ``method``: its encoder (``method.embedder()``: the
    configured backbone, or the method's own wrapper such as colorization's lightness input or
    jigsaw's tiles) rebuilt untrained, seeded by ``train.seed``, so the baseline row measures
    the same feature extraction without the training."""
    torch.manual_seed(cfg.train.seed)
    _, spec = method.embedder()
    if spec is None:
        return build_backbone(cfg, splits)
    return type(method).build_embedder(spec, lambda: build_backbone(cfg, splits))


def provided_fields(dataset: ImageDataset) -> frozenset[str]:
    """The optional ``Batch`` fields a data set can fill: ``"label"`` when every sample has a
    known label, plus whatever the data set declares in ``batch_fields`` (text, masks)."""
    fields = set(getattr(dataset, "batch_fields", ()))
    if has_captions(dataset):
        fields.add("text")
    labels = dataset.labels
    if labels is not None and len(labels) and bool((labels >= 0).all()):
        fields.add("label")
    return frozenset(fields)


def check_batch_fields(method_cls: type[Method], dataset: ImageDataset, where: str) -> None:
    """ConfigError unless ``dataset`` gives every optional field the method declared."""
    missing = sorted(set(method_cls.batch_fields) - provided_fields(dataset))
    if missing:
        raise ConfigError(
            f"method {method_cls.__name__} needs batch field(s) {', '.join(missing)}, which the "
            f"{where} does not provide" + (" (every sample needs a label)" if "label" in missing else "")
        )


def load_frozen_backbone(spec: Any, option: str) -> nn.Module:
    """The frozen backbone of an earlier run, for a method's ``frozen_models`` option.

    ``spec``: a run folder, ``{"run": <run folder>}``, or a ``backbone.safetensors`` file.
    The architecture is rebuilt from the file's metadata (backbone options, input channels,
    image size) and the weights loaded strictly with safetensors (no code runs on load); the
    module comes back in eval mode with ``requires_grad=False``, its source path in
    ``loaded_from``.
    """
    if isinstance(spec, Mapping):
        if set(spec) != {"run"}:
            raise ConfigError(f"method.{option}: expected {{run: runs/<name>}}, got {dict(spec)!r}")
        spec = spec["run"]
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"method.{option}: expected a run folder or a backbone.safetensors file, got {spec!r}")
    path = Path(spec)
    file = path / "backbone.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"method.{option}: no trained backbone at {str(file)!r}; give the folder of a finished "
            "run (it holds backbone.safetensors)"
        )
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(file), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        module = rebuild_encoder(meta, f"method.{option}")
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"method.{option}: {file} lacks the metadata to rebuild its architecture ({err}); "
            "re-export it with this version of selfsup"
        ) from None
    state = load_file(str(file))
    enable_saved_mask_token(module, state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        what = f"the {meta['method']} encoder" if "embedder" in meta else f"a {meta['backbone']} backbone"
        raise ConfigError(
            f"method.{option}: the weights in {file} do not fit {what}: "
            f"{first[1].strip() if len(first) > 1 else first[0]}"
        ) from None
    # Where it came from, so a method that rejects it (a BEiT tokenizer of the wrong kind or
    # grid) can name the run in its error.
    module.loaded_from = str(path)  # type: ignore[assignment]  # a plain attribute, not a tensor
    return module.requires_grad_(False).eval()


def enable_saved_mask_token(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Create ``module``'s mask token when ``state`` holds one: a ViT trained with a mask token
    (SimMIM, BEiT, iBOT) saved it with its weights, and the rebuilt backbone only creates it
    on request, so strict loading can still check every other key."""
    enable = getattr(module, "enable_mask_token", None)
    if "mask_token" in state and getattr(module, "mask_token", "absent") is None and callable(enable):
        enable()


def rebuild_encoder(meta: Mapping[str, str], where: str) -> nn.Module:
    """The untrained module that an encoder file's weights load into, from its metadata: the
    configured backbone (``backbone``, ``in_channels``, ``image_size``), or, when the file
    records an ``embedder`` (a method whose ``embed`` is not the plain backbone: CMC's two-view
    encoder, colorization's lightness encoder), that ``method``'s ``build_embedder``. Raises
    ``KeyError`` / ``ValueError`` for missing or malformed keys, ``ConfigError`` otherwise.
    """
    backbone_cfg = json.loads(meta["backbone"])
    in_channels, image_size = int(meta["in_channels"]), int(meta["image_size"])
    factory = _factory(BACKBONES, backbone_cfg.get("name"), f"{where} backbone")
    options = {k: v for k, v in backbone_cfg.items() if k != "name"}

    def backbone() -> nn.Module:
        with _as_config_error(f"{where} backbone"):
            module: nn.Module = factory(in_channels=in_channels, image_size=image_size, **options)
            return module

    if "embedder" not in meta:
        return backbone()
    spec = json.loads(meta["embedder"])
    method_cls = _factory(METHODS, meta.get("method"), f"{where} method")
    with _as_config_error(f"{where} {meta.get('method')} encoder"):
        built: nn.Module = method_cls.build_embedder(spec, backbone)
        return built


def build_method(
    cfg: Config, splits: DataSplits, backbone: nn.Module | None = None, train_views: nn.Module | None = None
) -> Method:
    """The method around a fresh backbone. The run facts the method declares in
    ``engine_facts`` are passed to its constructor, and each of its ``frozen_models`` options
    is replaced by the loaded, frozen backbone of the run it names. ``train_views``: the
    already built training recipe, if the caller has one (else it is built when needed)."""
    method_cls = _factory(METHODS, cfg.method["name"], "method")
    options = check_options(method_cls, cfg.options("method"), "method", METHOD_RESERVED)
    unknown = sorted(set(method_cls.engine_facts) - set(ENGINE_FACTS))
    if unknown:
        raise TypeError(f"{method_cls.__name__}.engine_facts names unknown facts {unknown}; known: {ENGINE_FACTS}")
    backbone = backbone if backbone is not None else build_backbone(cfg, splits)
    if getattr(method_cls, "requires_token_backbone", False) and not hasattr(backbone, "forward_tokens"):
        raise ConfigError(
            f"method {cfg.method['name']!r} masks patch tokens and needs a ViT backbone "
            f"(backbone.name=vit_tiny|vit_small|vit_base), not {cfg.backbone['name']!r}"
        )
    facts = {
        "num_samples": lambda: len(splits.pretrain),
        "image_size": lambda: splits.image_size,
        "in_channels": lambda: splits.in_channels,
        "batch_size": lambda: cfg.train.batch_size,
        "num_classes": lambda: splits.num_classes,
        # SwAV / DINO: the teacher's views are the recipe's global crops.
        "num_global_crops": lambda: (train_views or build_views(cfg, splits)).num_global_views,
        "mean": lambda: tuple(splits.mean),
        "std": lambda: tuple(splits.std),
        "captions": lambda: training_captions(splits.pretrain),
    }
    for name in method_cls.frozen_models:
        if name in options:
            options[name] = load_frozen_backbone(options[name], name)
    with _as_config_error("method"):
        method = method_cls(backbone=backbone, **{name: facts[name]() for name in method_cls.engine_facts}, **options)
    if not isinstance(method, Method):
        raise ConfigError(f"method {cfg.method['name']!r} did not build a selfsup Method")
    return method


def build_views(cfg: Config, splits: DataSplits, name: str | None = None, **override: Any) -> nn.Module:
    """The training view recipe (``name=None``) or another recipe such as ``"eval"``."""
    name = name or view_recipe_name(cfg)
    factory = _factory(VIEW_RECIPES, name, "views")
    options = override if name != view_recipe_name(cfg) else {**cfg.options("views"), **override}
    options = check_options(factory, options, "views", VIEWS_RESERVED)
    with _as_config_error("views"):
        return factory(
            image_size=splits.image_size, in_channels=splits.in_channels, mean=splits.mean, std=splits.std, **options
        )


@dataclass
class Components:
    """A run's parts, built from its config for ``device``.

    Attributes:
        precision: ``train.precision`` resolved for the device (``"fp32"`` or ``"bf16"``;
            ``"auto"`` decided once here, :func:`selfsup.engine.loop.resolve_precision`): what
            pretraining, fine-tuning, distillation and evaluation all run at.
    """

    splits: DataSplits
    method: Method
    train_views: nn.Module
    eval_views: nn.Module
    precision: str = "fp32"


def build_components(cfg: Config, device: torch.device) -> Components:
    validate_components(cfg)
    splits = build_data(cfg)
    check_batch_fields(
        _factory(METHODS, cfg.method["name"], "method"), splits.pretrain, f"pretraining split of {splits.name!r}"
    )
    train_views = build_views(cfg, splits)  # draws no random numbers: initialisation below is unchanged
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the seeded run
    method = build_method(cfg, splits, train_views=train_views).to(device)
    eval_views = build_views(cfg, splits, "eval").to(device)
    # Once per command, after the seeded initialisation (the CPU probe forks the RNG anyway):
    # every consumer takes this value, so an "auto" run never times bf16 twice or disagrees.
    precision = resolve_precision(cfg.train.precision, device)
    return Components(splits, method, train_views.to(device), eval_views, precision)
