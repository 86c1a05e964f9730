"""Errors raised by fortress.

Every error the library raises on purpose is a :class:`FortressError`, so callers (the CLI, the
server) can turn them into one clear line or a JSON error without catching unrelated bugs. Messages
name the bad value and what was expected.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BudgetExceeded",
    "ConfigError",
    "FortressError",
    "InvalidInput",
    "OracleUnavailable",
    "TrainingDiverged",
    "UnknownComponent",
]


class FortressError(Exception):
    """Base class of every error fortress raises on purpose."""


class InvalidInput(FortressError, ValueError):
    """Input tensors violate the contract (shape, dtype, range, NaN/Inf, empty batch)."""


class ConfigError(FortressError, ValueError):
    """A hyper-parameter or configuration value is out of range or inconsistent."""


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
