"""Extraction monitoring: per-key query profiles and detectors that flag extraction traffic.

``exit-sprt`` tests a key's DNF exit histogram against the ID profile measured at protect time
(paper Table 12: attack traffic leaves early far more often); ``prada`` is PRADA (Juuti et al.
2019), the distance-normality baseline. The server (``fortress serve --monitor``) keeps a
:class:`KeyProfile` per key in the key ledger and applies a :class:`Response` to flagged keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Response, Verdict
from fortress.monitor.exit_sprt import ExitCalibration, ExitSPRT, calibrate_exit_sprt, calibrate_from_defense
from fortress.monitor.prada import Prada
from fortress.monitor.profile import KeyProfile, RunningMoments
from fortress.monitor.store import ProfileStore
from fortress.monitor.union import AnyOf
from fortress.registry import Registry

__all__ = [
    "MONITORS",
    "AnyOf",
    "ExitCalibration",
    "ExitSPRT",
    "KeyProfile",
    "Monitor",
    "Prada",
    "ProfileStore",
    "Response",
    "RunningMoments",
    "Verdict",
    "calibrate_exit_sprt",
    "calibrate_from_defense",
    "create_monitor",
]

MONITORS: Registry[type[Monitor]] = Registry("monitor")
MONITORS.add("exit-sprt", ExitSPRT)
MONITORS.add("prada", Prada)


def create_monitor(name: str, *, calibration: Path | None = None, **params: Any) -> Monitor:
    """Build the monitor registered as ``name``; ``exit-sprt`` reads its ``calibration`` file.

    ``"a+b"`` builds :class:`AnyOf` the named monitors (``exit-sprt+prada``: flag a key as soon as
    either detector does); ``params`` then go to no member.

    Raises:
        UnknownComponent: no such monitor.
        ConfigError: ``exit-sprt`` without a calibration file.
        ArtifactError: the calibration file is unreadable.
    """
    if "+" in name:
        if params:
            raise ConfigError(f"a union of monitors ({name!r}) takes no parameters, got {sorted(params)}")
        return AnyOf([create_monitor(part.strip(), calibration=calibration) for part in name.split("+")])
    cls = MONITORS.get(name)
    if cls is ExitSPRT:
        if calibration is None:
            raise ConfigError(
                "monitor 'exit-sprt' needs a calibration file (fortress monitor calibrate MODEL_DIR --out FILE)"
            )
        return ExitSPRT(ExitCalibration.load(calibration), **params)
    return cls(**params)
