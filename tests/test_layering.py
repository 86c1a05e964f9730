"""The import graph keeps its layers: sibling families never import each other, neutral modules import
no family, and the data loaders and the data registry do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fortress"


def imported(path: Path) -> set[str]:
    """Every ``fortress.*`` module ``path`` imports (at any depth of the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.startswith("fortress.")}


def files(package: str) -> list[Path]:
    root = SRC / package
    return sorted(root.rglob("*.py")) if root.is_dir() else [SRC / f"{package}.py"]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("attacks", ("fortress.defenses", "fortress.monitor", "fortress.bench", "fortress.serve", "fortress.cli")),
        ("defenses", ("fortress.attacks", "fortress.monitor", "fortress.bench", "fortress.serve", "fortress.cli")),
        ("generative", ("fortress.attacks", "fortress.defenses", "fortress.monitor", "fortress.bench")),
        ("functional", ("fortress.attacks", "fortress.defenses", "fortress.monitor", "fortress.bench")),
        ("training", ("fortress.attacks", "fortress.defenses", "fortress.monitor", "fortress.bench")),
    ],
)
def test_no_import_crosses_to_a_sibling_or_up(package: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        f"{p.relative_to(SRC)} -> {m}"
        for p in files(package)
        for m in imported(p)
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    }
    assert not bad, sorted(bad)


def test_data_loaders_and_registry_do_not_import_each_other() -> None:
    assert "fortress.data.registry" not in imported(SRC / "data" / "loaders.py")
    assert "fortress.data" not in imported(SRC / "data" / "loaders.py")
