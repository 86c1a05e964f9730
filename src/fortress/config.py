"""Run configuration: frozen dataclasses, TOML load/dump and validation with clear messages.

Every run (victim training, protection, attack, demo) is described by one of these dataclasses; the
full config is written next to every result record so a number can always be traced to its run.
The protection settings (:class:`ProtectConfig`, :class:`OODConfig`) live next to their recipe in
:mod:`fortress.defenses.dnf.recipe` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import tomli_w

from fortress.data.spec import DataSpec
from fortress.defenses.dnf.losses import DNFLossWeights
from fortress.defenses.dnf.recipe import OODConfig, ProtectConfig
from fortress.device import check_device
from fortress.errors import ArtifactError, ConfigError
from fortress.models.recipes import TrainRecipe, recipe_for
from fortress.models.user import Staging

__all__ = [
    "AttackConfig",
    "DataSpec",
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
        arch: model registry name, entry point of the ``fortress.models`` group or a factory path
            ``package.module:function`` (:func:`fortress.models.build_model`).
        arch_params: keyword arguments of a user's factory (JSON values).
        staging: module names that stage a factory's plain network (``None``: it returns a staged one).
        data: the data spec it trains on (``None``: the grid's ``[data]``, else the embedded MNIST
            digits). TOML: a table ``{ name = "fashion-mnist", path = "...", options = {...} }`` or
            ``"NAME[:PATH]"``; the older ``dataset = "NAME"`` is read as ``data``.
        epochs: training epochs.
        lr: learning rate (Adam's, SGD's, or OneCycle's peak).
        batch_size: mini-batch size.
        max_shift: random-translation augmentation in pixels.
        seed: seeds initialisation and batches.
        arch_params: keyword arguments of a user's factory (JSON values).
        staging: module names that stage a factory's plain network (``None``: it returns a staged one).
        weight_decay: L2 weight decay.
        optimizer: ``adam`` or ``sgd`` (Nesterov momentum ``momentum``).
        momentum: SGD's momentum.
        schedule: learning-rate schedule (``cosine``, ``onecycle``, ``step``, ``constant``).
        milestones: epochs after which the ``step`` schedule divides the rate by 10 (``None``: its
            default spacing).
        hflip: random horizontal flips (refused on digits data sets when training starts, as
            a grid's ``[data]`` table may name the data after the victim is read).
        label_smoothing: label smoothing of the training loss.

    The fields from ``weight_decay`` on are the options of :class:`~fortress.models.recipes.TrainRecipe`;
    at their defaults (the paper's App. G training of LeNet-5) they keep older configs' meaning and
    cell keys. :meth:`recommended` fills them from :func:`fortress.models.recipes.recipe_for`, e.g.
    ResNet-34-8x on CIFAR (App. G): ``optimizer = "sgd"``, ``lr = 0.1``, ``epochs = 200``,
    ``schedule = "step"``, ``milestones = [80, 120]``, ``weight_decay = 5e-4``, ``hflip = true``.
    """

    #: Keys of older config files read under their new name.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"dataset": "data"}

    arch: str = "lenet5"
    data: DataSpec | None = None
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    max_shift: int = 2
    seed: int = 0
    arch_params: dict[str, Any] = field(default_factory=dict)
    staging: Staging | None = None
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "cosine"
    milestones: tuple[int, ...] | None = None
    hflip: bool = False
    label_smoothing: float = 0.0

    #: Fields added after grids were first keyed: left out of cell keys while at these values.
    KEYLESS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "arch_params": {},
        "staging": None,
        "weight_decay": 0.0,
        "optimizer": "adam",
        "momentum": 0.9,
        "schedule": "cosine",
        "milestones": None,
        "hflip": False,
        "label_smoothing": 0.0,
    }
    #: The training options :meth:`recommended` takes from the recipe.
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "epochs",
        "lr",
        "batch_size",
        "max_shift",
        "weight_decay",
        "optimizer",
        "momentum",
        "schedule",
        "milestones",
        "hflip",
        "label_smoothing",
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.max_shift < 0:
            raise ConfigError(f"invalid victim training settings: {self}")
        if isinstance(self.data, str):
            object.__setattr__(self, "data", DataSpec.parse(self.data))
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        self.train_recipe()  # checks the values

    def train_recipe(self) -> TrainRecipe:
        """The whole :class:`~fortress.models.recipes.TrainRecipe` this config trains with.

        Raises:
            ConfigError: a value out of range (e.g. milestones without the ``step`` schedule).
        """
        return TrainRecipe(**{name: getattr(self, name) for name in self.RECIPE_FIELDS})

    @classmethod
    def recommended(cls, arch: str, data: DataSpec | None = None, *, seed: int = 0, **overrides: Any) -> VictimConfig:
        """The victim config of ``arch`` on ``data`` with the recipe that fits them (:func:`recipe_for`).

        Args:
            arch: model registry name.
            data: data spec (``None``: the embedded MNIST digits).
            seed: training seed.
            **overrides: fields to set instead of the recipe's (``None`` values are ignored).

        Raises:
            ConfigError: an override is not a field, or the result is not a valid config.

        Example:
            >>> VictimConfig.recommended("lenet5") == VictimConfig()
            True
        """
        recipe = recipe_for(arch, (data or DataSpec()).name)
        fields: dict[str, Any] = {name: getattr(recipe, name) for name in cls.RECIPE_FIELDS}
        unknown = sorted(set(overrides) - set(fields) - {"arch_params", "staging"})
        if unknown:
            raise ConfigError(f"unknown victim training option(s) {unknown}; valid: {sorted(fields)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        n_epochs = given.get("epochs", recipe.epochs)
        if recipe.milestones and n_epochs != recipe.epochs and "milestones" not in given:
            # a shorter (or longer) run keeps the schedule's drops at the same fraction of training
            scaled = sorted({round(m * n_epochs / recipe.epochs) for m in recipe.milestones} - {0})
            fields["milestones"] = tuple(m for m in scaled if m < n_epochs) or None
            if fields["milestones"] is None:
                fields["schedule"] = "constant"
        fields.update(given)
        return cls(arch=arch, data=data, seed=seed, **fields)

    @property
    def spec(self) -> DataSpec:
        """The data spec it trains on (the embedded digits when none is set)."""
        return self.data or DataSpec()

    @property
    def dataset(self) -> str:
        """The data set's registry name (what records and tables call it)."""
        return self.spec.name


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
    """The end-to-end demo: victim, DNF, and attacks against both at the same budgets.

    ``device`` is where everything computes (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``);
    ``amp`` turns on bf16 autocast for the victim's training on a GPU.
    """

    victim: VictimConfig = field(default_factory=VictimConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    attacks: tuple[AttackConfig, ...] = ()
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    amp: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)


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
        parse = getattr(tp, "parse", None)
        if isinstance(value, str) and callable(parse):  # written as text, e.g. a data spec "NAME[:PATH]"
            return parse(value)
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
    renamed: dict[str, str] = getattr(cls, "RENAMED_KEYS", {})
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ConfigError(f"{where} gives both {old!r} and {new!r}; {old!r} is the older name of {new!r}")
            data = {(new if k == old else k): v for k, v in data.items()}
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


# -- overrides from the command line -------------------------------------------------------------


def parse_params(pairs: Sequence[str], *, what: str = "--param") -> dict[str, Any]:
    """Read ``KEY=VALUE`` pairs into keyword arguments (the CLI's ``--param`` options).

    A value is read as JSON where it parses (``3``, ``0.5``, ``true``, ``[1, 2]``, ``{"a": 1}``) and
    kept as text otherwise. A dotted key sets one entry of a nested table: ``train.epochs=1`` gives
    ``{"train": {"epochs": 1}}``, and ``train.lr=0.1`` after it adds to the same table.

    Args:
        pairs: the ``KEY=VALUE`` texts, in order (a later pair overrides an earlier one).
        what: the option's name, for the error message.

    Raises:
        ConfigError: a pair without ``=`` or key, or a dotted key below a key that holds a value.

    Example:
        >>> parse_params(["epochs=2", "pool=patches", "train.lr=0.1"])
        {'epochs': 2, 'pool': 'patches', 'train': {'lr': 0.1}}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        path = key.split(".")
        if not sep or not all(path):
            raise ConfigError(f"{what} takes KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        table = out
        for i, part in enumerate(path[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{what} {pair!r}: {'.'.join(path[: i + 1])!r} already holds a value, not a table")
        table[path[-1]] = value
    return out


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """Read comma-separated numbers (``"0.9,0.95"``); ``None`` stays ``None``, empty items are skipped.

    Raises:
        ConfigError: an item is not a number (the message names ``what`` and the text).

    Example:
        >>> parse_floats("0.9, 0.95,", "--thresholds")
        (0.9, 0.95)
    """
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def defense_params(pairs: Sequence[str], fit_pairs: Sequence[str] = (), *, fit: bool = False) -> dict[str, Any]:
    """A defense's build parameters from ``--param`` pairs, with a ``fit`` table when it should train.

    ``fit_pairs`` (``--fit-param``) imply training; ``fit=True`` trains with the defaults. The result is
    what :func:`fortress.bench.build.build_defense` and a grid's ``params`` take.

    Example:
        >>> defense_params(["tau=0.5"], ["epochs=1"])
        {'tau': 0.5, 'fit': {'epochs': 1}}
    """
    params = parse_params(pairs)
    if fit or fit_pairs:
        params["fit"] = parse_params(fit_pairs, what="--fit-param")
    return params


def _merged(base: Any, overrides: Any) -> Any:
    """``overrides`` laid over ``base``: tables merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(overrides, dict):
        out = dict(base)
        for key, value in overrides.items():
            out[key] = _merged(base.get(key), value)
        return out
    return overrides


def merge_overrides(cfg: T, overrides: dict[str, Any], *, where: str = "options") -> T:
    """Config dataclass ``cfg`` with nested ``overrides`` applied, checked as a TOML file would be.

    A nested table merges into the field's own (``{"train": {"epochs": 1}}`` keeps the other training
    settings); a table given for a field that is ``None`` starts from that config's defaults.

    Raises:
        ConfigError: an unknown key or a value of the wrong type (the message names it and ``where``).

    Example:
        >>> merge_overrides(ProtectConfig(), {"train": {"epochs": 1}}).train.epochs
        1
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"{cfg!r} is not a dataclass instance")
    return from_dict(type(cfg), _merged(to_dict(cfg), overrides), where=where)


def protect_overrides(
    cfg: ProtectConfig,
    *,
    head: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    ood: str | None = None,
    thresholds: tuple[float, ...] | None = None,
    search: bool = False,
    search_trials: int | None = None,
    max_utility_drop: float | None = None,
    objective: str | None = None,
) -> ProtectConfig:
    """A :class:`ProtectConfig` with the ``fortress protect`` options laid over it (``None``: keep).

    Args:
        cfg: the base config (defaults or a TOML file).
        head: exit head kind (``vib`` or ``plain``).
        epochs: DNF training epochs.
        seed: seeds both DNF training and the OOD source.
        ood: OOD source kind.
        thresholds: per-head exit thresholds.
        search: search thresholds with SMAC3 after training (the config's search settings or the defaults).
        search_trials: threshold-search trials (implies ``search``).
        max_utility_drop: the utility budget in points of ID validation accuracy.
        objective: run the three-way threshold search and apply its ``protection``, ``efficiency``
            or ``pareto`` point (implies ``search``).

    Raises:
        ConfigError: a value the config does not accept.

    Example:
        >>> protect_overrides(ProtectConfig(), epochs=1, seed=3).ood.seed
        3
    """
    overrides: dict[str, Any] = {}
    if head is not None:
        overrides["head_kind"] = head
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    if seed is not None:
        overrides = _merged(overrides, {"train": {"seed": seed}, "ood": {"seed": seed}})
    if ood is not None:
        overrides = _merged(overrides, {"ood": {"kind": ood}})
    if thresholds is not None:
        overrides["thresholds"] = list(thresholds)
    if search or search_trials is not None or objective is not None:
        overrides["search"] = {} if search_trials is None else {"n_trials": search_trials}
        if objective is not None:
            overrides["search"]["goal"] = objective
    if max_utility_drop is not None:
        overrides["max_utility_drop"] = max_utility_drop
    return merge_overrides(cfg, overrides)
