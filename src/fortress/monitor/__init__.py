"""Extraction monitoring: per-key query profiles and detectors that flag extraction traffic.

``exit-sprt`` tests a key's DNF exit histogram against the ID profile measured at protect time
(paper Table 12: attack traffic leaves early far more often); ``prada`` is PRADA (Juuti et al.
2019), the distance-normality baseline; ``dadd`` tests the distribution of a key's queries per
predicted class in the victim's feature space (after D-ADD, AAAI 2025); ``step`` counts a key's
queries that are small, answer-moving steps from its own earlier queries (JBDA's augmentation); :class:`PopulationDrift`
pools all keys created in a window (the Sybil case). The server (``fortress serve --monitor``) keeps a
:class:`KeyProfile` per key in the key ledger and applies a :class:`Response` to flagged keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from fortress.errors import ArtifactError, ConfigError
from fortress.monitor.base import Monitor, Response, Verdict
from fortress.monitor.dadd import DADD, DADDCalibration, DADDReference, calibrate_dadd, fit_reference
from fortress.monitor.exit_sprt import ExitCalibration, ExitSPRT, calibrate_exit_sprt, calibrate_from_defense
from fortress.monitor.misinform import Misinformation
from fortress.monitor.population import PopulationDrift, PopulationFlag
from fortress.monitor.prada import Prada
from fortress.monitor.profile import KeyProfile, RunningMoments
from fortress.monitor.step import Step, StepCalibration, WindowSteps, calibrate_step
from fortress.monitor.store import ProfileStore
from fortress.monitor.union import AnyOf
from fortress.registry import Registry

__all__ = [
    "DADD",
    "MONITORS",
    "AnyOf",
    "DADDCalibration",
    "DADDReference",
    "ExitCalibration",
    "ExitSPRT",
    "KeyProfile",
    "Misinformation",
    "Monitor",
    "PopulationDrift",
    "PopulationFlag",
    "Prada",
    "ProfileStore",
    "Response",
    "RunningMoments",
    "Step",
    "StepCalibration",
    "Verdict",
    "WindowSteps",
    "calibrate_dadd",
    "calibrate_exit_sprt",
    "calibrate_from_defense",
    "calibrate_step",
    "create_monitor",
    "fit_reference",
    "member_calibration",
]

MONITORS: Registry[type[Monitor]] = Registry("monitor")
MONITORS.add("exit-sprt", ExitSPRT)
MONITORS.add("prada", Prada)
MONITORS.add("dadd", DADD)
MONITORS.add("step", Step)

#: Monitors that read a calibration file.
CALIBRATED = {
    "exit-sprt": "fortress monitor calibrate MODEL_DIR --out FILE",
    "dadd": "fortress monitor calibrate MODEL_DIR --out FILE --dadd",
    "step": "fortress monitor calibrate MODEL_DIR --out FILE --step",
}


def member_calibration(calibration: Path, name: str) -> Path:
    """The calibration file of monitor ``name``: ``calibration`` itself, or its entry in a bundle.

    A bundle is a JSON object ``{"monitor": "bundle", "members": {"exit-sprt": "exit.json", "dadd":
    "dadd.json"}}`` (paths relative to the bundle), so a union of calibrated monitors takes one file.

    Raises:
        ArtifactError: the bundle is unreadable or lacks ``name``.
    """
    try:
        data = json.loads(Path(calibration).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read monitor calibration {calibration}: {exc}") from exc
    if not isinstance(data, dict) or data.get("monitor") != "bundle":
        return Path(calibration)
    members = data.get("members")
    if not isinstance(members, dict) or name not in members:
        have = sorted(members) if isinstance(members, dict) else []
        raise ArtifactError(f"calibration bundle {calibration} has no entry for monitor {name!r} (it has {have})")
    return Path(calibration).parent / str(members[name])


def create_monitor(
    name: str,
    *,
    calibration: Path | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
    **params: Any,
) -> Monitor:
    """Build the monitor registered as ``name``; ``exit-sprt`` and ``dadd`` read their ``calibration`` file.

    ``"a+b"`` builds :class:`AnyOf` the named monitors (``exit-sprt+prada``: flag a key as soon as
    either detector does); ``params`` then go to no member. Calibrated members of a union take one
    bundle file (:func:`member_calibration`).

    Args:
        name: registry name or ``+``-joined names.
        calibration: calibration file or bundle.
        features: the victim's feature function for ``dadd`` calibrations in the ``penultimate`` space
            (e.g. ``dnf.victim.penultimate``).
        **params: the monitor's own parameters.

    Raises:
        UnknownComponent: no such monitor.
        ConfigError: a calibrated monitor without a calibration file.
        ArtifactError: the calibration file is unreadable.
    """
    if "+" in name:
        if params:
            raise ConfigError(f"a union of monitors ({name!r}) takes no parameters, got {sorted(params)}")
        parts = [part.strip() for part in name.split("+")]
        return AnyOf([create_monitor(part, calibration=calibration, features=features) for part in parts])
    cls = MONITORS.get(name)
    if name in CALIBRATED and calibration is None:
        raise ConfigError(f"monitor {name!r} needs a calibration file ({CALIBRATED[name]})")
    if cls is ExitSPRT:
        assert calibration is not None
        return ExitSPRT(ExitCalibration.load(member_calibration(calibration, name)), **params)
    if cls is DADD:
        assert calibration is not None
        return DADD(DADDCalibration.load(member_calibration(calibration, name)), features=features, **params)
    if cls is Step:
        assert calibration is not None
        return Step(StepCalibration.load(member_calibration(calibration, name)), **params)
    return cls(**params)
