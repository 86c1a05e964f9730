"""Name-keyed registries of components (models, defenses, attacks, datasets).

The registry name is the CLI and config name. Unknown names raise :class:`UnknownComponent`
listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fortress.errors import UnknownComponent

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to components of one kind.

    Args:
        kind: what the registry holds, used in error messages ("attack", "model", ...).

    Example:
        >>> MODELS: Registry[Callable[..., object]] = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny() -> object: ...
        >>> MODELS.names()
        ['tiny']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a second registration of a name is an error."""
        if not name or name != name.strip().lower():
            raise ValueError(f"{self.kind} name must be lower-case and non-empty, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return what it held (a plugin unloading, a test cleaning up).

        Raises:
            UnknownComponent: ``name`` is not registered.
        """
        obj = self.get(name)
        del self._items[name]
        return obj

    def get(self, name: str) -> T:
        """Return the component registered as ``name``.

        Raises:
            UnknownComponent: ``name`` is not registered; the message lists the valid names.
        """
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownComponent(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
