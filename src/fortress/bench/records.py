"""Result records: one JSON object per (defense, attack, budget, seed), appended to ``results.jsonl``.

Tables and plots are made only from these records (DESIGN §3). Appends are one ``write`` of a
full line followed by ``fsync``, so an interrupted run never leaves a half record and never loses
a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fortress.errors import ArtifactError

__all__ = ["ResultRecord", "append_record", "read_records"]


@dataclass
class ResultRecord:
    """One attack against one defense (DESIGN §3). Accuracies are fractions in [0, 1].

    ``dataset`` is the data spec's registry name; ``data`` the whole spec with what resolving it
    gave: path and options, the content hash (``sha256``), classes, image shape and split sizes
    (:meth:`fortress.data.resolve.ResolvedData.describe`).
    """

    defense: str
    attack: str
    dataset: str
    victim_arch: str
    clone_arch: str
    budget: int
    queries_used: int
    seed: int
    victim_acc: float
    defended_acc: float
    clone_acc: float | None
    clone_fidelity: float | None
    exit_hist_id: list[float] = field(default_factory=list)
    exit_hist_attack: list[float] = field(default_factory=list)
    mean_l1_perturbation: float | None = None
    defense_s_per_1k_queries: float | None = None
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    clone_acc_best: float | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultRecord:
        """Rebuild a record (unknown keys go to ``extra``)."""
        names = set(cls.__dataclass_fields__)
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in data.items() if k not in names})
        return cls(**known, extra=extra)


def append_record(path: Path, record: ResultRecord) -> None:
    """Append ``record`` as one line to ``path`` (created with its folder if missing) and fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.to_json() + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[ResultRecord]:
    """Read every complete record of a ``results.jsonl`` file (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"results file not found: {path}")
    out: list[ResultRecord] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(ResultRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if i == len(lines) - 1:
                break  # an append interrupted mid-line; everything before it is intact
            raise ArtifactError(f"{path}:{i + 1}: corrupt result record: {exc}") from exc
    return out
