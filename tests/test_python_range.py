"""The declared Python range: pyproject, ruff and mypy agree, the code needs no newer Python, and this
interpreter is inside it."""

from __future__ import annotations

import ast
import platform
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

#: Standard-library modules newer than some Python the project might declare, with the version that
#: added them: importing one without a fallback raises the floor to that version.
NEW_STDLIB: dict[str, tuple[int, int]] = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def floor(spec: str) -> tuple[int, int]:
    """The lowest ``major.minor`` a ``requires-python`` specifier admits (it must have a ``>=`` bound)."""
    bounds = [s for s in SpecifierSet(spec) if s.operator == ">="]
    if len(bounds) != 1:
        raise ValueError(f"requires-python needs exactly one '>=' bound, got {spec!r}")
    v = Version(bounds[0].version)
    return v.major, v.minor


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import sits in ``try: ... except ImportError`` or under an ``if sys.version_info`` test."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = [ast.unparse(h.type) for h in parent.handlers if h.type is not None]
            if any("ImportError" in c or "ModuleNotFoundError" in c for c in caught):
                return True
        if isinstance(parent, ast.If) and "version_info" in ast.unparse(parent.test):
            return True
        child, parent = parent, parents.get(parent)
    return False


def unguarded_new_imports(source: str, below: tuple[int, int]) -> list[str]:
    """Names of standard-library modules newer than ``below`` that ``source`` imports without a fallback."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            added = NEW_STDLIB.get(name)
            if added is not None and added > below and not _guarded(node, parents):
                found.append(name)
    return found


def test_ruff_mypy_and_requires_python_agree() -> None:
    data = _pyproject()
    project, tool = data["project"], data["tool"]
    assert isinstance(project, dict) and isinstance(tool, dict)
    major, minor = floor(project["requires-python"])
    assert tool["ruff"]["target-version"] == f"py{major}{minor}"
    assert tool["mypy"]["python_version"] == f"{major}.{minor}"


def test_the_code_needs_no_newer_python_than_declared() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    low = floor(project["requires-python"])
    offenders = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "src").rglob("*.py"))
        if (names := unguarded_new_imports(path.read_text(encoding="utf-8"), low))
    }
    assert offenders == {}, f"these need a newer Python than requires-python {project['requires-python']!r}"


def test_this_interpreter_is_inside_the_declared_range() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert SpecifierSet(project["requires-python"]).contains(platform.python_version())


def test_dependencies_at_their_declared_floor_run_on_the_declared_python() -> None:
    """A dependency installed at exactly its declared minimum must itself admit the declared Python floor
    (e.g. ``fastapi>=0.165`` needs Python 3.11, so the serve and dev extras cannot declare 3.10)."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    low = "{}.{}".format(*floor(project["requires-python"]))
    declared = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    checked, refusing = 0, []
    for text in declared:
        req = Requirement(text)
        bounds = [s.version for s in req.specifier if s.operator == ">="]
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        if not bounds or Version(dist.version).release[: len(Version(bounds[0]).release)] != Version(bounds[0]).release:
            continue  # installed above its floor: this one says nothing about the floor's Python
        checked += 1
        needs = dist.metadata.get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(low):
            refusing.append(f"{req} (needs Python {needs})")
    assert refusing == [], f"declared Python floor {low} is below what these dependencies need"
    if checked == 0:
        pytest.skip("no dependency is installed at exactly its declared floor")


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import tomllib\n", ["tomllib"]),
        ("from tomllib import loads\n", ["tomllib"]),
        ("try:\n    import tomllib\nexcept ImportError:\n    import tomli as tomllib\n", []),
        ("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    tomllib = None\n", []),
        ("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli as tomllib\n", []),
        ("try:\n    import tomllib\nexcept KeyError:\n    pass\n", ["tomllib"]),
        ("import tomli_w\nimport json\n", []),
    ],
)
def test_the_import_check_tells_fallbacks_from_bare_imports(source: str, found: list[str]) -> None:
    assert unguarded_new_imports(source, (3, 10)) == found
    assert unguarded_new_imports(source, (3, 11)) == []


def test_floor_reads_the_lower_bound() -> None:
    assert floor(">=3.11") == (3, 11)
    assert floor(">=3.10,<4") == (3, 10)
    with pytest.raises(ValueError, match="'>=' bound"):
        floor("~=3.11")
