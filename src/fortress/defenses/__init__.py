"""Defenses, registered by name, all behind the :class:`Defense` contract."""

from __future__ import annotations

from pathlib import Path

from fortress.defenses.base import Defense, DefenseOutput
from fortress.defenses.dnf import DNF
from fortress.defenses.undefended import Undefended
from fortress.models.io import read_json
from fortress.registry import Registry

__all__ = ["DEFENSES", "DNF", "Defense", "DefenseOutput", "Undefended", "load_defense"]

DEFENSES: Registry[type[Defense]] = Registry("defense")
DEFENSES.add("undefended", Undefended)
DEFENSES.add("dnf", DNF)


def load_defense(directory: Path, **overrides: object) -> Defense:
    """Load a saved defense: reads ``defense.json`` and dispatches to the registered class's ``load``.

    A directory holding only a saved model (``model.json``) loads as :class:`Undefended`.
    """
    directory = Path(directory)
    if not (directory / "defense.json").exists() and (directory / "model.json").exists():
        from fortress.models.io import load_model

        return Undefended(load_model(directory))
    meta = read_json(directory / "defense.json")
    cls = DEFENSES.get(str(meta.get("defense")))
    return cls.load(directory, **overrides)
