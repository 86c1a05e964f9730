"""Extraction attacks, registered by name; each sees only an :class:`~fortress.oracle.Oracle`.

A new attack is one file (an :class:`Attack` subclass: hyper-parameters declared with :func:`hp`,
the extraction step written against an :class:`AttackRun`, see :mod:`fortress.attacks.base`) and
one ``ATTACKS.add(name, cls)`` line below.
"""

from __future__ import annotations

from fortress.attacks.activethief import ActiveThief
from fortress.attacks.adaptive import AdaptiveEntropy
from fortress.attacks.arch_steal import ArchSteal
from fortress.attacks.base import Attack, AttackResult, AttackRun, Checkpoint, EvalSet, PoolKind, ProgressFn
from fortress.attacks.ddae import DDAE
from fortress.attacks.dfme import DFME
from fortress.attacks.dfms_hl import DFMSHL
from fortress.attacks.disguide import DisGUIDE
from fortress.attacks.exit_aware import ExitAware
from fortress.attacks.hparams import hp
from fortress.attacks.ideal import IDEAL
from fortress.attacks.jbda import JBDA
from fortress.attacks.knockoff import KnockoffNets
from fortress.attacks.smoothing import Smoothing
from fortress.registry import Registry

__all__ = [
    "ATTACKS",
    "DDAE",
    "DFME",
    "DFMSHL",
    "IDEAL",
    "JBDA",
    "ActiveThief",
    "AdaptiveEntropy",
    "ArchSteal",
    "Attack",
    "AttackResult",
    "AttackRun",
    "Checkpoint",
    "DisGUIDE",
    "EvalSet",
    "ExitAware",
    "KnockoffNets",
    "PoolKind",
    "ProgressFn",
    "Smoothing",
    "hp",
]

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.add("dfme", DFME)
ATTACKS.add("knockoff", KnockoffNets)
ATTACKS.add("jbda", JBDA)
ATTACKS.add("arch-steal", ArchSteal)
ATTACKS.add("activethief", ActiveThief)
ATTACKS.add("dfms-hl", DFMSHL)
ATTACKS.add("adaptive-entropy", AdaptiveEntropy)
ATTACKS.add("disguide", DisGUIDE)
ATTACKS.add("ideal", IDEAL)
ATTACKS.add("smoothing", Smoothing)
ATTACKS.add("ddae", DDAE)
ATTACKS.add("exit-aware", ExitAware)
