"""Run configuration: frozen dataclasses, TOML load/dump and validation with clear messages.

Every run (victim training, protection, attack, demo) is described by one of these dataclasses; the
full config is written next to every result record so a number can always be traced to its run.
The protection settings (:class:`ProtectConfig`, :class:`OODConfig`) live next to their recipe in
:mod:`fortress.defenses.dnf.recipe` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import tomli_w
import tomllib

from fortress.defenses.dnf.losses import DNFLossWeights
from fortress.defenses.dnf.recipe import OODConfig, ProtectConfig
from fortress.errors import ArtifactError, ConfigError

__all__ = [
    "AttackConfig",
    "DemoConfig",
    "OODConfig",
    "ProtectConfig",
    "VictimConfig",
    "dump_toml",
    "from_dict",
    "load_toml",
    "to_dict",
]

T = TypeVar("T")


@dataclass(frozen=True)
class VictimConfig:
    """How to train a victim (paper App. G: LeNet-5, 20 epochs, Adam, lr 1e-3).

    Attributes:
        arch: model registry name.
        dataset: ``"mnist"`` (the embedded digits; other sets come through the Python API).
        epochs: training epochs.
        lr: Adam learning rate.
        batch_size: mini-batch size.
        max_shift: random-translation augmentation in pixels.
        seed: seeds initialisation and batches.
    """

    arch: str = "lenet5"
    dataset: str = "mnist"
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    max_shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.max_shift < 0:
            raise ConfigError(f"invalid victim training settings: {self}")


@dataclass(frozen=True)
class AttackConfig:
    """One attack run.

    Attributes:
        name: attack registry name.
        budget: query budget.
        seed: attack seed.
        clone: clone architecture (model registry name).
        output_mode: what the oracle returns (``soft``, ``hard``, ``topk``).
        pool: attacker pool data set for attacks that need one (``None``: attack default).
        params: extra attack hyper-parameters (constructor keyword arguments).
    """

    name: str = "dfme"
    budget: int = 200_000
    seed: int = 0
    clone: str = "lenet5"
    output_mode: Literal["soft", "hard", "topk"] = "soft"
    pool: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ConfigError(f"attack budget must be >= 1, got {self.budget}")


@dataclass(frozen=True)
class DemoConfig:
    """The end-to-end demo: victim, DNF, and attacks against both at the same budgets."""

    victim: VictimConfig = field(default_factory=VictimConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    attacks: tuple[AttackConfig, ...] = ()
    seeds: tuple[int, ...] = (0,)


# -- dict / TOML conversion -----------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON/TOML-ready data (``None`` values are dropped for TOML)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        targs = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = targs[0] if targs else Any
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys with the valid ones listed."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid {where}: {exc}") from exc


def _strip_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list | tuple):
        return [_strip_none(v) for v in d]
    return d


def dump_toml(obj: Any, path: Path) -> None:
    """Write a config dataclass as TOML (``None`` fields are omitted: they mean "default")."""
    Path(path).write_text(tomli_w.dumps(_strip_none(to_dict(obj))), encoding="utf-8")


def load_toml(cls: type[T], path: Path) -> T:
    """Read a TOML file into config dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    return from_dict(cls, data, where=path.name)


# DNFLossWeights is re-exported for config files that spell out the loss weights.
_ = DNFLossWeights
