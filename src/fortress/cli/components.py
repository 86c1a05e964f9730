"""``fortress list``: the registered components."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from fortress.cli.base import app, console, friendly

__all__ = ["ListWhat", "list_components"]


class ListWhat(str, Enum):
    """Registries ``fortress list`` can show (the keys of :func:`fortress.catalog.registered`)."""

    attacks = "attacks"
    defenses = "defenses"
    models = "models"
    datasets = "datasets"
    monitors = "monitors"


@app.command("list")
@friendly
def list_components(
    what: Annotated[ListWhat | None, typer.Argument(help="Which registry to list (default: all).")] = None,
) -> None:
    """List registered attacks, defenses, models, data sets and extraction monitors."""
    from fortress.catalog import registered

    for name, items in registered().items():
        if what is None or what.value == name:
            console.print(f"[bold]{name}[/]: " + ", ".join(items), highlight=False)
