"""Self-supervised methods; each module registers itself in ``selfsup.registry.METHODS``."""

from selfsup.methods import (  # noqa: F401
    barlow_twins,
    byol,
    dino,
    mae,
    moco_v2,
    moco_v3,
    simclr,
    simmim,
    simsiam,
    swav,
)
from selfsup.methods.base import Batch, Method, StepInfo

__all__ = ["Batch", "Method", "StepInfo"]
