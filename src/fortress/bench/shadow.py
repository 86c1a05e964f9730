"""A registered defense's algorithm, handed to a defense-aware attack as an injected function.

Attacks never import defenses (sibling families). A defense-aware attack that simulates the
defense on its own shadow model (D-DAE, :class:`~fortress.attacks.ddae.DDAE`) takes a
:data:`~fortress.attacks.ddae.PerturbFactory` instead; this module, above both families, builds one
from a defense registry name and the parameters the attacker assumes the defender used:

    >>> from fortress.models import create_model
    >>> factory = perturb_factory("reverse-sigmoid", beta=0.21, gamma=0.2)
    >>> factory
    reverse-sigmoid(beta=0.21, gamma=0.2)
    >>> factory(create_model("lenet5"))(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])

Only defenses that need no training of their own can be simulated this way (their algorithm and
parameters fully describe them); a surrogate-based defense (MAD, GRAD²) gets a randomly initialised
surrogate from its ``seed`` parameter, which the attacker chooses (it does not know the defender's).

In a benchmark grid, a cell whose attack takes the defense's algorithm (:func:`takes_defense_algorithm`)
gets it from :func:`assumed_defense`: the cell's built defense as saved, its learnt parts left out.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fortress.defenses import DEFENSES
from fortress.defenses.base import read_defense_meta
from fortress.errors import ConfigError
from fortress.models.io import read_json
from fortress.models.staged import StagedBackbone

__all__ = [
    "DEFENSE_ALGORITHM",
    "SIMULABLE",
    "DefenseSimulator",
    "assumed_defense",
    "perturb_factory",
    "perturb_factory_for",
    "takes_defense_algorithm",
]

log = logging.getLogger(__name__)

#: Defenses whose answers are a function of the model's output and of parameters alone (no training
#: of their own, no exits): what a shadow model defended "the same way" can reproduce.
#: The attack hyper-parameter that receives the defense's algorithm (a ``PerturbFactory``).
DEFENSE_ALGORITHM = "perturb_factory"

SIMULABLE = ("undefended", "reverse-sigmoid", "mad", "mad-argmax", "grad2", "randp", "top1", "rounding", "topk")


class DefenseSimulator:
    """A :data:`~fortress.attacks.ddae.PerturbFactory` for registered defense ``name`` with ``params``.

    Calling it with a shadow model (a :class:`~fortress.models.staged.StagedBackbone`) wraps the
    shadow in the defense and returns the function images → defended probability rows. Its
    ``repr`` (``mad(epsilon=1.0, seed=1)``) is what the attack's hyper-parameters record.

    Raises:
        ConfigError: ``name`` cannot be simulated (see :data:`SIMULABLE`) or is not registered.
    """

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        if name not in SIMULABLE:
            raise ConfigError(
                f"defense {name!r} cannot be simulated on a shadow model; simulable: {', '.join(SIMULABLE)}"
            )
        DEFENSES.get(name)  # unknown names fail here, listing the registered ones
        self.name = name
        self.params = dict(params)

    def __call__(self, shadow: nn.Module) -> Callable[[Tensor], Tensor]:
        if not isinstance(shadow, StagedBackbone):
            raise ConfigError(f"the shadow model must be a fortress StagedBackbone, got {type(shadow).__name__}")
        try:
            defense = DEFENSES.get(self.name)(shadow, **self.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build defense {self.name!r} with params {self.params}: {exc}") from exc

        @torch.no_grad()
        def defended(x: Tensor) -> Tensor:
            return defense(x)

        return defended

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{self.name}({args})"


def perturb_factory(name: str, **params: Any) -> DefenseSimulator:
    """The perturbation of registered defense ``name`` with constructor ``params``, for a shadow model."""
    return DefenseSimulator(name, params)


def perturb_factory_for(directory: Path, **overrides: Any) -> DefenseSimulator:
    """The algorithm and parameters of the defense saved in ``directory`` (its ``defense.json``).

    ``overrides`` replace saved parameters: what the attacker cannot know, e.g. a surrogate's
    ``seed`` (an override the defense does not take is ignored, so one override fits every
    defense). Only the parameters the constructor takes are kept (the record also holds derived
    facts such as a surrogate's training epochs).
    """
    meta = read_json(Path(directory) / "defense.json")
    name = str(meta.get("defense"))
    _, params = read_defense_meta(Path(directory), name)
    ctor = inspect.signature(DEFENSES.get(name)).parameters
    takes = {k for k in ctor if k != "victim"}
    kept = {k: v for k, v in params.items() if k in takes and not isinstance(v, dict | list)}
    ignored = sorted(set(overrides) - takes)
    if ignored:
        log.info("defense %r takes no %s; the override is ignored", name, ", ".join(ignored))
    return DefenseSimulator(name, {**kept, **{k: v for k, v in overrides.items() if k in takes}})


def takes_defense_algorithm(attack: str) -> bool:
    """Whether registered attack ``attack`` takes the defense's algorithm (:data:`DEFENSE_ALGORITHM`), as D-DAE does."""
    from fortress.attacks import ATTACKS

    return DEFENSE_ALGORITHM in {f.name for f in dataclasses.fields(ATTACKS.get(attack))}


#: Build parameters that are not constructor arguments (see :mod:`fortress.bench.build`).
_BUILD_ONLY = ("fit", "match_utility")


def assumed_defense(
    name: str,
    params: dict[str, Any],
    directory: Path | None,
    *,
    attacker_seed: int,
) -> tuple[DefenseSimulator, dict[str, Any]]:
    """What a defense-aware attacker knows of a grid cell's defense: its algorithm and parameters.

    The parameters are those of the built defense as saved in ``directory`` (its ``defense.json``,
    :func:`perturb_factory_for`), so a strength set by ``match_utility`` is the value the build
    found; without a saved defense, the grid's ``params`` less the build-only tables, with a matched
    strength read from ``directory/utility_match.json``. What the attacker cannot know is replaced:
    a surrogate's ``seed`` becomes ``attacker_seed`` (moved on by one if it happens to equal the
    defender's), and learnt weights (a surrogate distilled by ``fit``) are not carried over, so the
    simulated defense uses a randomly initialised surrogate.

    Args:
        name: the defense's registry name.
        params: the grid's build parameters for it.
        directory: the built defense's artifact directory (``None``: not built or not saved).
        attacker_seed: the seed the attacker picks for what it must draw itself.

    Returns:
        The simulator and a plain record of the knowledge: ``algorithm``, ``params`` (as assumed),
        ``replaced`` (parameter names set by the attacker, not the defender) and ``source``.

    Raises:
        ConfigError: the defense cannot be simulated (not in :data:`SIMULABLE`).
    """
    if name not in SIMULABLE:
        raise ConfigError(f"defense {name!r} cannot be simulated on a shadow model; simulable: {', '.join(SIMULABLE)}")
    takes = {k for k in inspect.signature(DEFENSES.get(name)).parameters if k != "victim"}
    saved = directory is not None and (Path(directory) / "defense.json").is_file()
    if saved:
        assert directory is not None
        _, stored = read_defense_meta(Path(directory), name)
        known = {k: v for k, v in stored.items() if k in takes and not isinstance(v, dict | list)}
        source = "saved defense"
    else:
        known = {k: v for k, v in params.items() if k not in _BUILD_ONLY and k in takes}
        matched = None if directory is None else Path(directory) / "utility_match.json"
        if matched is not None and matched.is_file():
            found = read_json(matched)
            known[str(found["parameter"])] = found["value"]
        source = "grid parameters"
    replaced: list[str] = []
    if "seed" in takes:
        defender = known.get("seed", inspect.signature(DEFENSES.get(name)).parameters["seed"].default)
        known["seed"] = attacker_seed if attacker_seed != defender else attacker_seed + 1
        replaced.append("seed")
    simulator = DefenseSimulator(name, known)
    record = {"algorithm": name, "params": dict(sorted(known.items())), "replaced": replaced, "source": source}
    return simulator, record
