"""Batched, per-sample random augmentation on the training device, and view recipes.

Importing this package registers the view recipes in ``selfsup.registry.VIEW_RECIPES``:
``two_views`` (SimCLR, MoCo v2, SimSiam, Barlow Twins), ``asymmetric`` (BYOL),
``multi_crop`` (SwAV, DINO), ``infomin`` (InfoMin Aug with RandAugment), ``single_view``
(linear probe, fine-tuning, pretext tasks) and ``eval`` (deterministic feature extraction).
"""

from __future__ import annotations

from typing import Any

from selfsup.config import check_options
from selfsup.registry import VIEW_RECIPES
from selfsup.transforms.color import (
    ab_gamut_bins,
    ab_to_bin,
    annealed_mean,
    lab_to_rgb,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode_ab,
)
from selfsup.transforms.mixing import cutmix, mixup
from selfsup.transforms.ops import Normalize, blur_kernel_size, to_float
from selfsup.transforms.pretext import (
    drop_color_channels,
    grid_patches,
    hamming_permutations,
    jigsaw_batch,
    relative_location_batch,
    rotate_batch,
)
from selfsup.transforms.views import ViewGroup, ViewRecipe, augmentation_pipeline

__all__ = [
    "Normalize",
    "ViewGroup",
    "ViewRecipe",
    "ab_gamut_bins",
    "ab_to_bin",
    "annealed_mean",
    "augmentation_pipeline",
    "blur_kernel_size",
    "build_view_recipe",
    "cutmix",
    "drop_color_channels",
    "grid_patches",
    "hamming_permutations",
    "jigsaw_batch",
    "lab_to_rgb",
    "mixup",
    "rebalancing_weights",
    "relative_location_batch",
    "rgb_to_lab",
    "rotate_batch",
    "soft_encode_ab",
    "to_float",
]


def build_view_recipe(name: str, **kwargs: Any) -> ViewRecipe:
    """Builds the view recipe registered as ``name`` with keyword options ``kwargs``.

    Raises:
        selfsup.registry.RegistryError: for an unknown recipe name (with a suggestion).
        TypeError: for an option the recipe does not take, naming the closest valid option.
    """
    factory = VIEW_RECIPES.get(name)
    recipe = factory(**check_options(factory, kwargs, "views", error=TypeError, require=True))
    if not isinstance(recipe, ViewRecipe):
        raise TypeError(f"view recipe {name!r} built {type(recipe).__name__}, not a ViewRecipe")
    return recipe
