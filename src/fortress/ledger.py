"""The one way fortress opens its SQLite files (the key ledger and the per-key profiles beside it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

from fortress.errors import ConfigError

__all__ = ["open_sqlite"]


def open_sqlite(
    path: Path, schema: str, *, synchronous: Literal["NORMAL", "FULL"], busy_timeout_s: float = 30.0
) -> sqlite3.Connection:
    """Open (or create) ``path`` in WAL mode with autocommit, shared across threads, and apply ``schema``.

    Every statement is its own transaction (``isolation_level=None``); callers serialise access with
    their own lock. ``synchronous="FULL"`` puts each commit on disk before it returns (the key
    ledger's charges); ``"NORMAL"`` may lose the last commits on power loss, never corrupt the file.

    Raises:
        ConfigError: ``path`` is not an SQLite file (naming it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot open key ledger {path}: {exc} (expected an SQLite file)") from exc
    return db
