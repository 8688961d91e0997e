"""Builds a run's components (data, backbone, method, views) from a validated config."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.config import Config, ConfigError, check_options
from selfsup.data import DataSplits
from selfsup.methods.base import Method
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEW_RECIPES, RegistryError

# Keyword arguments the engine fills in itself; users cannot set them in a config.
BACKBONE_RESERVED = ("in_channels", "image_size")
METHOD_RESERVED = ("backbone", "num_samples", "image_size", "in_channels", "batch_size", "num_classes",
                   "num_global_crops")
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
    check_options(_factory(DATASETS, cfg.data["name"], "data"), cfg.options("data"), "data")
    check_options(_factory(BACKBONES, cfg.backbone["name"], "backbone"), cfg.options("backbone"),
                  "backbone", BACKBONE_RESERVED)
    method_cls = _factory(METHODS, cfg.method["name"], "method")
    check_options(method_cls, cfg.options("method"), "method", METHOD_RESERVED)
    check_options(_factory(VIEW_RECIPES, view_recipe_name(cfg), "views"), cfg.options("views"),
                  "views", VIEWS_RESERVED)
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                          f"train.accum_steps ({cfg.train.accum_steps})")


def view_recipe_name(cfg: Config) -> str:
    name = cfg.views.get("name")
    if name:
        return name
    return METHODS.get(cfg.method["name"]).view_recipe


def build_data(cfg: Config) -> DataSplits:
    factory = _factory(DATASETS, cfg.data["name"], "data")
    return factory(**check_options(factory, cfg.options("data"), "data"))


def build_backbone(cfg: Config, splits: DataSplits) -> nn.Module:
    factory = _factory(BACKBONES, cfg.backbone["name"], "backbone")
    options = check_options(factory, cfg.options("backbone"), "backbone", BACKBONE_RESERVED)
    return factory(in_channels=splits.in_channels, image_size=splits.image_size, **options)


def build_method(cfg: Config, splits: DataSplits, backbone: nn.Module | None = None,
                 train_views: nn.Module | None = None) -> Method:
    """The method around a fresh backbone; engine-known facts (dataset size, image size,
    batch size, the training view recipe's number of global crops) are passed to the
    constructor when it declares a parameter of that name. ``train_views``: the already built
    training recipe, if the caller has one (else it is built when needed)."""
    method_cls = _factory(METHODS, cfg.method["name"], "method")
    options = check_options(method_cls, cfg.options("method"), "method", METHOD_RESERVED)
    known = {
        "backbone": backbone if backbone is not None else build_backbone(cfg, splits),
        "num_samples": len(splits.pretrain),
        "image_size": splits.image_size,
        "in_channels": splits.in_channels,
        "batch_size": cfg.train.batch_size,
        "num_classes": splits.num_classes,
    }
    if getattr(method_cls, "requires_token_backbone", False) and not hasattr(known["backbone"], "forward_tokens"):
        raise ConfigError(f"method {cfg.method['name']!r} masks patch tokens and needs a ViT backbone "
                          f"(backbone.name=vit_tiny|vit_small|vit_base), not {cfg.backbone['name']!r}")
    accepted = inspect.signature(method_cls).parameters
    if "num_global_crops" in accepted:  # SwAV / DINO: the teacher's views are the recipe's global crops
        known["num_global_crops"] = (train_views or build_views(cfg, splits)).num_global_views
    method = method_cls(**{k: v for k, v in known.items() if k in accepted}, **options)
    if not isinstance(method, Method):
        raise ConfigError(f"method {cfg.method['name']!r} did not build a selfsup Method")
    return method


def build_views(cfg: Config, splits: DataSplits, name: str | None = None, **override: Any) -> nn.Module:
    """The training view recipe (``name=None``) or another recipe such as ``"eval"``."""
    name = name or view_recipe_name(cfg)
    factory = _factory(VIEW_RECIPES, name, "views")
    options = override if name != view_recipe_name(cfg) else {**cfg.options("views"), **override}
    options = check_options(factory, options, "views", VIEWS_RESERVED)
    return factory(image_size=splits.image_size, in_channels=splits.in_channels,
                   mean=splits.mean, std=splits.std, **options)


@dataclass
class Components:
    splits: DataSplits
    method: Method
    train_views: nn.Module
    eval_views: nn.Module


def build_components(cfg: Config, device: torch.device) -> Components:
    validate_components(cfg)
    splits = build_data(cfg)
    train_views = build_views(cfg, splits)  # draws no random numbers: initialisation below is unchanged
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the seeded run
    method = build_method(cfg, splits, train_views=train_views).to(device)
    return Components(splits, method, train_views.to(device), build_views(cfg, splits, "eval").to(device))
