"""Self-supervised methods; each module registers itself in ``selfsup.registry.METHODS``."""

from selfsup.methods import barlow_twins, byol, dino, moco_v2, simclr, simsiam, swav  # noqa: F401
from selfsup.methods.base import Batch, Method, StepInfo

__all__ = ["Batch", "Method", "StepInfo"]
