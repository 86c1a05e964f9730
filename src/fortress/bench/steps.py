"""Whole steps on saved artifacts, one call each: defend or protect a saved victim, attack a saved
defense or a server, calibrate a monitor on a saved DNF.

Each step loads what it is given, runs the library call that does the work
(:func:`~fortress.bench.build.build_defense`, :func:`~fortress.bench.pipeline.protect`,
:func:`~fortress.bench.pipeline.run_attack`, :func:`~fortress.monitor.calibrate_from_defense`),
saves what it made and returns it with its figures. They are what the CLI verbs call; progress comes
back through ``event(stage, completed, total)``.

The data are named by a :class:`~fortress.data.spec.DataSpec`; without one, each step uses the
spec the saved model remembers (``model.json``'s ``data``), else the embedded MNIST digits. The
data are resolved and checked against the model before anything is trained, queried or written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortress.device import resolve_device

if TYPE_CHECKING:
    from fortress.bench.records import ResultRecord
    from fortress.config import AttackConfig, ProtectConfig
    from fortress.data.spec import DataSpec
    from fortress.defenses.base import Defense
    from fortress.defenses.dnf import DNF
    from fortress.monitor.exit_sprt import ExitCalibration

__all__ = [
    "DEFAULT_DATASET",
    "Attacked",
    "Calibrated",
    "Defended",
    "EventFn",
    "Protected",
    "attack_saved",
    "calibrate_saved",
    "defend_saved",
    "is_url",
    "protect_saved",
]

#: The data set of a step whose model remembers none and that is given none: the embedded MNIST digits.
DEFAULT_DATASET = "mnist"

#: ``event(stage, completed, total)``: progress of one named stage.
EventFn = Callable[[str, float, float], None]


@dataclass(frozen=True)
class Defended:
    """A defense built on a saved victim and saved to ``out``.

    Attributes:
        defense: the built (and, where it trains, trained) defense.
        out: where it was saved.
        accuracy: accuracy of its answers on the ID test split, a fraction in [0, 1].
        exit_hist: share of ID test queries per exit (empty for a defense without exits).
    """

    defense: Defense
    out: Path
    accuracy: float
    exit_hist: list[float]


@dataclass(frozen=True)
class Protected:
    """A saved victim protected with DNF and saved to ``out`` (fields as :class:`Defended`)."""

    dnf: DNF
    out: Path
    accuracy: float
    exit_hist: list[float]


@dataclass(frozen=True)
class Attacked:
    """One attack's result record and the ``results.jsonl`` it was appended to."""

    record: ResultRecord
    results: Path


@dataclass(frozen=True)
class Calibrated:
    """An exit-sprt calibration saved to ``out``, made from ``queries`` held-out ID queries.

    With ``dadd`` or ``step``, ``out`` is a bundle naming every calibration file (``dadd_threshold``,
    ``step_threshold``: their ``h``).
    """

    calibration: ExitCalibration
    out: Path
    queries: int
    dadd_threshold: float | None = None
    step_threshold: float | None = None


def is_url(target: str) -> bool:
    """Whether an attack target names a ``fortress serve`` server (``http(s)://``) rather than a directory."""
    return target.startswith(("http://", "https://"))


def defend_saved(
    name: str,
    victim_dir: Path,
    out: Path,
    params: dict[str, Any] | None = None,
    *,
    data: DataSpec | None = None,
    event: EventFn | None = None,
    device: str = "cpu",
) -> Defended:
    """Build defense ``name`` on the victim saved in ``victim_dir`` as a grid builds it, save it to ``out``.

    The build is :func:`fortress.bench.build.build_defense`: the constructor with ``params`` (and
    ``defense.fit`` on the ID data when ``params`` holds a ``fit`` table); for ``dnf`` the DNF recipe
    with ``params`` read as a :class:`~fortress.config.ProtectConfig` (checkpoints in ``out/checkpoints``).

    ``data`` defaults to the spec the victim remembers.

    Raises:
        UnknownComponent: ``name`` is not a registered defense, or the data set is not.
        ConfigError: ``params`` do not fit the defense (checked before the victim is loaded).
        ArtifactError: ``victim_dir`` holds no readable victim, or the data's files are missing.
        InvalidInput: the data do not fit the victim (checked before ``out`` is written).
    """
    from fortress.bench.build import BuildContext, build_defense, check_defense_params
    from fortress.bench.pipeline import data_for, defended_accuracy
    from fortress.models import load_model

    params = dict(params or {})
    check_defense_params(name, params)
    dev = resolve_device(device)
    victim = load_model(victim_dir).to(dev)
    resolved = data_for(victim, data)
    out.mkdir(parents=True, exist_ok=True)
    stage = f"build {name}"
    _emit(event, stage, 0, 1)
    defense = build_defense(name, victim, params, BuildContext(data=resolved.spec, out=out))
    _emit(event, stage, 1, 1)
    defense.save(out)
    acc, hist = defended_accuracy(defense, resolved.test)
    return Defended(defense, out, acc, hist)


def protect_saved(
    victim_dir: Path,
    out: Path,
    cfg: ProtectConfig,
    *,
    resume: bool = True,
    data: DataSpec | None = None,
    event: EventFn | None = None,
    device: str = "cpu",
) -> Protected:
    """Protect the victim saved in ``victim_dir`` with DNF (:func:`fortress.bench.pipeline.protect`), save to ``out``.

    Stages reported: ``train OOD generator`` (DCGAN epochs, when the OOD source has one) and
    ``train DNF exits`` (fractional epochs).

    ``data`` defaults to the spec the victim remembers.

    Raises:
        ArtifactError: ``victim_dir`` holds no readable victim, or the data's files are missing.
        ConfigError: settings DNF cannot use (e.g. a threshold per head that does not fit the heads).
        InvalidInput: the data do not fit the victim (checked before ``out`` is written).
    """
    from fortress.bench.pipeline import data_for, defended_accuracy, protect
    from fortress.models import load_model

    dev = resolve_device(device)
    victim = load_model(victim_dir).to(dev)
    resolved = data_for(victim, data)
    epochs = cfg.train.epochs
    dnf = protect(
        victim,
        cfg,
        data=resolved.spec,
        out=out,
        resume=resume,
        on_dcgan_epoch=lambda e, _g, _d: _emit(event, "train OOD generator", e + 1, cfg.ood.dcgan_epochs),
        on_step=lambda s: _emit(event, "train DNF exits", s.epoch + (s.step + 1) / s.steps_per_epoch, epochs),
    )
    acc, hist = defended_accuracy(dnf, resolved.test)
    return Protected(dnf, out, acc, hist)


def attack_saved(
    target: str,
    cfg: AttackConfig,
    out: Path,
    *,
    reference: Path | None = None,
    api_key: str | None = None,
    api_budget: int | None = None,
    data: DataSpec | None = None,
    event: EventFn | None = None,
    device: str = "cpu",
) -> Attacked:
    """Attack a saved defense (or victim) directory or a ``fortress serve`` URL; append the record to ``out``.

    The record goes to ``out/results.jsonl`` only once the attack finished, so an attack stopped by
    an error (e.g. the server's quota, :class:`~fortress.errors.BudgetExceeded`) leaves earlier
    records as they were. The stage reported is ``"<attack> vs <defense name or URL>"`` (queries used
    of the budget).

    Args:
        target: a directory saved by ``defend``/``protect``/``train-victim``, or an ``http(s)://`` URL.
        cfg: the attack.
        out: directory of ``results.jsonl``.
        reference: URL targets: a local copy of the served defense, for off-budget evaluation.
        api_key: URL targets: the key the server issued.
        api_budget: the target's own query quota (default: the attack budget).
        data: the defender's data (evaluation set, attacker split); default: the spec the target's
            (or the reference's) victim remembers. Checked, with the pool, before the first query.
        event: progress callback.
        device: where the clone trains and a local target answers.
    """
    from fortress.bench.pipeline import run_attack
    from fortress.bench.records import append_record
    from fortress.defenses import load_defense

    dev = resolve_device(device)
    ref = None if reference is None else load_defense(reference).to(dev)
    defense: Defense | str = target if is_url(target) else load_defense(Path(target))
    label = defense if isinstance(defense, str) else defense.name
    stage = f"{cfg.name} vs {label}"
    rec = run_attack(
        defense,
        cfg,
        reference=ref,
        api_key=api_key,
        data=data,
        progress=lambda used, budget: _emit(event, stage, used, budget),
        extra_config={"target": str(target)},
        api_budget=api_budget,
        device=dev,
    )
    results = out / "results.jsonl"
    append_record(results, rec)
    return Attacked(rec, results)


def calibrate_saved(
    model_dir: Path,
    out: Path,
    *,
    alpha: float = 0.01,
    horizon: int = 10_000,
    views: int = 3,
    seed: int = 0,
    data: DataSpec | None = None,
    dadd: bool = False,
    dadd_horizon: int = 1000,
    dadd_streams: int = 200,
    step: bool = False,
    benign_shifts: bool = True,
) -> Calibrated:
    """Calibrate the exit-sprt monitor for the DNF saved in ``model_dir`` on held-out ID data; save to ``out``.

    With ``dadd``, also calibrate ``dadd`` (reference: the training split; threshold: the validation
    split under every benign shift and class mix, ``alpha`` within ``dadd_horizon`` queries) and write
    ``out`` as a bundle naming ``<out stem>.exit-sprt.json`` and ``<out stem>.dadd.json`` next to it, so
    ``--monitor exit-sprt+dadd --monitor-calibration OUT`` reads both. With ``step``, also calibrate
    ``step`` (validation split under every benign shift and class mix, ``alpha`` within 1,000
    queries) into ``<out stem>.step.json``, named in the same bundle.

    The held-out queries are the ID validation split plus ``views`` shifted, noisy copies of it
    (:func:`fortress.monitor.exit_sprt.light_views`); ``alpha`` is the share of ID keys flagged within
    ``horizon`` queries (:func:`fortress.monitor.calibrate_from_defense`), with ``benign_shifts`` in
    every benign scenario (3 copies of those queries under each realistic shift, all classes or
    one). ``data`` defaults to the spec the model remembers.
    """
    from fortress.bench.pipeline import data_for
    from fortress.defenses import load_defense
    from fortress.monitor import calibrate_from_defense
    from fortress.monitor.benign import IMAGE_SHIFTS
    from fortress.monitor.exit_sprt import light_views

    defense = load_defense(model_dir)
    resolved = data_for(defense.victim, data)
    x = light_views(resolved.val.x, views, seed=seed)
    shifts = IMAGE_SHIFTS if benign_shifts else ()
    cal = calibrate_from_defense(defense, x, alpha=alpha, horizon=horizon, seed=seed, shifts=shifts, variants=3)
    if not (dadd or step):
        cal.save(out)
        return Calibrated(cal, out, len(x))
    out = Path(out)
    members = {"exit-sprt": f"{out.stem}.exit-sprt.json"}
    cal.save(out.parent / members["exit-sprt"])
    dadd_h = step_h = None
    if dadd:
        from fortress.monitor.calibrate import dadd_from_defense

        dcal = dadd_from_defense(
            defense,
            resolved.train.x,
            resolved.val.x,
            alpha=alpha,
            horizon=dadd_horizon,
            streams=dadd_streams,
            seed=seed,
        )
        members["dadd"] = f"{out.stem}.dadd.json"
        dcal.save(out.parent / members["dadd"])
        dadd_h = dcal.threshold
    if step:
        from fortress.monitor.step import calibrate_step

        scal = calibrate_step(lambda q: defense.respond(q).probs, resolved.val.x, alpha=alpha, seed=seed)
        members["step"] = f"{out.stem}.step.json"
        scal.save(out.parent / members["step"])
        step_h = scal.threshold
    out.write_text(json.dumps({"monitor": "bundle", "members": members}, indent=2))
    return Calibrated(cal, out, len(x), dadd_h, step_h)


def _emit(event: EventFn | None, stage: str, completed: float, total: float) -> None:
    if event is not None:
        event(stage, completed, total)
