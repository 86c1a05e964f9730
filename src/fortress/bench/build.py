"""The build step of a grid: victim + defense name + TOML parameters → a ready :class:`Defense`.

Most defenses are built by their constructor, ``DEFENSES.get(name)(victim, **params)``. A ``fit``
table in ``params`` also trains a defense that trains (a
:class:`~fortress.defenses.trainable.TrainableDefense`): the table is read into the defense's
``fit_config`` dataclass and the defense is fitted on the defender's data,
``defense.fit(DefenderData, config, checkpoint_dir=OUT/checkpoints)``. For example, MeCo's generator,
the misinformation network of adaptive misinformation and GRAD²'s distilled surrogate::

    [[defenses]]
    name = "adaptive-misinformation"
    params = { tau = 0.5, fit = { epochs = 5 } }

A ``match_utility`` table sets a perturbation defense's strength (ε of RandP, MAD, GRAD²; β of
reverse sigmoid) to the strongest value that keeps a stated utility on the defender's ID validation
data (:func:`fortress.defenses.utility_match.match_utility`; the table is a
:class:`~fortress.defenses.utility_match.UtilityTarget`); the value found and what it keeps are
written to ``OUT/utility_match.json`` and recorded with every result::

    [[defenses]]
    name = "randp"
    label = "randp-matched"
    params = { match_utility = { max_drop = 0.5 } }    # at most 0.5 points of ID accuracy lost

A defense whose build needs more registers a :class:`DefenseBuilder` in :data:`BUILDERS` under its
registry name. DNF's builder runs the protection recipe (:func:`fortress.defenses.dnf.recipe.protect`,
through :func:`fortress.bench.pipeline.protect`) with ``params`` read as a
:class:`~fortress.config.ProtectConfig`.

Builds are seeded, so a built defense that is saved and loaded again equals a fresh build; the grid
runner caches each one under ``DIR/artifacts/<key>/``. A grid's ``train_seeds`` builds a defense once
per training seed: :func:`seeded_params` writes the seed into every seed the build draws from (DNF:
the heads' training and the OOD source — proxy crops and DCGAN — and the threshold search; other
defenses: their constructor's ``seed`` and their ``fit`` table's ``seed``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fortress.config import ProtectConfig, from_dict
from fortress.data.spec import DataSpec
from fortress.defenses import DEFENSES, Defense, TrainableDefense, Undefended
from fortress.defenses.utility_match import STRENGTH, UtilityTarget, match_utility
from fortress.device import device_of
from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone
from fortress.registry import Registry

__all__ = [
    "BUILDERS",
    "MATCH_FILE",
    "BuildContext",
    "DefenseBuilder",
    "build_defense",
    "check_defense_params",
    "read_utility_match",
    "seeded_params",
    "training_seed",
]

#: Written next to a defense built with ``match_utility``: the strength found and what it keeps.
MATCH_FILE = "utility_match.json"
#: The ``params`` entries the build step reads itself (never passed to the constructor).
_BUILD_KEYS = ("fit", "match_utility")


@dataclass(frozen=True)
class BuildContext:
    """What a builder may use besides the victim.

    Attributes:
        data: the defender's own data (``None``: the spec the victim remembers, else the embedded digits).
        out: directory to save into and to keep checkpoints in (``None``: nothing is written).
    """

    data: DataSpec | None = None
    out: Path | None = None


@dataclass(frozen=True)
class DefenseBuilder:
    """How the grid builds one defense.

    Attributes:
        build: ``build(victim, params, ctx) -> Defense``; trains what needs training, seeded.
        check: ``check(params)`` raises :class:`~fortress.errors.ConfigError` on bad parameters
            (called when a grid is loaded, before anything runs).
        seed_paths: the nested ``params`` keys that a training seed sets, with each one's value
            when ``params`` leave it out (``None``: the build has no training seed).
    """

    build: Callable[[StagedBackbone, dict[str, Any], BuildContext], Defense]
    check: Callable[[dict[str, Any]], None]
    seed_paths: Callable[[dict[str, Any]], dict[tuple[str, ...], Any]] | None = None


#: Builders for defenses that need more than their constructor (looked up by registry name).
BUILDERS: Registry[DefenseBuilder] = Registry("defense builder")


def _protect_config(params: dict[str, Any]) -> ProtectConfig:
    return from_dict(ProtectConfig, params, where="defense 'dnf' params")


def _build_dnf(victim: StagedBackbone, params: dict[str, Any], ctx: BuildContext) -> Defense:
    from fortress.bench.pipeline import protect

    return protect(victim, _protect_config(params), data=ctx.data, out=ctx.out, resume=True)


def _check_dnf(params: dict[str, Any]) -> None:
    _protect_config(params)


def _dnf_seed_paths(params: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Every seed of the recipe: the heads' training (init, batches, OOD draws), the OOD source, the search."""
    cfg = _protect_config(params)
    paths: dict[tuple[str, ...], Any] = {("train", "seed"): cfg.train.seed, ("ood", "seed"): cfg.ood.seed}
    if cfg.search is not None:
        paths[("search", "seed")] = cfg.search.seed
    return paths


def _check_none(params: dict[str, Any]) -> None:
    if params:
        raise ConfigError(f"defense 'undefended' takes no params, got {sorted(params)}")


BUILDERS.add("dnf", DefenseBuilder(_build_dnf, _check_dnf, _dnf_seed_paths))
BUILDERS.add("undefended", DefenseBuilder(lambda victim, _p, _c: Undefended(victim), _check_none))


def _split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    ctor = {k: v for k, v in params.items() if k not in _BUILD_KEYS}
    fit = params.get("fit")
    if fit is not None and not isinstance(fit, dict):
        raise ConfigError(f"defense 'fit' params must be a table, got {fit!r}")
    return ctor, fit


def _utility_target(name: str, params: dict[str, Any]) -> UtilityTarget | None:
    """The ``match_utility`` table of ``params`` read into a :class:`UtilityTarget` (``None`` without one)."""
    table = params.get("match_utility")
    if table is None:
        return None
    if name not in STRENGTH:
        raise ConfigError(
            f"defense {name!r} has no strength to match to a utility; match_utility works for: "
            f"{', '.join(sorted(STRENGTH))}"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"defense {name!r} match_utility must be a table (e.g. {{ max_drop = 0.5 }}), got {table!r}")
    target = from_dict(UtilityTarget, table, where=f"defense {name!r} match_utility")
    if STRENGTH[name].parameter in params:
        raise ConfigError(
            f"defense {name!r} params set {STRENGTH[name].parameter!r} and match_utility; the match sets it, give one"
        )
    return target


def _fit_config(cls: type[Defense], fit: dict[str, Any], name: str) -> Any:
    """The ``fit`` table read into the defense's ``fit_config`` dataclass; unknown options are errors."""
    if not issubclass(cls, TrainableDefense):
        raise ConfigError(f"defense {name!r} has no fit step, but its params hold a 'fit' table")
    options = [f.name for f in dataclasses.fields(cls.fit_config)]
    bad = sorted(set(fit) - set(options))
    if bad:
        raise ConfigError(f"defense {name!r} fit options {bad} are unknown; valid: {options}")
    return from_dict(cls.fit_config, fit, where=f"defense {name!r} fit")


def _constructor_check(name: str, params: dict[str, Any]) -> None:
    cls = DEFENSES.get(name)
    ctor, fit = _split(params)
    try:
        inspect.signature(cls).bind(None, **ctor)
    except TypeError as exc:
        raise ConfigError(
            f"defense {name!r} params {sorted(ctor)} do not fit its constructor "
            f"{cls.__name__}{inspect.signature(cls)}: {exc}"
        ) from None
    if fit is not None:
        _fit_config(cls, fit, name)
    _utility_target(name, params)


def check_defense_params(name: str, params: dict[str, Any]) -> None:
    """Check that ``name`` is a registered defense and ``params`` fit its build step.

    Raises:
        UnknownComponent: ``name`` is not a registered defense.
        ConfigError: the parameters are invalid.
    """
    DEFENSES.get(name)
    if name in BUILDERS:
        BUILDERS.get(name).check(params)
    else:
        _constructor_check(name, params)


def _constructor_seed_paths(name: str, params: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    cls = DEFENSES.get(name)
    paths: dict[tuple[str, ...], Any] = {}
    default = inspect.signature(cls).parameters.get("seed")
    if default is not None:
        paths[("seed",)] = params.get("seed", default.default)
    _, fit = _split(params)
    if fit is not None and issubclass(cls, TrainableDefense):
        fit_seed = {f.name: f for f in dataclasses.fields(cls.fit_config)}.get("seed")
        if fit_seed is not None:
            paths[("fit", "seed")] = fit.get("seed", fit_seed.default)
    return paths


def _seed_paths(name: str, params: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    builder = BUILDERS.get(name) if name in BUILDERS else None
    if builder is not None:
        return builder.seed_paths(params) if builder.seed_paths is not None else {}
    return _constructor_seed_paths(name, params)


def training_seed(name: str, params: dict[str, Any]) -> int | None:
    """The training seed defense ``name`` is built with from ``params`` (``None``: it draws none, or they differ).

    Example:
        >>> training_seed("dnf", {"train": {"seed": 2}, "ood": {"seed": 2}}), training_seed("dnf", {})
        (2, 0)
    """
    values = set(_seed_paths(name, params).values())
    return values.pop() if len(values) == 1 else None


def seeded_params(name: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``params`` with every training seed of defense ``name``'s build set to ``seed``.

    Only the seeds that differ from ``seed`` are written, so the seed the parameters already hold
    gives back equal parameters (and the same cache and cell keys as a grid without ``train_seeds``).

    Raises:
        ConfigError: the defense's build draws no seed (nothing to vary), or bad ``params``.

    Example:
        >>> seeded_params("dnf", {"train": {"epochs": 4}}, 3)
        {'train': {'epochs': 4, 'seed': 3}, 'ood': {'seed': 3}}
        >>> seeded_params("dnf", {}, 0)
        {}
    """
    check_defense_params(name, params)
    paths = _seed_paths(name, params)
    if not paths:
        raise ConfigError(f"defense {name!r} draws no training seed; train_seeds applies to defenses that train")
    out = copy.deepcopy(params)
    for path, current in paths.items():
        if current == seed:
            continue
        table = out
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = seed
    return out


def build_defense(name: str, victim: StagedBackbone, params: dict[str, Any], ctx: BuildContext) -> Defense:
    """Build defense ``name`` on ``victim`` with ``params`` (training it where it trains).

    Example:
        >>> from fortress.models import create_model
        >>> build_defense("undefended", create_model("lenet5"), {}, BuildContext()).name
        'undefended'
    """
    check_defense_params(name, params)
    if name in BUILDERS:
        return BUILDERS.get(name).build(victim, params, ctx)
    ctor, fit = _split(params)
    try:
        defense = DEFENSES.get(name)(victim, **ctor)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build defense {name!r} with params {ctor}: {exc}") from exc
    defense.to(device_of(victim))  # its own networks (surrogate, generator, ...) join the victim
    if fit is not None:
        from fortress.bench.pipeline import data_for, defender_data

        assert isinstance(defense, TrainableDefense)  # checked with the params above
        defense.fit(
            defender_data(data_for(victim, ctx.data)),
            _fit_config(type(defense), fit, name),
            checkpoint_dir=None if ctx.out is None else Path(ctx.out) / "checkpoints",  # an interrupted build resumes
        )
    target = _utility_target(name, params)
    if target is not None:
        from fortress.bench.pipeline import data_for
        from fortress.models.io import atomic_write_text

        val = data_for(victim, ctx.data).val
        matched = match_utility(defense, val.x, val.targets, target)
        if ctx.out is not None:
            atomic_write_text(Path(ctx.out) / MATCH_FILE, json.dumps(matched.as_dict(), indent=2))
    return defense


def read_utility_match(directory: Path) -> dict[str, Any] | None:
    """The ``utility_match.json`` of a built defense (``None`` when it was not matched)."""
    from fortress.models.io import read_json

    path = Path(directory) / MATCH_FILE
    return read_json(path) if path.is_file() else None
