"""Self-supervised methods: one module per method, each registering itself in
``selfsup.registry.METHODS``.

Every module of this package is imported here, found by listing the package rather than by
a hand-kept list, so a new method file joins the registry (and with it ``selfsup list``
and the registry-driven contract tests) by existing.
"""

import importlib
import pkgutil

from selfsup.methods.base import Batch, EpochContext, Method, StepInfo

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Batch", "EpochContext", "Method", "StepInfo"]
