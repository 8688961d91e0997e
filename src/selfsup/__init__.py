"""selfsup: self-supervised visual representation learning on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]

if TYPE_CHECKING:
    from selfsup.engine.export import load_encoder


def __getattr__(name: str) -> Any:
    # Lazy: `import selfsup` stays light (no torch); the engine loads on first use.
    if name == "load_encoder":
        from selfsup.engine.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
