"""The ``fortress`` command line: thin verbs over library calls (typer + rich).

This is the only module that configures logging and draws progress bars. Every
:class:`~fortress.errors.FortressError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fortress.errors import ConfigError, FortressError

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="fortress",
    help="Protect image classifiers against model extraction with Dynamic Neural Fortresses, and measure defenses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# wide enough for the results table when output is piped or logged (a terminal keeps its own width)
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def _friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn library errors into one line on stderr and exit status 1; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FortressError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished results and checkpoints are kept", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@contextmanager
def _progress() -> Iterator[Callable[[str, float, float], None]]:
    """A rich progress display fed by ``update(stage, completed, total)`` callbacks."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, completed: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=completed, total=total)

        yield update


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _hist(h: Sequence[float]) -> str:
    return "/".join(f"{100 * v:.0f}" for v in h) if h else "—"


def _records_table(records: Sequence[Any], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "defense",
        "attack",
        "seed",
        "budget",
        "queries",
        "clone acc %",
        "best %",
        "fidelity %",
        "defended acc %",
        "exits: attack % (ID %)",
    ):
        table.add_column(col, justify="right" if col not in ("defense", "attack") else "left")
    for r in records:
        exits = "—" if not r.exit_hist_attack else f"{_hist(r.exit_hist_attack)} ({_hist(r.exit_hist_id)})"
        table.add_row(
            r.defense,
            r.attack,
            str(r.seed),
            f"{r.budget:,}",
            f"{r.queries_used:,}",
            _pct(r.clone_acc),
            _pct(r.clone_acc_best),
            _pct(r.clone_fidelity),
            _pct(r.defended_acc),
            exits,
        )
    return table


class ListWhat(str, Enum):
    """Registries ``fortress list`` can show."""

    attacks = "attacks"
    defenses = "defenses"
    models = "models"
    datasets = "datasets"


@app.command("list")
@_friendly
def list_components(
    what: Annotated[ListWhat | None, typer.Argument(help="Which registry to list (default: all).")] = None,
) -> None:
    """List registered attacks, defenses, models and data sets."""
    from fortress.attacks import ATTACKS
    from fortress.data.registry import DATASETS
    from fortress.defenses import DEFENSES
    from fortress.models import MODELS

    regs: dict[str, list[str]] = {
        "attacks": ATTACKS.names(),
        "defenses": DEFENSES.names(),
        "models": MODELS.names(),
        "datasets": DATASETS.names(),
    }
    for name, items in regs.items():
        if what is None or what.value == name:
            console.print(f"[bold]{name}[/]: " + ", ".join(items), highlight=False)


@app.command("train-victim")
@_friendly
def train_victim_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved victim.")],
    arch: Annotated[str, typer.Option(help="Model registry name.")] = "lenet5",
    epochs: Annotated[int, typer.Option(help="Training epochs (paper: 20).")] = 20,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train a victim on the embedded MNIST digits and save it (safetensors + JSON)."""
    from fortress.bench.pipeline import train_victim
    from fortress.config import VictimConfig

    cfg = VictimConfig(arch=arch, epochs=epochs, lr=lr, seed=seed)
    with _progress() as update:
        _, acc = train_victim(cfg, out, on_epoch=lambda e, _l, _a: update("train victim", e + 1, epochs))
    console.print(f"victim {arch}: ID test accuracy {100 * acc:.2f}% — saved to {out}", highlight=False)


@app.command("protect")
@_friendly
def protect_cmd(
    victim: Annotated[Path, typer.Argument(help="Directory of a saved victim.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the protected model.")],
    config: Annotated[Path | None, typer.Option(help="ProtectConfig TOML (options below override it).")] = None,
    head: Annotated[str | None, typer.Option(help="Exit head kind: vib (paper) or plain.")] = None,
    epochs: Annotated[int | None, typer.Option(help="DNF training epochs (paper: 10).")] = None,
    ood: Annotated[str | None, typer.Option(help="OOD source: dcgan, proxy, noise or dcgan+noise.")] = None,
    thresholds: Annotated[str | None, typer.Option(help="Comma-separated per-head thresholds.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of DNF training.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from checkpoints in OUT/checkpoints.")] = True,
) -> None:
    """Protect a saved victim with DNF: train exit heads on ID + OOD data, then save."""
    from dataclasses import replace

    from fortress.bench.pipeline import defended_accuracy, id_data, protect
    from fortress.config import ProtectConfig, load_toml
    from fortress.models import load_model

    cfg = load_toml(ProtectConfig, config) if config is not None else ProtectConfig()
    if head is not None:
        cfg = replace(cfg, head_kind=head)  # type: ignore[arg-type]
    if epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    if seed is not None:
        cfg = replace(cfg, train=replace(cfg.train, seed=seed), ood=replace(cfg.ood, seed=seed))
    if ood is not None:
        cfg = replace(cfg, ood=replace(cfg.ood, kind=ood))  # type: ignore[arg-type]
    thr = _floats(thresholds, "--thresholds")
    if thr is not None:
        cfg = replace(cfg, thresholds=thr)
    model = load_model(victim)
    total = cfg.train.epochs
    with _progress() as update:
        dnf = protect(
            model,
            cfg,
            out=out,
            resume=resume,
            on_dcgan_epoch=lambda e, _g, _d: update("train OOD generator", e + 1, cfg.ood.dcgan_epochs),
            on_step=lambda s: update("train DNF exits", s.epoch + (s.step + 1) / s.steps_per_epoch, total),
        )
    test = id_data("mnist").test
    acc, hist = defended_accuracy(dnf, test)
    console.print(
        f"DNF saved to {out}: defended ID accuracy {100 * acc:.2f}%, ID exits (%) {_hist(hist)}, "
        f"thresholds {dnf.thresholds}",
        highlight=False,
    )


@app.command("attack")
@_friendly
def attack_cmd(
    name: Annotated[str, typer.Argument(help="Attack registry name (see `fortress list attacks`).")],
    target: Annotated[Path, typer.Option(help="Directory of a saved defense or victim.")],
    budget: Annotated[int, typer.Option(help="Query budget.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for results.jsonl and the clone.")],
    clone: Annotated[str, typer.Option(help="Clone architecture (model registry name).")] = "lenet5",
    seed: Annotated[int, typer.Option(help="Attack seed.")] = 0,
    output_mode: Annotated[str, typer.Option(help="Oracle output: soft, hard or topk.")] = "soft",
    pool: Annotated[str | None, typer.Option(help="Attacker pool data set (attacks that need one).")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Extra attack hyper-parameter KEY=VALUE.")] = None,
    api_budget: Annotated[
        int | None, typer.Option(help="The target API's own query quota (default: the attack budget).")
    ] = None,
) -> None:
    """Run an extraction attack against a saved defense and append its result record."""
    from fortress.bench.pipeline import run_attack
    from fortress.bench.records import append_record
    from fortress.config import AttackConfig
    from fortress.defenses import load_defense

    if not str(target).startswith(("http://", "https://")):
        defense = load_defense(target)
    else:
        raise ConfigError(f"HTTP targets need the server extra (not available here): {target}")
    cfg = AttackConfig(
        name=name,
        budget=budget,
        seed=seed,
        clone=clone,
        output_mode=output_mode,  # type: ignore[arg-type]
        pool=pool,
        params=_params(param or []),
    )
    with _progress() as update:
        rec = run_attack(
            defense,
            cfg,
            progress=lambda used, b: update(f"{name} vs {defense.name}", used, b),
            extra_config={"target": str(target)},
            api_budget=api_budget,
        )
    append_record(out / "results.jsonl", rec)
    console.print(_records_table([rec], f"{name} against {target}"))
    console.print(f"record appended to {out / 'results.jsonl'}", highlight=False)


@app.command("demo")
@_friendly
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A few minutes instead of < 30 on 2 CPU cores.")] = False,
    seeds: Annotated[str, typer.Option(help="Comma-separated attack seeds.")] = "0",
) -> None:
    """Train a LeNet-5 victim, protect it with DNF, attack both with DFME and Knockoff; print the table."""
    import torch

    from fortress.bench.demo import demo_config, run_demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed_list = tuple(int(s) for s in (_floats(seeds, "--seeds") or (0,)))
    cfg = demo_config(quick=quick, seeds=seed_list)
    with _progress() as update:
        result = run_demo(cfg, out, event=update)
    console.print(_records_table(result.records, f"fortress demo ({'quick' if quick else 'full'}), MNIST, LeNet-5"))
    console.print(
        f"victim ID accuracy {100 * result.victim_acc:.2f}% · results: {out / 'results.jsonl'} · "
        f"exit histograms: {result.plot} · {result.wall_s / 60:.1f} min",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
