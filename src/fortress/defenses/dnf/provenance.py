"""How a DNF was made by the protection recipe: one frozen record kept on the model and saved with it.

:func:`fortress.defenses.dnf.recipe.protect` trains the exit heads up to ``max_attempts`` times until
an acceptance check passes, may train several such candidates and keep the one an extraction probe
extracts least from, may raise thresholds with a utility guard, and may search thresholds with
SMAC3 (paper App. H). :class:`Provenance` records each of these steps; it is JSON-ready and
round-trips through ``defense.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fortress.errors import ArtifactError

__all__ = ["Attempt", "Candidate", "GuardResult", "Provenance", "SearchSummary", "Selection"]


@dataclass(frozen=True)
class Attempt:
    """One training of the exit heads and its acceptance check.

    Attributes:
        head_seed: seed of the heads' initial weights.
        ood_exit0: share of fresh OOD probes that left at exit 0 after training.
    """

    head_seed: int
    ood_exit0: float


@dataclass(frozen=True)
class GuardResult:
    """The utility guard (``DNF`` thresholds raised so early exits cost at most a budget of ID validation accuracy).

    Attributes:
        before: thresholds before the guard.
        after: thresholds after it (never lower).
        max_harm: validation images a head was still allowed to answer wrongly (zero budget).
        max_utility_drop: the utility budget in points of accuracy (0: zero tolerance; such a record
            is written without the budget's keys, as before the budget existed).
        victim_val_acc: the victim's ID validation accuracy (with a budget).
        val_acc: the defended ID validation accuracy after the guard (with a budget).
    """

    before: tuple[float, ...]
    after: tuple[float, ...]
    max_harm: int = 0
    max_utility_drop: float = 0.0
    victim_val_acc: float | None = None
    val_acc: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form; a zero budget keeps the record's older form (no budget keys)."""
        data = asdict(self)
        if self.max_utility_drop == 0:
            for key in ("max_utility_drop", "victim_val_acc", "val_acc"):
                data.pop(key)
        return data


@dataclass(frozen=True)
class Candidate:
    """One trained candidate of the selection and what the extraction probe measured on it.

    Attributes:
        train_seed: seed of its training (batches, OOD draws; its heads start from ``train_seed + attempt``).
        attempts: its trainings and acceptance checks.
        accepted: whether it passed the acceptance check.
        probe_student_acc: the probe's student accuracy on the defender's validation split (lower is better).
        probe_exit_hist: share of the probe's images per exit.
        train_seconds: wall time of its training attempts and guard.
        probe_seconds: wall time of its probe.
    """

    train_seed: int
    attempts: tuple[Attempt, ...]
    accepted: bool
    probe_student_acc: float
    probe_exit_hist: tuple[float, ...]
    train_seconds: float
    probe_seconds: float


@dataclass(frozen=True)
class Selection:
    """The selection among candidate trainings by the extraction probe.

    Attributes:
        candidates: every candidate, in training order.
        chosen: index of the kept candidate (the lowest probe score among the accepted ones).
        probe: the probe's settings.
    """

    candidates: tuple[Candidate, ...]
    chosen: int
    probe: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        plain: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return plain


@dataclass(frozen=True)
class SearchSummary:
    """What the SMAC3 threshold search found (paper App. H); every trial is in ``trials_file``.

    Attributes:
        thresholds: the applied (best feasible) thresholds.
        surrogate: their objective value (surrogate clone accuracy or top-1 agreement).
        val_acc: defended ID validation accuracy with them.
        baseline_thresholds: the reference (paper-default) thresholds.
        baseline_surrogate: the reference's objective value.
        baseline_val_acc: the reference's ID validation accuracy.
        victim_val_acc: the victim's ID validation accuracy.
        n_trials: trials evaluated.
        trials_file: name of the JSONL record next to the saved model (``None``: not written).
        goal: the three-way search's pick (``protection``, ``efficiency``, ``pareto``; ``None``: single objective).
        id_compute: ID FLOPs per query over the undefended victim's with the applied thresholds (three-way search).
        baseline_id_compute: the same for the reference thresholds.
        front_size: points on the Pareto front (three-way search).
    """

    thresholds: tuple[float, ...]
    surrogate: float
    val_acc: float
    baseline_thresholds: tuple[float, ...]
    baseline_surrogate: float
    baseline_val_acc: float
    victim_val_acc: float
    n_trials: int
    trials_file: str | None = None
    goal: str | None = None
    id_compute: float | None = None
    baseline_id_compute: float | None = None
    front_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form; a single-objective search keeps the record's older form (no three-way keys)."""
        data = asdict(self)
        if self.goal is None:
            for key in ("goal", "id_compute", "baseline_id_compute", "front_size"):
                data.pop(key)
        return data


@dataclass(frozen=True)
class Provenance:
    """The protection recipe's record of one DNF.

    Attributes:
        attempts: every training of the heads, in order (the kept one is the best by ``ood_exit0``).
        min_ood_exit0: the acceptance threshold the attempts were checked against.
        guard: the utility guard's result (``None``: not applied).
        search: the threshold search's result (``None``: not run).
        selection: the candidates and the probe's choice (``None``: one training, no probe);
            ``attempts`` and ``guard`` are then the kept candidate's.
        temperatures: per-head temperatures folded into the heads before the guard (1.0: left
            alone; ``None``: no calibration, and the record is written without the key).
    """

    attempts: tuple[Attempt, ...]
    min_ood_exit0: float
    guard: GuardResult | None = None
    search: SearchSummary | None = None
    selection: Selection | None = None
    temperatures: tuple[float, ...] | None = None

    @property
    def accepted(self) -> bool:
        """Whether the kept heads passed the acceptance check."""
        return any(a.ood_exit0 >= self.min_ood_exit0 for a in self.attempts)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        data: dict[str, Any] = asdict(self)
        if self.guard is not None:
            data["guard"] = self.guard.to_json()
        if self.search is not None:
            data["search"] = self.search.to_json()
        if self.temperatures is None:
            data.pop("temperatures")
        return data

    @classmethod
    def from_json(cls, data: Any) -> Provenance:
        """Inverse of :meth:`to_json`.

        Raises:
            ArtifactError: ``data`` is not a provenance record.
        """
        try:
            guard, search, selection = data.get("guard"), data.get("search"), data.get("selection")
            return cls(
                attempts=_attempts(data["attempts"]),
                min_ood_exit0=float(data["min_ood_exit0"]),
                guard=None
                if guard is None
                else GuardResult(
                    tuple(float(t) for t in guard["before"]),
                    tuple(float(t) for t in guard["after"]),
                    int(guard.get("max_harm", 0)),
                    float(guard.get("max_utility_drop", 0.0)),
                    _optional_float(guard.get("victim_val_acc")),
                    _optional_float(guard.get("val_acc")),
                ),
                search=None
                if search is None
                else SearchSummary(
                    **{
                        **search,
                        "thresholds": tuple(float(t) for t in search["thresholds"]),
                        "baseline_thresholds": tuple(float(t) for t in search["baseline_thresholds"]),
                    }
                ),
                selection=None if selection is None else _selection(selection),
                temperatures=None
                if data.get("temperatures") is None
                else tuple(float(t) for t in data["temperatures"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"not a DNF provenance record: {exc}") from exc


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _attempts(items: Any) -> tuple[Attempt, ...]:
    return tuple(Attempt(int(a["head_seed"]), float(a["ood_exit0"])) for a in items)


def _selection(data: Any) -> Selection:
    candidates = tuple(
        Candidate(
            train_seed=int(c["train_seed"]),
            attempts=_attempts(c["attempts"]),
            accepted=bool(c["accepted"]),
            probe_student_acc=float(c["probe_student_acc"]),
            probe_exit_hist=tuple(float(v) for v in c["probe_exit_hist"]),
            train_seconds=float(c["train_seconds"]),
            probe_seconds=float(c["probe_seconds"]),
        )
        for c in data["candidates"]
    )
    return Selection(candidates, int(data["chosen"]), dict(data["probe"]))
