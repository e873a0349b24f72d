"""A small named registry: backends and sources are looked up by name, never by if/elif."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from raypipe.errors import ConfigError

__all__ = ["Capabilities", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What a backend needs and costs, declared where it is registered.

    Attributes
    ----------
    paid
        Calls cost money (priced in ``prices``; estimated by ``--dry-run``).
    remote
        Work leaves the process (an API or model actors): it goes through the LLM client
        actors (``limits.actors``), the rate limiter and the cache.
    gpu
        Runs on GPUs (its ``num_gpus`` setting applies to the actors).
    """

    paid: bool = False
    remote: bool = False
    gpu: bool = False


class Registry(Generic[T]):
    """Map names to factories.

    Parameters
    ----------
    kind
        What the registry holds (used in error messages), e.g. ``"gene text source"``.

    Examples
    --------
    >>> sources = Registry[type]("gene text source")
    >>> @sources.register("symbol")
    ... class SymbolSource: ...
    >>> sources.get("symbol").__name__
    'SymbolSource'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._caps: dict[str, Capabilities] = {}

    def register(self, name: str, capabilities: Capabilities | None = None) -> Callable[[T], T]:
        """Register the decorated object under ``name`` (with its capabilities)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._caps[name] = capabilities or Capabilities()
            return obj

        return deco

    def add(self, name: str, obj: T | str, capabilities: Capabilities | None = None) -> None:
        """Register ``obj`` under ``name``.

        ``obj`` may be a ``"package.module:attr"`` string: the module is imported on the
        first :meth:`get`, so heavy backends (torch, openai, vllm) stay unimported until used.
        """
        self.register(name, capabilities)(obj)  # type: ignore[arg-type]

    def capabilities(self, name: str) -> Capabilities:
        """Return what ``name`` needs and costs (without importing it)."""
        if name not in self._caps:
            self.get(name)  # raises the unknown-name error
        return self._caps[name]

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names list the known ones."""
        try:
            obj: Any = self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {known}",
                fix=f"use one of: {known}",
            ) from None
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items[name] = obj
        return obj  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
