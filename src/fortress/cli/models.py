"""Verbs that make models: ``train-victim``, ``defend`` (any registered defense, DNF included) and
``protect`` (DNF with its options spelled out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fortress.cli.base import (
    DEFAULT_THREADS,
    Amp,
    DataOption,
    DataOptions,
    Device,
    MaxUtilityDrop,
    Threads,
    app,
    console,
    data_spec,
    friendly,
    progress,
)
from fortress.cli.own_models import ArchParams, Classifier, Stages, staging_of
from fortress.reproducibility import pin_threads

__all__ = ["defend_cmd", "protect_cmd", "train_victim_cmd"]


@app.command("train-victim")
@friendly
def train_victim_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved victim.")],
    arch: Annotated[
        str,
        typer.Option(help="Model registry name, entry point of fortress.models, or factory package.module:function."),
    ] = "lenet5",
    arch_param: ArchParams = None,
    stages: Stages = None,
    classifier: Classifier = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: the recipe's; paper, MNIST: 20).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the recipe's; paper: Adam, 1e-3).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    data: DataOption = None,
    data_option: DataOptions = None,
    threads: Threads = DEFAULT_THREADS,
    device: Device = "cpu",
    amp: Amp = False,
) -> None:
    """Train a victim on a data set (default: the embedded MNIST digits) and save it (safetensors + JSON).

    The training recipe (optimiser, schedule, augmentation, epochs) is the one that fits the
    architecture and the data set (fortress.models.recipes); --epochs and --lr override it.
    """
    pin_threads(threads)
    from fortress.bench.pipeline import train_victim
    from fortress.config import VictimConfig, parse_params
    from fortress.device import resolve_device

    dev = resolve_device(device)
    cfg = VictimConfig.recommended(
        arch,
        data_spec(data, data_option),
        seed=seed,
        epochs=epochs,
        lr=lr,
        arch_params=parse_params(arch_param or [], what="--arch-param"),
        staging=staging_of(stages, classifier),
    )
    n = cfg.epochs
    with progress() as update:
        _, acc = train_victim(
            cfg, out, on_epoch=lambda e, _l, _a: update("train victim", e + 1, n), device=dev, amp=amp
        )
    console.print(
        f"victim {arch} on {cfg.spec.text()}: ID test accuracy {100 * acc:.2f}% — saved to {out}", highlight=False
    )


@app.command("defend")
@friendly
def defend_cmd(
    name: Annotated[str, typer.Argument(help="Defense registry name (see `fortress list defenses`).")],
    victim: Annotated[Path, typer.Argument(help="Directory of a saved victim.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved defense.")],
    param: Annotated[
        list[str] | None, typer.Option(help="Defense hyper-parameter KEY=VALUE (a dotted KEY sets a nested one).")
    ] = None,
    fit: Annotated[
        bool, typer.Option(help="Train the defense's own parts on the ID data (MeCo, adaptive misinformation, ...).")
    ] = False,
    fit_param: Annotated[list[str] | None, typer.Option(help="Training option KEY=VALUE (implies --fit).")] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
    threads: Threads = DEFAULT_THREADS,
    device: Device = "cpu",
) -> None:
    """Wrap a saved victim in a defense (trained where it trains), save it and report its utility.

    Built exactly as a benchmark grid builds it. For dnf the params are the protect config's
    (e.g. --param train.epochs=1 --param ood.kind=noise); `fortress protect` has them as options.
    """
    pin_threads(threads)
    from fortress.bench.steps import defend_saved
    from fortress.config import defense_params
    from fortress.device import resolve_device

    resolve_device(device)
    params = defense_params(param or [], fit_param or [], fit=fit)
    with progress() as update:
        made = defend_saved(name, victim, out, params, data=data_spec(data, data_option), event=update, device=device)
    console.print(
        f"{name} saved to {out}: defended ID test accuracy {100 * made.accuracy:.2f}%",
        highlight=False,
    )


@app.command("protect")
@friendly
def protect_cmd(
    victim: Annotated[Path, typer.Argument(help="Directory of a saved victim.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the protected model.")],
    config: Annotated[Path | None, typer.Option(help="ProtectConfig TOML (options below override it).")] = None,
    head: Annotated[str | None, typer.Option(help="Exit head kind: vib (paper) or plain.")] = None,
    epochs: Annotated[int | None, typer.Option(help="DNF training epochs (paper: 10).")] = None,
    ood: Annotated[
        str | None,
        typer.Option(
            help="OOD source: dcgan, proxy, noise, near (transformed ID images), or parts joined by + (near+noise)."
        ),
    ] = None,
    thresholds: Annotated[str | None, typer.Option(help="Comma-separated per-head thresholds.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of DNF training.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from checkpoints in OUT/checkpoints.")] = True,
    search_thresholds: Annotated[
        bool, typer.Option(help="Search exit thresholds with SMAC3 after training (paper App. H).")
    ] = False,
    search_trials: Annotated[int | None, typer.Option(help="Threshold-search trials (default 50).")] = None,
    max_utility_drop: MaxUtilityDrop = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="Three-way threshold search (clone accuracy, ID compute, utility loss); apply its "
            "protection, efficiency or pareto point (implies --search-thresholds)."
        ),
    ] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
    threads: Threads = DEFAULT_THREADS,
    device: Device = "cpu",
) -> None:
    """Protect a saved victim with DNF: train exit heads on ID + OOD data, then save."""
    pin_threads(threads)
    from fortress.device import resolve_device

    resolve_device(device)
    from fortress.bench.steps import protect_saved
    from fortress.bench.tables import exit_hist
    from fortress.config import ProtectConfig, load_toml, parse_floats, protect_overrides

    cfg = protect_overrides(
        load_toml(ProtectConfig, config) if config is not None else ProtectConfig(),
        head=head,
        epochs=epochs,
        seed=seed,
        ood=ood,
        thresholds=parse_floats(thresholds, "--thresholds"),
        search=search_thresholds,
        search_trials=search_trials,
        max_utility_drop=max_utility_drop,
        objective=objective,
    )
    with progress() as update:
        made = protect_saved(
            victim, out, cfg, resume=resume, data=data_spec(data, data_option), event=update, device=device
        )
    console.print(
        f"DNF saved to {out}: defended ID accuracy {100 * made.accuracy:.2f}%, "
        f"ID exits (%) {exit_hist(made.exit_hist)}, thresholds {made.dnf.thresholds}",
        highlight=False,
    )
    search = None if made.dnf.provenance is None else made.dnf.provenance.search
    if search is not None and search.goal is not None and search.trials_file is not None:
        plot = (out / search.trials_file).with_name("threshold_pareto.png")
        console.print(
            f"three-way search ({search.goal}): surrogate clone {100 * search.surrogate:.2f}% "
            f"(paper defaults {100 * search.baseline_surrogate:.2f}%), ID compute ×{search.id_compute:.2f} "
            f"(×{search.baseline_id_compute:.2f}), {search.front_size} points on the Pareto front → "
            f"{out / search.trials_file}, {plot}",
            highlight=False,
        )
