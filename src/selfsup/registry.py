"""Name -> factory registries for backbones, methods, datasets and view recipes.

Everything registered is listed by ``selfsup list`` and exercised by the registry-driven
contract tests, so registering a component is how it joins the test suite.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name was asked of a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping of names to factories (classes or functions) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@BACKBONES.register("resnet18")``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        _load_builtin_components()
        try:
            return self._factories[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._factories))})"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        _load_builtin_components()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        _load_builtin_components()
        return name in self._factories


BACKBONES: Registry[Any] = Registry("backbone")
METHODS: Registry[Any] = Registry("method")
DATASETS: Registry[Any] = Registry("dataset")
VIEW_RECIPES: Registry[Any] = Registry("view recipe")

_loaded = False


def _load_builtin_components() -> None:
    """Import the packages whose modules register themselves (once, lazily)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import selfsup.data  # noqa: F401
    import selfsup.methods  # noqa: F401
    import selfsup.nn.backbones  # noqa: F401
    import selfsup.transforms  # noqa: F401
