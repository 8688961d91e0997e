"""Batched, per-sample random augmentation on the training device, and view recipes.

Importing this package registers the view recipes in ``selfsup.registry.VIEW_RECIPES``:
``two_views`` (SimCLR, MoCo v2, SimSiam, Barlow Twins), ``asymmetric`` (BYOL),
``multi_crop`` (SwAV, DINO), ``single_view`` (linear probe, fine-tuning, pretext tasks) and
``eval`` (deterministic feature extraction).
"""

from __future__ import annotations

from typing import Any

from selfsup.config import check_options
from selfsup.registry import VIEW_RECIPES
from selfsup.transforms.mixing import cutmix, mixup
from selfsup.transforms.ops import Normalize, blur_kernel_size, to_float
from selfsup.transforms.views import ViewGroup, ViewRecipe, augmentation_pipeline

__all__ = [
    "Normalize",
    "ViewGroup",
    "ViewRecipe",
    "augmentation_pipeline",
    "blur_kernel_size",
    "build_view_recipe",
    "cutmix",
    "mixup",
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
