"""The README's two commands are the ones CI and new users run."""

from __future__ import annotations

import re
from pathlib import Path

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
