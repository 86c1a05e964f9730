"""Matched utility: set a perturbation defense's strength so it keeps a stated utility (fair comparison).

The paper compares DNF with baselines that keep utility (Table 4: each within 1.5 points of the
victim); at the output-space budget ℓ1 = 1.0, RandP and P-poison flip the top-1 of nearly every
query instead. :func:`match_utility` searches the defense's strength parameter (ε for RandP, MAD and
GRAD², β for reverse sigmoid) for the strongest setting that keeps a :class:`UtilityTarget` on the
defender's held-out ID validation data, and sets it on the defense:

* ``measure="accuracy"`` (default): the defended validation accuracy is at most ``max_drop``
  percentage points below the victim's;
* ``measure="top1"``: at most ``max_drop`` percent of validation answers change their top-1 class
  (``max_drop=0``: every top-1 kept).

The search is a bisection over ``[0, high]`` (strength 0 adds nothing), ``steps`` halvings, each one
pass of the defense over the validation images; random defenses are rewound to their seed before
each pass and after the search, so the result and the deployed defense are deterministic.

Example:
    >>> from fortress.defenses import RandP
    >>> randp = RandP(victim)  # doctest: +SKIP
    >>> match_utility(randp, data.x_val, data.y_val, UtilityTarget(max_drop=0.5)).value  # doctest: +SKIP
    0.8125
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.defenses.base import Defense
from fortress.errors import ConfigError
from fortress.tensors import check_labels

__all__ = ["STRENGTH", "MatchedUtility", "Strength", "UtilityTarget", "match_utility"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strength:
    """A defense's strength parameter: the attribute that scales its perturbation, and its range.

    Attributes:
        parameter: the constructor argument (and attribute) name.
        high: the largest value searched (ε: 2, the ℓ1 diameter of the simplex).
    """

    parameter: str
    high: float


#: The strength parameter of every perturbation defense that can be matched, by registry name.
STRENGTH: dict[str, Strength] = {
    "randp": Strength("epsilon", 2.0),
    "mad": Strength("epsilon", 2.0),
    "mad-argmax": Strength("epsilon", 2.0),
    "grad2": Strength("epsilon", 2.0),
    "reverse-sigmoid": Strength("beta", 2.0),
}


@dataclass(frozen=True)
class UtilityTarget:
    """The utility a matched defense keeps on ID validation data.

    Attributes:
        max_drop: percentage points of validation accuracy the defense may lose (``measure="accuracy"``),
            or percent of validation answers whose top-1 may change (``measure="top1"``).
        measure: ``"accuracy"`` or ``"top1"``.
        steps: bisection steps (the strength is found to ``high / 2**steps``).
    """

    max_drop: float = 0.5
    measure: Literal["accuracy", "top1"] = "accuracy"
    steps: int = 12

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop <= 100.0:
            raise ConfigError(f"max_drop (percentage points) must be in [0, 100], got {self.max_drop}")
        if self.measure not in ("accuracy", "top1"):
            raise ConfigError(f"measure must be 'accuracy' or 'top1', got {self.measure!r}")
        if not 1 <= self.steps <= 40:
            raise ConfigError(f"steps must be in [1, 40], got {self.steps}")


@dataclass(frozen=True)
class MatchedUtility:
    """What :func:`match_utility` chose and measured (recorded with results).

    Attributes:
        defense: the defense's registry name.
        parameter: the strength parameter set.
        value: the value set (the strongest found that keeps the target).
        target: the utility target.
        victim_val_acc: the victim's accuracy on the validation images, a fraction.
        defended_val_acc: the defense's accuracy there at ``value``, a fraction.
        top1_changed: share of validation answers whose top-1 differs from the victim's at ``value``.
        trials: ``(value, defended accuracy, top-1 changed)`` of every pass, in order.
    """

    defense: str
    parameter: str
    value: float
    target: UtilityTarget
    victim_val_acc: float
    defended_val_acc: float
    top1_changed: float
    trials: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def drop_pp(self) -> float:
        """Validation accuracy lost, in percentage points."""
        return 100.0 * (self.victim_val_acc - self.defended_val_acc)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "drop_pp": self.drop_pp}


def _rewind(defense: Defense) -> None:
    reset = getattr(defense, "reset_rng", None)
    if callable(reset):
        reset()


@torch.no_grad()
def _score(defense: Defense, x: Tensor, y: Tensor, victim_top1: Tensor, batch_size: int) -> tuple[float, float]:
    _rewind(defense)
    top1 = torch.cat([defense.respond(x[i : i + batch_size]).probs.argmax(1) for i in range(0, len(x), batch_size)])
    return float((top1 == y).float().mean()), float((top1 != victim_top1).float().mean())


def match_utility(
    defense: Defense,
    x_val: Tensor,
    y_val: Tensor,
    target: UtilityTarget | None = None,
    *,
    batch_size: int = 512,
) -> MatchedUtility:
    """Set ``defense``'s strength to the strongest value that keeps ``target`` on ``(x_val, y_val)``.

    Args:
        defense: a perturbation defense named in :data:`STRENGTH` (built, and fitted if it trains).
        x_val: the defender's held-out ID images ``(N, C, H, W)``.
        y_val: their labels ``(N,)``.
        target: the utility to keep (default :class:`UtilityTarget`: at most 0.5 points lost).
        batch_size: rows per pass.

    Returns:
        The value set and what it keeps; the defense is left at that value, its noise rewound.

    Raises:
        ConfigError: the defense has no strength parameter to match.
        InvalidInput: the labels break the label contract.
    """
    if defense.name not in STRENGTH:
        matchable = ", ".join(sorted(STRENGTH))
        raise ConfigError(f"defense {defense.name!r} has no strength to match; matchable: {matchable}")
    tgt = target or UtilityTarget()
    strength = STRENGTH[defense.name]
    y = check_labels(y_val, len(x_val), defense.num_classes, name="validation labels")
    x_val, y = x_val.to(defense.device), y.to(defense.device)  # scored where the defense runs
    with torch.no_grad():
        victim_top1 = torch.cat(
            [defense.victim(x_val[i : i + batch_size]).argmax(1) for i in range(0, len(x_val), batch_size)]
        )
    victim_acc = float((victim_top1 == y).float().mean())
    trials: list[tuple[float, float, float]] = []

    def keeps(value: float) -> bool:
        setattr(defense, strength.parameter, value)
        acc, changed = _score(defense, x_val, y, victim_top1, batch_size)
        trials.append((value, acc, changed))
        lost = 100.0 * (victim_acc - acc) if tgt.measure == "accuracy" else 100.0 * changed
        return lost <= tgt.max_drop + 1e-9

    lo, hi = 0.0, strength.high
    if keeps(hi):
        lo = hi
    else:
        for _ in range(tgt.steps):
            mid = (lo + hi) / 2
            if keeps(mid):
                lo = mid
            else:
                hi = mid
    setattr(defense, strength.parameter, lo)
    acc, changed = _score(defense, x_val, y, victim_top1, batch_size)
    _rewind(defense)
    result = MatchedUtility(defense.name, strength.parameter, lo, tgt, victim_acc, acc, changed, trials)
    log.info(
        "%s matched to %s=%.4g: validation accuracy %.4f (victim %.4f), top-1 changed on %.2f%%",
        defense.name,
        strength.parameter,
        lo,
        acc,
        victim_acc,
        100 * changed,
    )
    return result
