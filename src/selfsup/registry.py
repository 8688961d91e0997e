"""Name -> factory registries for backbones, methods, datasets and view recipes.

Everything registered is listed by ``selfsup list`` and exercised by the registry-driven
contract tests, so registering a component is how it joins the test suite.

This module is the bottom layer: it imports no other part of selfsup. Each registry names
the package whose modules register into it (``selfsup.methods`` for methods, ...) and
imports that package by name the first time it is asked for a component, so asking for a
method never needs a hand-kept import list, and importing one method does not load the
others' packages.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name was asked of a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping of names to factories (classes or functions) of one kind."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        """``package``: imported (once) before the first lookup; its modules register here."""
        self.kind = kind
        self.package = package
        self._factories: dict[str, Callable[..., T]] = {}
        self._loaded = package is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)  # type: ignore[arg-type]

    def unregister(self, name: str) -> None:
        """Removes ``name`` (tests that register a throw-away component clean up with it)."""
        self._factories.pop(name, None)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@BACKBONES.register("resnet18")``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        self._load()
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
        self._load()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._factories


BACKBONES: Registry[Any] = Registry("backbone", "selfsup.nn.backbones")
METHODS: Registry[Any] = Registry("method", "selfsup.methods")
DATASETS: Registry[Any] = Registry("dataset", "selfsup.data")
VIEW_RECIPES: Registry[Any] = Registry("view recipe", "selfsup.transforms")
