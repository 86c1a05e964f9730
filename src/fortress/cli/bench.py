"""Benchmark verbs: ``bench`` (a grid), ``report``, ``bench-speed``, ``bench-timing`` and ``demo``."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    err_console,
    friendly,
    progress,
)

if TYPE_CHECKING:
    from fortress.bench.runner import GridProgress

__all__ = ["BenchExecutor", "bench_cmd", "bench_speed_cmd", "bench_timing_cmd", "demo_cmd", "report_cmd"]


class BenchExecutor(str, Enum):
    """Where ``fortress bench`` runs its cells."""

    local = "local"
    ray = "ray"


@app.command("bench")
@friendly
def bench_cmd(
    config: Annotated[Path, typer.Argument(help="Grid TOML (see benchmarks/README.md).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: results.jsonl, artifacts/, grid.toml.")],
    executor: Annotated[BenchExecutor, typer.Option(help="local (this process) or ray (a Ray cluster).")] = (
        BenchExecutor.local
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Skip cells already in OUT/results.jsonl.")] = False,
    threads: Annotated[
        int, typer.Option(help="Torch threads per local task (Ray tasks use 1).", min=1)
    ] = DEFAULT_THREADS,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray instance (default: all).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster.")] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where to compute: auto, cpu, cuda, cuda:N or mps (default: the grid's device, else cpu).",
        ),
    ] = None,
    amp: Amp = False,
    gpus_per_cell: Annotated[
        float, typer.Option(help="GPUs Ray reserves per cell and build (fractions share a GPU; ray executor).")
    ] = 0.0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="List the cells and estimate wall time per cell and in all from a short measured probe of each "
            "attack and defense build on --device; runs no cell and writes nothing to OUT.",
        ),
    ] = False,
) -> None:
    """Run a benchmark grid (defense × attack × budget × seed); one result record per cell.

    --data replaces the grid's [data] table (e.g. --data cifar10:DIR for the CIFAR grids).
    """
    from fortress.bench.grid import load_grid
    from fortress.bench.runner import run_grid
    from fortress.device import check_device, resolve_device

    if device is not None:
        check_device(device)
        if executor is BenchExecutor.local or ray_address is None:
            resolve_device(device)
    spec = data_spec(data, data_option)
    grid = load_grid(config, data=spec)
    device = device or grid.device or "cpu"
    if executor is BenchExecutor.local or ray_address is None:
        resolve_device(device)
    if dry_run:
        from fortress.bench.estimate import estimate_grid, estimate_tables

        workers = 1 if executor is BenchExecutor.local else (num_cpus or _cpu_count())
        if gpus_per_cell:
            workers = max(1, min(workers, int(_gpu_count() / gpus_per_cell)))
        est = estimate_grid(grid, device=device, workers=workers, threads=threads if workers == 1 else 1)
        for table in estimate_tables(est):
            console.print(table)
        console.print(est.summary(), highlight=False)
        return
    t0 = time.perf_counter()
    with Progress(
        TextColumn("cells"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running {task.fields[running]} · left {task.fields[left]} · failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("cells", total=grid.num_cells, running=0, left=grid.num_cells, failed=0)

        def show(p: GridProgress) -> None:
            bar.update(task, completed=p.done, running=p.running, left=p.left, failed=p.failed)
            _log_progress(p, t0)

        run = run_grid(
            grid,
            out,
            executor="ray" if executor is BenchExecutor.ray else "local",
            resume=resume,
            threads=threads,
            num_cpus=num_cpus,
            ray_address=ray_address,
            on_progress=show,
            device=device,
            amp=amp,
            gpus_per_cell=gpus_per_cell,
        )
    console.print(
        f"grid {grid.name!r}: {len(run.records)} cells run, {run.skipped} already done, {len(run.failed)} failed "
        f"of {run.total} · {run.wall_s / 60:.1f} min · records in {out / 'results.jsonl'}",
        highlight=False,
    )
    for cell, error in run.failed:
        err_console.print(f"[bold red]failed:[/] {cell}: {error}", highlight=False)
    if run.failed:
        raise typer.Exit(1)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _log_progress(p: GridProgress, t0: float) -> None:
    """Without a terminal (a log file, CI), one plain line per finished cell instead of the bar."""
    if err_console.is_terminal or p.last is None:
        return
    err_console.print(
        f"[{p.done}/{p.total}] {time.perf_counter() - t0:7.0f} s · running {p.running} · left {p.left} · "
        f"failed {p.failed} · finished {p.last}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("report")
@friendly
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or its results.jsonl).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report directory (default RUN_DIR/report).")] = None,
) -> None:
    """Tables (Markdown + CSV) and plots from a run's result records alone."""
    from fortress.bench.report import make_report

    rep = make_report(run_dir, out)
    console.print(rep.tables["clone_accuracy"][0].read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(
        f"{rep.records} records → {rep.markdown} · tables: {', '.join(rep.tables)} (.md, .csv) · "
        f"plots: {', '.join(p.name for p in rep.plots)}",
        highlight=False,
    )


@app.command("bench-speed")
@friendly
def bench_speed_cmd(
    target: Annotated[Path, typer.Argument(help="A saved DNF (or a saved victim: then dnf is skipped).")],
    defense: Annotated[list[str] | None, typer.Option(help="Defense to time (repeatable; default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per timed call.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed calls per defense and traffic.")] = 20,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the measurements as JSON.")] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
    device: Device = "cpu",
) -> None:
    """Per-query cost of every defense vs undefended, and forward_dynamic vs forward_all, in one run."""
    from fortress.bench.speed import bench_speed
    from fortress.bench.tables import speed_tables
    from fortress.device import resolve_device

    resolve_device(device)
    spec = data_spec(data, data_option)
    suite = bench_speed(target, defenses=defense, batch_size=batch_size, repeats=repeats, data=spec, device=device)
    for table in speed_tables(suite):
        console.print(table)
    for name, why in suite.skipped.items():
        console.print(f"skipped {name}: {why}", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(suite.as_dict(), indent=2), encoding="utf-8")


@app.command("bench-timing")
@friendly
def bench_timing_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A saved DNF (fortress protect).")],
    queries: Annotated[int, typer.Option(help="Single-image queries timed per mode (half ID, half noise).")] = 600,
    modes: Annotated[str, typer.Option(help="Comma-separated compute modes to serve.")] = "dynamic,full,padded",
    requests: Annotated[int, typer.Option(help="Batches in each throughput run.")] = 100,
    batch: Annotated[int, typer.Option(help="Images per batch in the throughput run.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Client threads in the throughput run.")] = 4,
    threads: Annotated[int, typer.Option(help="The server's torch threads.")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the queries and the train/test split.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
) -> None:
    """Play the attacker on the exit-timing channel: infer DNF's exit from response time, per compute mode."""
    from fortress.bench.tables import timing_table
    from fortress.bench.timing import bench_timing

    rep = bench_timing(
        model_dir,
        modes=[m.strip() for m in modes.split(",") if m.strip()],
        queries=queries,
        batch=batch,
        requests=requests,
        concurrency=concurrency,
        threads=threads,
        seed=seed,
        data=data_spec(data, data_option),
    )
    console.print(timing_table(rep))
    console.print(f"throughput: batch {rep.batch}, {rep.concurrency} clients, {rep.threads} server thread(s)")
    if json_out is not None:
        json_out.write_text(json.dumps(rep.as_dict(), indent=2), encoding="utf-8")


@app.command("demo")
@friendly
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A few minutes instead of < 30 on 2 CPU cores.")] = False,
    seeds: Annotated[str, typer.Option(help="Comma-separated attack seeds.")] = "0",
    data: DataOption = None,
    data_option: DataOptions = None,
    threads: Threads = DEFAULT_THREADS,
    device: Device = "cpu",
    amp: Amp = False,
    max_utility_drop: MaxUtilityDrop = None,
) -> None:
    """Train a LeNet-5 victim, protect it with DNF, attack both with DFME and Knockoff; print the table."""
    from fortress.bench.demo import TABLE, demo_config, run_demo
    from fortress.bench.tables import records_table
    from fortress.config import parse_floats
    from fortress.device import resolve_device
    from fortress.reproducibility import pin_threads

    pin_threads(threads)
    seed_list = tuple(int(s) for s in (parse_floats(seeds, "--seeds") or (0,)))
    cfg = demo_config(
        quick=quick,
        seeds=seed_list,
        data=data_spec(data, data_option),
        device=device,
        amp=amp,
        max_utility_drop=max_utility_drop,
    )
    resolve_device(cfg.device)
    with progress() as update:
        result = run_demo(cfg, out, event=update)
    title = f"fortress demo ({'quick' if quick else 'full'}), {cfg.victim.spec.text()}, LeNet-5"
    console.print(records_table(result.records, title))
    console.print((out / TABLE).read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(
        f"victim ID accuracy {100 * result.victim_acc:.2f}% · results: {out / 'results.jsonl'} · "
        f"table: {out / TABLE} · exit histograms: {result.plot} · {result.wall_s / 60:.1f} min",
        highlight=False,
    )
