"""Defenses, registered by name, all behind the :class:`Defense` contract."""

from __future__ import annotations

from pathlib import Path

from fortress.defenses.adaptive_misinfo import AdaptiveMisinformation
from fortress.defenses.base import Defense, DefenseOutput
from fortress.defenses.dnf import DNF
from fortress.defenses.grad2 import Grad2
from fortress.defenses.mad import MAD, MADArgmax
from fortress.defenses.meco import MeCo
from fortress.defenses.output_filters import Rounding, Top1, TopK
from fortress.defenses.randp import RandP
from fortress.defenses.reverse_sigmoid import ReverseSigmoid
from fortress.defenses.trainable import DefenderData, TrainableDefense
from fortress.defenses.undefended import Undefended
from fortress.models.io import read_json
from fortress.registry import Registry

__all__ = [
    "DEFENSES",
    "DNF",
    "MAD",
    "AdaptiveMisinformation",
    "DefenderData",
    "Defense",
    "DefenseOutput",
    "Grad2",
    "MADArgmax",
    "MeCo",
    "RandP",
    "ReverseSigmoid",
    "Rounding",
    "Top1",
    "TopK",
    "TrainableDefense",
    "Undefended",
    "load_defense",
]

DEFENSES: Registry[type[Defense]] = Registry("defense")
DEFENSES.add("undefended", Undefended)
DEFENSES.add("dnf", DNF)
DEFENSES.add("randp", RandP)
DEFENSES.add("mad", MAD)
DEFENSES.add("mad-argmax", MADArgmax)
DEFENSES.add("grad2", Grad2)
DEFENSES.add("reverse-sigmoid", ReverseSigmoid)
DEFENSES.add("meco", MeCo)
DEFENSES.add("adaptive-misinformation", AdaptiveMisinformation)
DEFENSES.add("top1", Top1)
DEFENSES.add("rounding", Rounding)
DEFENSES.add("topk", TopK)


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
