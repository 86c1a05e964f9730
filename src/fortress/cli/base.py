"""The ``fortress`` Typer app and what every verb shares: the consoles, one-line errors and progress.

This package is the only place that configures logging and draws progress bars.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fortress.errors import ConfigError, FortressError
from fortress.reproducibility import DEFAULT_THREADS

if TYPE_CHECKING:
    from fortress.data.spec import DataSpec

__all__ = [
    "DEFAULT_THREADS",
    "Amp",
    "DataOption",
    "DataOptions",
    "Device",
    "MaxUtilityDrop",
    "Threads",
    "app",
    "console",
    "data_spec",
    "err_console",
    "friendly",
    "progress",
]

#: The ``--threads`` option of every seeded verb: torch's intra-op threads, pinned before any work
#: (the same command gives the same figures only at the same thread count).
Threads = Annotated[
    int,
    typer.Option(
        help="Torch threads; results are bit-identical only at the same count (recorded with every result).",
        min=1,
    ),
]

#: ``--device``: where a verb computes (checked before any work; recorded with every result).
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where to compute: auto, cpu, cuda, cuda:N or mps (auto: the first GPU, else the CPU). "
        "CPU results do not depend on this option.",
    ),
]
#: ``--amp``: bf16 autocast for training on a GPU (recorded; no effect on the CPU).
Amp = Annotated[bool, typer.Option("--amp", help="bf16 autocast for training on a GPU (off by default; recorded).")]
MaxUtilityDrop = Annotated[
    float | None,
    typer.Option(help="Utility budget: points of ID validation accuracy early exits may cost (default 0.5; 0: none)."),
]

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


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
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
def progress() -> Iterator[Callable[[str, float, float], None]]:
    """A rich progress display fed by ``update(stage, completed, total)`` callbacks (one bar per stage)."""
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


#: ``--data NAME[:PATH]``: the data set of a verb (a data spec; see ``fortress list datasets``).
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Data set NAME[:PATH] (fortress list datasets). Default: the data the saved model was trained on, "
        "else the embedded MNIST digits.",
    ),
]
#: ``--data-option KEY=VALUE`` (repeatable): loader and split options of ``--data``.
DataOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--data-option",
        help="Option of --data, KEY=VALUE (repeatable): loader options, or val_size, attacker_size, test_size, "
        "train_size, split_seed.",
    ),
]


def data_spec(data: str | None, options: list[str] | None) -> DataSpec | None:
    """The data spec of ``--data``/``--data-option`` (``None`` when no ``--data`` was given).

    Raises:
        ConfigError: ``--data-option`` without ``--data``, or a malformed value.
    """
    from fortress.data.spec import DataSpec

    if data is None:
        if options:
            raise ConfigError("--data-option needs --data NAME[:PATH] (the options belong to a named data set)")
        return None
    return DataSpec.parse(data, options or [])
