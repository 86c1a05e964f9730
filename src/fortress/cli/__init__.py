"""The ``fortress`` command line: thin verbs over library calls (typer + rich).

One module per group of verbs, each verb one library call plus argument parsing, progress and
printing: :mod:`~fortress.cli.components` (``list``), :mod:`~fortress.cli.models` (``train-victim``,
``defend``, ``protect``), :mod:`~fortress.cli.own_models` (``import-model``),
:mod:`~fortress.cli.attack` (``attack``), :mod:`~fortress.cli.serving`
(``serve``, ``keys ...``, ``monitor ...``) and :mod:`~fortress.cli.bench` (``bench``, ``report``,
``bench-speed``, ``bench-timing``, ``demo``). The tables they print are made by
:mod:`fortress.bench.tables`.

This package is the only place that configures logging and draws progress bars. Every
:class:`~fortress.errors.FortressError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

# each module registers its verbs on the app when imported; this order is the order of `fortress --help`
# isort: off
from fortress.cli import components, models, own_models, attack, serving, bench  # noqa: F401

# isort: on
from fortress.cli.base import app
from fortress.cli.serving import ComputeMode

__all__ = ["ComputeMode", "app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
