"""``fortress demo``: the whole story on one data set (default: the embedded digits), end to end.

Trains a LeNet-5 victim, protects it with DNF, attacks the undefended victim and DNF with DFME
and Knockoff Nets at the same budgets, appends every result record to ``results.jsonl``, draws
the exit histograms of ID test queries vs attack queries (paper Table 12) and writes the headline
table (:func:`demo_table`) to ``table.md``: the README's table is that file, verbatim. ``data``
runs it on another data set (``fortress demo --data fashion-mnist``).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fortress.bench.pipeline import protect, run_attack, train_victim
from fortress.bench.plots import plot_exit_histograms
from fortress.bench.records import ResultRecord, append_record
from fortress.config import AttackConfig, DemoConfig, OODConfig, ProtectConfig, VictimConfig, to_dict
from fortress.data.spec import DataSpec
from fortress.defenses import Defense, Undefended
from fortress.defenses.dnf import DNFTrainConfig
from fortress.device import resolve_device

__all__ = ["TABLE", "DemoResult", "demo_config", "demo_table", "run_demo"]

#: The headline table's file in the demo's output directory.
TABLE = "table.md"

#: ``event(stage, completed, total)`` — progress of each demo stage.
EventFn = Callable[[str, float, float], None]


def demo_config(
    *,
    quick: bool = False,
    seeds: tuple[int, ...] = (0,),
    data: DataSpec | None = None,
    device: str = "cpu",
    amp: bool = False,
    max_utility_drop: float | None = None,
) -> DemoConfig:
    """The demo's settings: ``quick`` finishes in a few minutes on 2 CPU cores, the full one in < 30.

    Budgets: DFME 1M queries (quick: 150k); Knockoff Nets (random) 5,000 images from a natural-photo
    patch pool, a different distribution as in the paper's data-based setting. The same budget is
    used against both defenses. ``data``: the victim's data (default: the embedded digits). On a
    data set other than the 3,500 embedded training digits (Fashion-MNIST has 52,800), the quick demo
    trains the victim for 3 epochs and DNF for 1 (fewer passes over a larger set).
    ``max_utility_drop``: DNF's utility budget (``None``: :class:`ProtectConfig`'s default, 0.5
    points; 0: the zero-tolerance guard, every ID query at the final exit).

    Raises:
        ConfigError: a budget outside [0, 100].
    """
    small = data is None or data.is_default
    # the victim's recipe for the data (the paper's App. G for the digits: VictimConfig())
    victim = VictimConfig.recommended("lenet5", data, epochs=None if small or not quick else 3)
    if quick:
        dnf_epochs = 4 if small else 1
        protect_cfg = ProtectConfig(
            train=DNFTrainConfig(epochs=dnf_epochs), ood=OODConfig(proxy_size=1000, dcgan_epochs=3)
        )
        dfme_budget = 150_000
    else:
        protect_cfg = ProtectConfig()
        dfme_budget = 1_000_000
    if max_utility_drop is not None:
        protect_cfg = replace(protect_cfg, max_utility_drop=max_utility_drop)
    attacks = (
        AttackConfig(name="dfme", budget=dfme_budget, clone="lenet5", output_mode="soft"),
        AttackConfig(name="knockoff", budget=5_000, clone="lenet5", output_mode="soft", pool="patches"),
    )
    return DemoConfig(victim=victim, protect=protect_cfg, attacks=attacks, seeds=seeds, device=device, amp=amp)


@dataclass
class DemoResult:
    """What the demo produced."""

    out: Path
    victim_acc: float
    records: list[ResultRecord] = field(default_factory=list)
    plot: Path | None = None
    wall_s: float = 0.0


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _budget(r: ResultRecord) -> str:
    unit = "queries" if r.attack == "dfme" else "images"
    return f"{r.budget:,} {unit}"


def demo_table(records: list[ResultRecord]) -> str:
    """The demo's headline table in Markdown, from its records alone (the README quotes it verbatim).

    One row per attack and seed: the clone's ID test accuracy against the undefended victim and
    against DNF at the same budget, and the share of DNF's attack queries that left at exit 0;
    above it, the victim's and DNF's ID test accuracy and the torch threads and version (the
    figures are bit-identical only with the same ones).

    Raises:
        ValueError: ``records`` is empty.
    """
    if not records:
        raise ValueError("demo_table needs the demo's records")
    first = records[0]
    dnf = [r for r in records if r.defense == "dnf"]
    lines = [
        f"victim {first.victim_arch} at {_pct(first.victim_acc)} ID test accuracy, "
        f"DNF at {_pct(dnf[0].defended_acc if dnf else None)}; "
        f"torch {first.extra.get('torch_version', '?')}, {first.extra.get('torch_threads', '?')} thread(s)",
        "",
        "| attack, budget | seed | clone vs undefended | clone vs DNF | DNF: attack queries at exit 0 |",
        "|---|---|---|---|---|",
    ]
    rows: dict[tuple[str, int, int], dict[str, ResultRecord]] = {}
    for r in records:
        rows.setdefault((r.attack, r.budget, r.seed), {})[r.defense] = r
    for (attack, _budget_n, seed), by in rows.items():
        undef, prot = by.get("undefended"), by.get("dnf")
        any_r = next(iter(by.values()))
        exit0 = _pct(prot.exit_hist_attack[0]) if prot is not None and prot.exit_hist_attack else "—"
        lines.append(
            f"| {attack}, {_budget(any_r)} | {seed} | {_pct(undef.clone_acc if undef else None)} | "
            f"{_pct(prot.clone_acc if prot else None)} | {exit0} |"
        )
    return "\n".join(lines) + "\n"


def _stage_progress(emit: EventFn, stage: str, used: int, budget: int) -> None:
    emit(stage, used, budget)


def run_demo(cfg: DemoConfig, out: Path, *, event: EventFn | None = None) -> DemoResult:
    """Run the demo into ``out`` (``victim/``, ``dnf/``, ``results.jsonl``, ``exit_histograms.png``, ``table.md``).

    Records are appended as each attack finishes, so an interrupted demo keeps what it finished.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]

    def emit(stage: str, done: float, total: float) -> None:
        if event is not None:
            event(stage, done, total)

    dev = resolve_device(cfg.device)
    emit("train victim", 0, cfg.victim.epochs)
    victim, victim_acc = train_victim(
        cfg.victim,
        out / "victim",
        on_epoch=lambda e, _l, _a: emit("train victim", e + 1, cfg.victim.epochs),
        device=dev,
        amp=cfg.amp,
    )
    steps_total = cfg.protect.train.epochs
    dnf = protect(
        victim,
        cfg.protect,
        data=cfg.victim.spec,
        out=out / "dnf",
        resume=False,
        on_dcgan_epoch=lambda e, _g, _d: emit("train OOD generator", e + 1, cfg.protect.ood.dcgan_epochs),
        on_step=lambda s: emit("train DNF exits", s.epoch + (s.step + 1) / s.steps_per_epoch, steps_total),
    )
    result = DemoResult(out=out, victim_acc=victim_acc)
    undefended = Undefended(victim)
    for seed in cfg.seeds:
        for attack in cfg.attacks:
            acfg = replace(attack, seed=seed)
            defenses: tuple[Defense, ...] = (undefended, dnf)
            for defense in defenses:
                stage = f"{acfg.name} vs {defense.name} (seed {seed})"
                emit(stage, 0, acfg.budget)
                rec = run_attack(
                    defense,
                    acfg,
                    data=cfg.victim.spec,
                    progress=functools.partial(_stage_progress, emit, stage),
                    extra_config={"demo": to_dict(cfg), "run_id": run_id},
                    device=dev,
                )
                append_record(out / "results.jsonl", rec)
                result.records.append(rec)
                emit(stage, acfg.budget, acfg.budget)
    result.plot = plot_exit_histograms(result.records, out / "exit_histograms.png")
    (out / TABLE).write_text(demo_table(result.records), encoding="utf-8")
    result.wall_s = time.perf_counter() - t0
    return result
