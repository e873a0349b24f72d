"""Errors raypipe raises for bad input: each names what is wrong and how to fix it."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "InputError", "RaypipeError", "StageContractError"]


class RaypipeError(Exception):
    """Base class: a message for a person, with the fix when one is known.

    Parameters
    ----------
    message
        What is wrong (name the file, the column, the gene).
    fix
        How to fix it; appended to the message as ``fix: ...``.
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with message and fix (errors raised in Ray workers travel to the driver)."""
        return _rebuild, (type(self), self.message, self.fix)


def _rebuild(cls: type[RaypipeError], message: str, fix: str | None) -> RaypipeError:
    return cls(message, fix=fix)


class InputError(RaypipeError):
    """The input data (atlas, table, dictionary, checkpoint) cannot be used as it is."""


class ConfigError(RaypipeError):
    """The job config is invalid."""


class StageContractError(RaypipeError):
    """A stage received a batch without the columns it needs."""
