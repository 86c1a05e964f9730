"""Declarative hyper-parameters: each is written once, as a typed field with its range.

An attack declares a hyper-parameter as a class-level field::

    batch_size: int = hp(default=256, ge=2, why="BatchNorm needs two samples")

:class:`~fortress.attacks.base.Attack` turns the fields into its keyword-only constructor
arguments (a dataclass transform), and :func:`settle` checks every value against its type (a
``Literal`` type lists the valid choices), normalises it (``float`` fields hold floats, sequences
become tuples) and checks the declared range; :meth:`~fortress.attacks.base.Attack.hparams` records
the fields as set. A failed check raises :class:`~fortress.errors.ConfigError` naming the setting
and the bad value (``"lr_s must be > 0, got lr_s=-1.0"``). Checks across settings, or against the
oracle, stay in the attack's ``_validate``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from fortress.errors import ConfigError

__all__ = ["Range", "hp", "plain", "settle"]

T = TypeVar("T")

_KEY = "fortress.range"


@dataclass(frozen=True)
class Range:
    """The bounds a number must lie in (``None``: unbounded), and words for the error message.

    Attributes:
        ge, gt, le, lt: ``>=``, ``>``, ``<=``, ``<`` bounds.
        unit: written after the range (``"pixels"``).
        why: the reason for the range, in brackets after it.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    unit: str = ""
    why: str = ""

    def holds(self, v: float) -> bool:
        """Whether ``v`` lies in the range."""
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self, optional: bool) -> str:
        """The range in words, e.g. ``"in [0, 1)"``, ``">= 1 pixels or None"``, ``">= 2 (BatchNorm …)"``."""
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low is not None and high is not None:
            text = f"in {low}, {high}"
        elif low is not None:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high is not None:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = "a number"
        text += f" {self.unit}" if self.unit else ""
        text += " or None" if optional else ""
        return text + (f" ({self.why})" if self.why else "")


def hp(
    *,
    default: T,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    unit: str = "",
    why: str = "",
) -> T:
    """Declare a hyper-parameter field: its default (the paper's, or a documented deviation) and range.

    Args:
        default: the default value. ``None`` in a ``T | None`` field may stand for a value the
            attack derives from the other settings in its ``_validate``.
        ge, gt, le, lt: bounds on a number (checked unless the value is ``None``).
        unit: written after the range in the error message.
        why: the reason for the range, in the error message.

    Example:
        >>> import dataclasses
        >>> dataclasses.fields(dataclasses.make_dataclass("A", [("lr", float, hp(default=0.1, gt=0))]))[0].default
        0.1
    """
    out: T = dataclasses.field(default=default, metadata={_KEY: Range(ge, gt, le, lt, unit, why)})
    return out


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``(hint without None, whether None is allowed)`` for ``X | None`` / ``Optional[X]``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional  # noqa: UP007 - a runtime union
    return hint, False


def _normalise(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type ``hint`` and normalise it (raises :class:`ConfigError`)."""
    base, optional = _without_none(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be set, got {name}=None")
    if get_origin(base) is Literal:
        choices = get_args(base)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {name}={value!r}")
        return value
    if base is bool:
        return bool(value)
    if base is int:
        if not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {name}={value!r}")
        return int(value)
    if base is float:
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {name}={value!r}")
        return float(value)
    if get_origin(base) is Sequence:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{name} must be a sequence, got {name}={value!r}")
        (item,) = get_args(base)
        return tuple(_normalise(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    return value


def settle(obj: Any) -> None:
    """Check and normalise every field of the dataclass ``obj`` in place (type, choices, range).

    Raises:
        ConfigError: naming the first field whose value is of the wrong type, not one of its
            choices or out of its range, and the value.
    """
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _normalise(f.name, getattr(obj, f.name), hints[f.name])
        spec: Range | None = f.metadata.get(_KEY)
        if spec is not None and isinstance(value, int | float) and not spec.holds(value):
            optional = _without_none(hints[f.name])[1]
            raise ConfigError(f"{f.name} must be {spec.describe(optional)}, got {f.name}={value!r}")
        setattr(obj, f.name, value)


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (as JSON would hold it).

    An injected algorithm (a callable, e.g. D-DAE's ``perturb_factory``) is recorded by its
    ``repr`` when it is an object that describes itself, else by its qualified name.
    """
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if callable(value) and not isinstance(value, type):
        name = getattr(value, "__qualname__", None)
        return name if isinstance(name, str) else repr(value)
    return value
