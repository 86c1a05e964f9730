"""The README's headline figures are generated: the quick demo, rerun in a fresh process, prints them again."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import fortress

ROOT = Path(__file__).resolve().parents[1]


def _tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_tables_are_generated_blocks_with_their_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tables = _tables()
    for name, command in (("demo-quick", "fortress demo --quick --out demo-out"), ("demo-full", "fortress demo --out")):
        table = tables.block(text, name)
        assert re.match(r"victim lenet5 at [\d.]+ % ID test accuracy, DNF at [\d.]+ %; torch [\w.+]+, 1 thread", table)
        assert "| dfme, " in table and "| knockoff, " in table
        before = text[: text.index(f"<!-- begin {name} -->")]
        assert command in before.splitlines()[-2], "the command that made the table is printed next to it"
    assert tables.with_block(text, "demo-quick", tables.block(text, "demo-quick")) == text
    with pytest.raises(KeyError, match="no block 'nope'"):
        tables.block(text, "nope")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quick_demo_in_a_fresh_process_prints_the_readme_table(tmp_path: Path) -> None:
    """Same command, same numbers: `fortress demo --quick` (1 torch thread) equals the README's table."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(Path(fortress.__file__).resolve().parents[1])
    out = tmp_path / "demo-out"
    cmd = [sys.executable, "-m", "fortress", "demo", "--quick", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3500, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table == _tables().block((ROOT / "README.md").read_text(encoding="utf-8"), "demo-quick")
    assert table in res.stdout  # the command prints the table it wrote
