"""The README's two commands are the ones CI and new users run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_demo_then_test_command() -> None:
    demo, tests = _commands()[:2]
    assert "pip install torch==2.13.0" in demo and "fortress demo" in demo
    assert "pip install torch==2.13.0" in tests and "pytest" in tests
    assert demo.index("torch==2.13.0") < demo.index("pip install -e")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert _commands()[1] == ci[-1]


def test_readme_python_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tour's Python snippets, run in order as a user would paste them."""
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "my-dnf" / "dnf.safetensors").exists()
    result = scope["result"]
    assert result.queries_used <= 20_000  # type: ignore[attr-defined]
