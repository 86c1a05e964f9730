"""fortress: protect image classifiers against model extraction with Dynamic Neural Fortresses (DNF),
and measure any defense against the extraction attacks people really run.

The public API is re-exported here; see the README for a tour.
"""

from __future__ import annotations

from fortress.attacks import ATTACKS, DFME, Attack, AttackResult, EvalSet, KnockoffNets
from fortress.data import ImageSet, mnist_splits
from fortress.defenses import DEFENSES, DNF, Defense, DefenseOutput, Undefended, load_defense
from fortress.errors import (
    ArtifactError,
    BudgetExceeded,
    ConfigError,
    FortressError,
    InvalidInput,
    OracleUnavailable,
    UnknownComponent,
)
from fortress.exits import EarlyExitNet, ExitHead
from fortress.models import MODELS, StagedBackbone, create_model, from_sequential, from_stages, load_model, save_model
from fortress.oracle import HttpOracle, LocalOracle, Oracle, OutputMode

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "DFME",
    "DNF",
    "MODELS",
    "ArtifactError",
    "Attack",
    "AttackResult",
    "BudgetExceeded",
    "ConfigError",
    "Defense",
    "DefenseOutput",
    "EarlyExitNet",
    "EvalSet",
    "ExitHead",
    "FortressError",
    "HttpOracle",
    "ImageSet",
    "InvalidInput",
    "KnockoffNets",
    "LocalOracle",
    "Oracle",
    "OracleUnavailable",
    "OutputMode",
    "StagedBackbone",
    "Undefended",
    "UnknownComponent",
    "__version__",
    "create_model",
    "from_sequential",
    "from_stages",
    "load_defense",
    "load_model",
    "mnist_splits",
    "save_model",
]
