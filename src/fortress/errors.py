"""Errors raised by fortress.

Every error the library raises on purpose is a :class:`FortressError`, so callers (the CLI, the
server) can turn them into one clear line or a JSON error without catching unrelated bugs. Messages
name the bad value and what was expected.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ArtifactError",
    "BudgetExceeded",
    "ConfigError",
    "FortressError",
    "InvalidInput",
    "ModelFactoryError",
    "OracleUnavailable",
    "TooLarge",
    "TrainingDiverged",
    "UnknownComponent",
]


def _restore_error(cls: type[FortressError], args: tuple[Any, ...], state: dict[str, Any]) -> FortressError:
    """Rebuild a pickled :class:`FortressError` without calling its ``__init__`` (see ``__reduce__``)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class FortressError(Exception):
    """Base class of every error fortress raises on purpose.

    Every subclass round-trips through :mod:`pickle` with its message and its fields, whatever its
    ``__init__`` takes, so an error raised in a worker process (``ProcessPoolExecutor``, Ray)
    arrives in the parent as itself.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls ``cls(*self.args)``, which fails for subclasses whose
        # ``__init__`` takes fields rather than the message (BudgetExceeded(8, 0, 5)).
        return (_restore_error, (type(self), self.args, dict(self.__dict__)))


class InvalidInput(FortressError, ValueError):
    """Input tensors violate the contract (shape, dtype, range, NaN/Inf, empty batch)."""


class TooLarge(InvalidInput):
    """An input passes a size limit (batch, body, image pixels, decoded bytes, header); HTTP 413.

    The message names the limit and its value.
    """


class ConfigError(FortressError, ValueError):
    """A hyper-parameter or configuration value is out of range or inconsistent."""


class ModelFactoryError(ConfigError):
    """A user's model cannot be built: its factory does not import, is not callable, fails, returns
    something other than a module, gives the wrong output shape for the data, or cannot be staged by
    the module names given. The message names the factory (``package.module:function``) or module."""


class UnknownComponent(FortressError, LookupError):
    """A registry name (model, defense, attack, dataset) does not exist."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


class BudgetExceeded(FortressError):
    """A batch of queries would pass the oracle's query budget; nothing was charged.

    Attributes:
        requested: rows in the refused batch.
        used: queries already charged before the refused batch.
        budget: the hard budget.
    """

    def __init__(self, requested: int, used: int, budget: int) -> None:
        self.requested = requested
        self.used = used
        self.budget = budget
        super().__init__(
            f"query budget exhausted: a batch of {requested} queries would bring the total to "
            f"{used + requested}, over the budget of {budget} ({budget - used} left); nothing was charged"
        )


class ArtifactError(FortressError):
    """A saved model, checkpoint or result file is missing, unreadable or corrupt."""


class TrainingDiverged(FortressError):
    """Training produced non-finite weights; nothing non-finite is saved."""


class OracleUnavailable(FortressError):
    """A remote oracle could not answer (connection failure, timeout, server fault); nothing was charged."""
