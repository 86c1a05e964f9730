"""Every error fortress raises crosses a process boundary as itself, with its fields.

The classes are found by importing every module of the package and walking ``FortressError``'s
subclasses, so a new error class is covered without being listed here.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import pickle
import pkgutil
import typing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import fortress
from fortress.errors import BudgetExceeded, ConfigError, FortressError
from helpers import spend_over_budget


def _all_error_classes() -> list[type[FortressError]]:
    for mod in pkgutil.walk_packages(fortress.__path__, "fortress."):
        if mod.name.endswith(".__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(mod.name)
        except (ImportError, ConfigError):  # an optional extra (ART, Ray) that is not installed
            continue
    found: list[type[FortressError]] = []
    todo: list[type[FortressError]] = [FortressError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


ERRORS = _all_error_classes()
_SAMPLES: dict[Any, Any] = {int: 7, str: "a message naming the bad value", float: 0.5, bool: True}


def _instance(cls: type[FortressError]) -> FortressError:
    """An instance built from ``__init__``'s annotations (errors whose ``__init__`` takes fields)."""
    if cls.__init__ is BaseException.__init__:
        return cls("a message naming the bad value")
    hints = typing.get_type_hints(cls.__init__)
    args = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        hint = hints.get(name)
        assert hint in _SAMPLES, f"{cls.__qualname__}.__init__({name}: {hint}) needs a sample value in this test"
        args.append(_SAMPLES[hint] + len(args) if hint is int else _SAMPLES[hint])
    return cls(*args)


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    names = {c.__qualname__ for c in ERRORS}
    assert {"BudgetExceeded", "KeyRejected", "TooLarge", "InvalidInput", "ArtifactError", "Unavailable"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=[f"{c.__module__}.{c.__qualname__}" for c in ERRORS])
def test_every_error_round_trips_through_pickle_with_its_fields(cls: type[FortressError]) -> None:
    exc = _instance(cls)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(exc, protocol=protocol))
        assert type(back) is cls
        assert str(back) == str(exc) and back.args == exc.args
        assert vars(back) == vars(exc)


def test_budget_exceeded_keeps_its_fields() -> None:
    back = pickle.loads(pickle.dumps(BudgetExceeded(8, 0, 5)))
    assert (back.requested, back.used, back.budget) == (8, 0, 5)
    assert "budget of 5" in str(back)


def test_a_budget_refusal_in_a_worker_process_arrives_as_itself() -> None:
    """Raised by a real LocalOracle in a spawned worker; the pool survives and answers again."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(BudgetExceeded) as info:
            pool.submit(spend_over_budget, 8, 5).result(timeout=120)
        assert (info.value.requested, info.value.used, info.value.budget) == (8, 0, 5)
        assert pool.submit(spend_over_budget, 3, 5).result(timeout=120) == 3
