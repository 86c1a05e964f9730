"""``fortress attack``: one extraction attack against a saved defense or a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fortress.cli.base import (
    DEFAULT_THREADS,
    DataOption,
    DataOptions,
    Device,
    Threads,
    app,
    console,
    data_spec,
    friendly,
    progress,
)
from fortress.reproducibility import pin_threads

__all__ = ["attack_cmd"]


@app.command("attack")
@friendly
def attack_cmd(
    name: Annotated[str, typer.Argument(help="Attack registry name (see `fortress list attacks`).")],
    target: Annotated[str, typer.Option(help="Directory of a saved defense or victim, or a server URL.")],
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
    api_key: Annotated[str | None, typer.Option(envvar="FORTRESS_API_KEY", help="API key of a server target.")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Server targets: a local copy of the served model, for off-budget evaluation."),
    ] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
    threads: Threads = DEFAULT_THREADS,
    device: Device = "cpu",
) -> None:
    """Run an extraction attack against a saved defense or a `fortress serve` URL; append its result record."""
    pin_threads(threads)
    from fortress.device import resolve_device

    resolve_device(device)
    from fortress.bench.steps import attack_saved
    from fortress.bench.tables import records_table
    from fortress.config import AttackConfig, parse_params

    cfg = AttackConfig(
        name=name,
        budget=budget,
        seed=seed,
        clone=clone,
        output_mode=output_mode,  # type: ignore[arg-type]
        pool=pool,
        params=parse_params(param or []),
    )
    with progress() as update:
        done = attack_saved(
            target,
            cfg,
            out,
            reference=reference,
            api_key=api_key,
            api_budget=api_budget,
            data=data_spec(data, data_option),
            event=update,
            device=device,
        )
    console.print(records_table([done.record], f"{name} against {target}"))
    console.print(f"record appended to {done.results}", highlight=False)
