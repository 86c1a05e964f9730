"""Benchmark grids: a TOML file of victims × defenses × attacks × budgets × seeds, expanded into cells.

A grid answers the user's question "what does this defense cost me and what does it buy me, against
which attack, at which budget?" (paper Tables 1, 2, 4, 11, 12 in miniature). Each :class:`Cell` is one
attack run against one defense; its :attr:`Cell.key` is a stable hash of its canonical config, written
into its result record, so a re-run with ``resume`` skips exactly the cells already finished.

Example grid (``benchmarks/mnist-quick.toml`` is a complete one)::

    name = "example"
    seeds = [0, 1]
    output_modes = ["soft"]

    [data]                            # optional: the default is the embedded MNIST digits
    name = "fashion-mnist"            # a data spec: registry name, optional path and options
    options = { train_size = 20000 }

    [[victims]]
    arch = "lenet5"
    epochs = 10

    [[defenses]]
    name = "undefended"

    [[defenses]]
    name = "dnf"
    params = { train = { epochs = 4 } }

    [[attacks]]
    name = "dfme"
    budgets = [100000, 200000]
    params = { batch_size = 256 }

The ``[data]`` table is the data of every victim that names none (a victim may carry its own
``data``). An attack runs against every victim and defense unless it names some: ``defenses = ["undefended",
"dnf"]`` (defense labels) and ``victims = ["lenet5"]`` (victim architectures). These filters do not
enter the cell keys, so adding one to a grid keeps the cells it already finished.

Victims and defenses are built once per (victim, defense, params) and cached; ``seeds`` seed the
attacks (the defended model is the same across seeds, as in the paper's mean ± std over attack runs).
A defense that trains can also be built several times with different training seeds, so that its
figures cover the luck of its own training (DNF: head initialisation, OOD draws, DCGAN)::

    [[defenses]]
    name = "dnf"
    train_seeds = [0, 1, 2, 3, 4]   # five DNF builds, every attack run against each

An attack table may name the query strategy and attacker variant it stands for (``strategy =
"knockoff-random"``, ``variant = "top-1"``): labels for records and the report's worst-variant
table, not part of the cell keys. An attack that simulates the defense (D-DAE) gets the cell's
defense algorithm from the runner and may run only against defenses it can simulate.

Each training seed is its own build and its own cells; the seed the parameters already hold (0 by
default) keeps the cell keys of the grid without ``train_seeds``, so adding the axis to a finished
grid keeps its cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fortress.config import AttackConfig, VictimConfig, from_dict, load_toml, to_dict
from fortress.data.spec import DataSpec
from fortress.device import check_device
from fortress.errors import ConfigError

__all__ = [
    "AttackSpec",
    "Cell",
    "DefenseSpec",
    "GridConfig",
    "config_hash",
    "defense_artifact_key",
    "expand_grid",
    "load_grid",
    "victim_artifact_key",
    "victim_key_view",
]

OutputMode = Literal["soft", "hard", "topk"]

#: Bump when the meaning of a cell's fields changes, so old records are not mistaken for new cells.
CELL_FORMAT = 1


def config_hash(data: Any, *, length: int = 16) -> str:
    """A stable hex digest of plain data (canonical JSON: sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@dataclass(frozen=True)
class DefenseSpec:
    """One defense of a grid: a registry name plus the parameters of its build step.

    Attributes:
        name: defense registry name (``fortress list defenses``).
        label: name shown in tables and records (default: ``name``); two variants of one defense
            (say DNF with VIB and with plain heads) need distinct labels.
        params: build parameters; for ``dnf`` a :class:`~fortress.config.ProtectConfig` table, for
            other defenses the constructor's keyword arguments (see :mod:`fortress.bench.build`).
        train_seeds: training seeds of the defense's build, one build (and one set of cells) each
            (:func:`fortress.bench.build.seeded_params` says what a seed sets); ``None``: one build
            with the seeds ``params`` hold.
        monitor: DNF only: serve it through per-key monitoring, a response and (with many keys) the
            detector across keys, attacked with one key or many — the closed loop as a defense row;
            a :class:`~fortress.monitor.closed_loop.LoopConfig` table. The DNF build is the one a
            plain ``dnf`` row with equal ``params`` uses (one artifact); ``None``: no monitoring.
    """

    name: str
    label: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    train_seeds: tuple[int, ...] | None = None
    monitor: dict[str, Any] | None = None

    def loop(self) -> Any:
        """The ``monitor`` table read into a :class:`~fortress.monitor.closed_loop.LoopConfig` (``None``: none).

        Raises:
            ConfigError: the table is invalid, or the defense is not DNF.
        """
        if self.monitor is None:
            return None
        from fortress.monitor.closed_loop import LoopConfig

        if self.name != "dnf":
            raise ConfigError(f"defense {self.display!r}: a 'monitor' table needs a dnf defense, got {self.name!r}")
        return from_dict(LoopConfig, self.monitor, where=f"defense {self.display!r} monitor")

    @property
    def display(self) -> str:
        """The label used in records, tables and plots."""
        return self.label or self.name

    def canonical(self) -> dict[str, Any]:
        """What defines the build and its label (``train_seeds`` is expanded into ``params`` per cell)."""
        out = {"name": self.name, "label": self.label, "params": defense_key_params(self.name, self.params)}
        if self.monitor is not None:  # absent otherwise: rows without monitoring keep their keys
            out["monitor"] = to_dict(self.loop())
        return out

    def for_seed(self, seed: int | None) -> DefenseSpec:
        """This defense built with training seed ``seed`` (``None``: as its ``params`` say), one build."""
        if seed is None:
            return DefenseSpec(self.name, self.label, self.params, monitor=self.monitor)
        from fortress.bench.build import seeded_params

        return DefenseSpec(self.name, self.label, seeded_params(self.name, self.params, seed), monitor=self.monitor)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a grid, run at every budget in ``budgets``.

    Attributes:
        name: attack registry name (``fortress list attacks``).
        budgets: query budgets (each one is a separate cell).
        clone: clone architecture (``None``: the victim's own architecture).
        pool: attacker pool data set for attacks that need one (``None``: the attack's default).
        output_modes: oracle output modes for this attack (``None``: the grid's ``output_modes``).
        defenses: labels of the defenses this attack runs against (``None``: all of the grid's).
        victims: architectures of the victims this attack runs against (``None``: all of the grid's).
        params: extra attack hyper-parameters (constructor keyword arguments).
        strategy: the query strategy this attack stands for in tables (e.g. ``"knockoff-random"``,
            ``"jbda-tr"``; ``None``: the attack's name).
        variant: the attacker variant (e.g. ``"naive"``, ``"top-1"``, ``"D-DAE"``): how the attacker
            treats the answers. With a ``strategy`` or ``variant``, records name the attack
            ``strategy/variant`` and the report adds each defense's worst variant per strategy
            (ModelGuard's side-by-side table). Neither enters the cell keys.
    """

    name: str
    budgets: tuple[int, ...] = (10_000,)
    clone: str | None = None
    pool: str | None = None
    output_modes: tuple[OutputMode, ...] | None = None
    defenses: tuple[str, ...] | None = None
    victims: tuple[str, ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    strategy: str | None = None
    variant: str | None = None

    def runs_against(self, defense: DefenseSpec) -> bool:
        """Whether this attack runs against ``defense``."""
        return self.defenses is None or defense.display in self.defenses

    def runs_on(self, victim: VictimConfig) -> bool:
        """Whether this attack runs on ``victim``."""
        return self.victims is None or victim.arch in self.victims


@dataclass(frozen=True)
class GridConfig:
    """A benchmark grid (DESIGN §6): every victim × defense × attack × budget × output mode × seed.

    Attributes:
        name: grid name (recorded with every result).
        victims: victims to train (each carries its data set and architecture).
        defenses: defenses built on every victim.
        attacks: attacks run against every defense.
        seeds: attack seeds; tables report mean ± std over them.
        output_modes: oracle output modes (``soft``: probabilities, ``hard``: labels).
        eval_every: also evaluate the clone every this many queries (clone accuracy curves); ``None``: at the end only.
        data: the data of every victim that names none (the ``[data]`` table; ``None``: the embedded digits).
        device: where the grid computes unless the command line says otherwise (``auto``, ``cpu``,
            ``cuda``, ``cuda:N``, ``mps``; ``None``: the CPU). Not part of any cell key.
    """

    name: str = "grid"
    victims: tuple[VictimConfig, ...] = (VictimConfig(),)
    defenses: tuple[DefenseSpec, ...] = ()
    attacks: tuple[AttackSpec, ...] = ()
    seeds: tuple[int, ...] = (0,)
    output_modes: tuple[OutputMode, ...] = ("soft",)
    eval_every: int | None = None
    data: DataSpec | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            check_device(self.device)
        for what, items in (
            ("victims", self.victims),
            ("defenses", self.defenses),
            ("attacks", self.attacks),
            ("seeds", self.seeds),
            ("output_modes", self.output_modes),
        ):
            if not items:
                raise ConfigError(f"grid {self.name!r}: {what} must list at least one entry")
        labels = [d.display for d in self.defenses]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"grid {self.name!r}: defense labels {dup} repeat; give each variant its own 'label'")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"grid {self.name!r}: seeds {list(self.seeds)} repeat")
        for d in self.defenses:
            ts = d.train_seeds
            if ts is not None and (not ts or len(set(ts)) != len(ts) or any(s < 0 for s in ts)):
                raise ConfigError(
                    f"defense {d.display!r}: train_seeds must list distinct non-negative seeds, got {list(ts)}"
                )
        for a in self.attacks:
            if not a.budgets or any(b < 1 for b in a.budgets):
                raise ConfigError(f"attack {a.name!r}: budgets must be positive integers, got {list(a.budgets)}")
            unknown = sorted(set(a.defenses or ()) - set(labels))
            if unknown or a.defenses == ():
                raise ConfigError(f"attack {a.name!r}: defenses {unknown or []} are not in the grid; valid: {labels}")
            archs = [v.arch for v in self.victims]
            unknown_v = sorted(set(a.victims or ()) - set(archs))
            if unknown_v or a.victims == ():
                raise ConfigError(f"attack {a.name!r}: victims {unknown_v or []} are not in the grid; valid: {archs}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1 or absent, got {self.eval_every}")

    def validate(self) -> None:
        """Check every registry name and build parameter now, before hours of running.

        Raises:
            UnknownComponent: a defense, attack, model, data set or pool name is not registered.
            ConfigError: a defense's build parameters or a data spec's options are invalid.
            ArtifactError: a data set's files are missing.
        """
        from fortress.attacks import ATTACKS
        from fortress.bench.build import check_defense_params
        from fortress.data.defaults import attacker_split_pool
        from fortress.data.registry import DATASETS
        from fortress.data.resolve import check_spec
        from fortress.models import MODELS

        specs = {self.victim_data(v).canonical(): self.victim_data(v) for v in self.victims}
        for spec in specs.values():
            check_spec(spec)
        own_splits = {attacker_split_pool(s.name) for s in specs.values()}
        for v in self.victims:
            MODELS.get(v.arch)
        for d in self.defenses:
            check_defense_params(d.name, d.params)
            d.loop()
            for seed in d.train_seeds or ():
                d.for_seed(seed)  # raises for a defense without a training seed
        for a in self.attacks:
            ATTACKS.get(a.name)
            if a.clone is not None:
                MODELS.get(a.clone)
            if a.pool is not None and a.pool not in own_splits:
                DATASETS.get(DataSpec.parse(a.pool).name)
            self._check_defense_algorithm(a)

    def _check_defense_algorithm(self, attack: AttackSpec) -> None:
        """An attack that simulates the defense (D-DAE) runs only against defenses it can simulate."""
        from fortress.bench.shadow import DEFENSE_ALGORITHM, SIMULABLE, takes_defense_algorithm

        if not takes_defense_algorithm(attack.name):
            return
        if DEFENSE_ALGORITHM in attack.params:
            raise ConfigError(
                f"attack {attack.name!r}: {DEFENSE_ALGORITHM} is built from each cell's defense; remove it from params"
            )
        bad = [d.display for d in self.defenses if attack.runs_against(d) and d.name not in SIMULABLE]
        if bad:
            raise ConfigError(
                f"attack {attack.name!r} simulates the defense on a shadow model, which defenses {bad} do not "
                f"allow (simulable: {', '.join(SIMULABLE)}); list the others in its 'defenses'"
            )

    def victim_data(self, victim: VictimConfig) -> DataSpec:
        """The data ``victim`` trains on: its own ``data``, else the grid's ``[data]``, else the embedded digits."""
        return victim.data or self.data or DataSpec()

    @property
    def num_cells(self) -> int:
        """Number of cells the grid expands to."""
        return sum(
            len(a.budgets)
            * len(a.output_modes or self.output_modes)
            * len(self.seeds)
            * sum(len(d.train_seeds or (None,)) for d in self.defenses if a.runs_against(d))
            for v in self.victims
            for a in self.attacks
            if a.runs_on(v)
        )


@dataclass(frozen=True)
class Cell:
    """One task of a grid: one attack (with its seed, budget, output mode) against one built defense.

    Attributes:
        grid: name of the grid the cell came from (not part of the key: grids may share cells).
        victim: how the victim is trained.
        defense: which defense is built on it, and how.
        attack: the attack run (budget, seed, output mode, clone, pool, parameters).
        eval_every: clone evaluation interval (``None``: at the end only).
        defense_seed: the defense's training seed, from the grid's ``train_seeds`` (``None``: not
            varied); already applied to ``defense.params``, so it is not part of the key.
        strategy, variant: the attack's query strategy and attacker variant as the grid names them
            (:class:`AttackSpec`); labels only, not part of the key.
    """

    grid: str
    victim: VictimConfig
    defense: DefenseSpec
    attack: AttackConfig
    eval_every: int | None = None
    defense_seed: int | None = None
    strategy: str | None = None
    variant: str | None = None

    @property
    def attack_display(self) -> str:
        """The attack's name in records and tables: ``strategy/variant`` when the grid names them."""
        if self.strategy is None and self.variant is None:
            return self.attack.name
        return f"{self.strategy or self.attack.name}/{self.variant or 'naive'}"

    def canonical(self) -> dict[str, Any]:
        """The fields that define the cell's result (everything but the grid name and the seed's label)."""
        return {
            "format": CELL_FORMAT,
            "victim": victim_key_view(self.victim),
            "defense": self.defense.canonical(),
            "attack": to_dict(self.attack),
            "eval_every": self.eval_every,
        }

    @property
    def key(self) -> str:
        """Stable hash of :meth:`canonical`: what ``resume`` matches finished records on."""
        return config_hash(self.canonical())

    @property
    def victim_key(self) -> str:
        """Cache key of the cell's victim artifact."""
        return victim_artifact_key(self.victim)

    @property
    def defense_key(self) -> str:
        """Cache key of the cell's defense artifact."""
        return defense_artifact_key(self.victim, self.defense)

    def describe(self) -> str:
        """A short human-readable name for logs and progress displays."""
        a = self.attack
        trained = "" if self.defense_seed is None else f" trained with seed {self.defense_seed}"
        return (
            f"{self.attack_display}/{a.output_mode}@{a.budget:,} vs {self.defense.display}{trained} "
            f"({self.victim.arch}, {self.victim.dataset}, seed {a.seed})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for task arguments and records); inverse of :meth:`from_dict`."""
        labels = {"strategy": self.strategy, "variant": self.variant} if self.strategy or self.variant else {}
        defense = {"name": self.defense.name, "label": self.defense.label, "params": to_dict(self.defense.params)}
        if self.defense.monitor is not None:
            defense["monitor"] = to_dict(self.defense.monitor)
        plain = {**self.canonical(), "defense": defense}  # the parameters as given, not as keyed
        return {"grid": self.grid, **plain, "defense_seed": self.defense_seed, **labels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """Rebuild a cell from :meth:`to_dict`."""
        if data.get("format") != CELL_FORMAT:
            raise ConfigError(f"cell format {data.get('format')!r} is not {CELL_FORMAT}")
        return cls(
            grid=str(data["grid"]),
            victim=from_dict(VictimConfig, data["victim"], where="cell.victim"),
            defense=from_dict(DefenseSpec, data["defense"], where="cell.defense"),
            attack=from_dict(AttackConfig, data["attack"], where="cell.attack"),
            eval_every=data.get("eval_every"),
            defense_seed=data.get("defense_seed"),
            strategy=data.get("strategy"),
            variant=data.get("variant"),
        )


def defense_key_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A defense's parameters as cell and build keys see them.

    DNF's utility budget (``ProtectConfig.max_utility_drop``, default 0.5) is written with its
    resolved value when it is not zero, and left out when it is zero: the zero-tolerance guard was
    the only recipe before the budget existed, so cells that pin ``max_utility_drop = 0`` keep the
    keys (and ``--resume`` the records) they had, and cells that leave the budget at its default
    get new keys instead of being matched to records made without it.
    """
    out: dict[str, Any] = to_dict(params)
    if name == "dnf":
        from fortress.defenses.dnf.recipe import ProtectConfig

        budget = out.get("max_utility_drop", ProtectConfig().max_utility_drop)
        if budget == 0:
            out.pop("max_utility_drop", None)
        else:
            out["max_utility_drop"] = budget
    return out


def victim_key_view(victim: VictimConfig) -> dict[str, Any]:
    """The victim's config as cell keys and records see it.

    The data spec is written ``"dataset": NAME`` when it is a bare registry name (no path, no
    options), as in grids before data specs existed, so every earlier cell keeps its key (and
    ``--resume`` its records); a spec with a path or options is written in full as ``"data"``.
    The training options added later (optimizer, schedule, weight decay, flips) are left out while
    they hold their defaults, for the same reason.
    """
    out: dict[str, Any] = to_dict(victim)
    out.pop("data", None)
    for name, default in VictimConfig.KEYLESS_DEFAULTS.items():  # earlier cells keep their keys
        if name in out and out[name] == default:
            del out[name]
    spec = victim.spec
    if spec.path is None and not spec.options:
        out["dataset"] = spec.name
    else:
        out["data"] = spec.to_dict()
    return out


def victim_artifact_key(victim: VictimConfig) -> str:
    """Cache directory name of a victim: ``victim-<arch>-<hash>``."""
    arch = victim.arch.replace(":", "-")  # a factory path package.module:function
    return f"victim-{arch}-{config_hash(victim_key_view(victim), length=12)}"


def defense_artifact_key(victim: VictimConfig, defense: DefenseSpec) -> str:
    """Cache directory name of a defense built on a victim (the label does not matter): ``<name>-<hash>``."""
    if defense.train_seeds is not None:
        raise ConfigError(f"defense {defense.display!r}: pick one training seed (for_seed) before keying its build")
    data = {
        "victim": victim_key_view(victim),
        "name": defense.name,
        "params": defense_key_params(defense.name, defense.params),
    }
    return f"{defense.name}-{config_hash(data, length=12)}"


def expand_grid(grid: GridConfig) -> list[Cell]:
    """Every cell of ``grid`` in a fixed order: victim, seed, attack, budget, output mode, defense, training seed.

    Seeds vary slowly, so an interrupted grid already holds whole tables for its first seeds.
    """
    builds = [(d, s, d.for_seed(s)) for d in grid.defenses for s in d.train_seeds or (None,)]
    cells: list[Cell] = []
    for victim in (replace(v, data=grid.victim_data(v)) for v in grid.victims):
        for seed in grid.seeds:
            for spec in filter(lambda a: a.runs_on(victim), grid.attacks):
                for budget in spec.budgets:
                    for mode in spec.output_modes or grid.output_modes:
                        attack = AttackConfig(
                            name=spec.name,
                            budget=budget,
                            seed=seed,
                            clone=spec.clone or victim.arch,
                            output_mode=mode,
                            pool=spec.pool,
                            params=dict(spec.params),
                        )
                        for defense, train_seed, built in builds:
                            if spec.runs_against(defense):
                                cells.append(
                                    Cell(
                                        grid.name,
                                        victim,
                                        built,
                                        attack,
                                        grid.eval_every,
                                        train_seed,
                                        spec.strategy,
                                        spec.variant,
                                    )
                                )
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"grid {grid.name!r} lists the same cell twice (repeated budgets or output modes?)")
    return cells


def load_grid(path: Path, *, data: DataSpec | None = None) -> GridConfig:
    """Read and validate a grid TOML file (see the module docstring for the format).

    ``data`` replaces the grid's ``[data]`` table (the CLI's ``--data``), e.g. to give the CIFAR
    grids the folder of the batches.

    Raises:
        ArtifactError: the file does not exist.
        ConfigError: invalid TOML, unknown keys or bad values (the message names them).
        UnknownComponent: a registry name in the grid does not exist.
    """
    grid = load_toml(GridConfig, path)
    if data is not None:
        grid = replace(grid, data=data)
    grid.validate()
    return grid
