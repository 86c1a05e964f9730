"""Key profiles and monitor state in the key ledger's SQLite file (table ``key_profiles``).

The table sits beside ``api_keys`` in the same file, so a profile survives restarts with its key.
It has its own connection with ``synchronous=NORMAL``: in WAL mode a commit then costs no fsync
(profiles are statistics, re-derivable; losing the last batches to a power cut is acceptable,
unlike budget charges, which keep ``FULL``), so writing one row per batch stays cheap.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fortress.ledger import open_sqlite

__all__ = ["ProfileStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_profiles (
    key_id      TEXT PRIMARY KEY,
    profile     TEXT NOT NULL,
    monitor     TEXT,
    state       TEXT,
    flagged_at  INTEGER,
    updated_at  TEXT NOT NULL
);
"""


class ProfileStore:
    """Read and write per-key profiles (JSON) in the ledger file.

    Args:
        path: the SQLite key ledger (created if missing).

    Example:
        >>> store = ProfileStore(tmp / "keys.db")
        >>> store.save("k1", {"queries": 3}, monitor="exit-sprt", state={"s": 0.0}, flagged_at=None)
        >>> store.load("k1")["profile"]["queries"]
        3
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._db = open_sqlite(self.path, _SCHEMA, synchronous="NORMAL", busy_timeout_s=busy_timeout_s)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def save(
        self,
        key_id: str,
        profile: dict[str, Any],
        *,
        monitor: str | None,
        state: dict[str, Any] | None,
        flagged_at: int | None,
    ) -> None:
        """Insert or replace a key's profile and monitor state."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        row = (key_id, json.dumps(profile), monitor, None if state is None else json.dumps(state), flagged_at, now)
        with self._lock:
            self._db.execute(
                "INSERT INTO key_profiles (key_id, profile, monitor, state, flagged_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET profile = excluded.profile,"
                " monitor = excluded.monitor, state = excluded.state, flagged_at = excluded.flagged_at,"
                " updated_at = excluded.updated_at",
                row,
            )

    def load(self, key_id: str) -> dict[str, Any] | None:
        """The stored record (``profile``, ``monitor``, ``state``, ``flagged_at``, ``updated_at``) or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT profile, monitor, state, flagged_at, updated_at FROM key_profiles WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            return None
        profile, monitor, state, flagged_at, updated = row
        return {
            "profile": json.loads(profile),
            "monitor": monitor,
            "state": None if state is None else json.loads(state),
            "flagged_at": flagged_at,
            "updated_at": updated,
        }

    def clear_flag(self, key_id: str) -> bool:
        """Clear a stored key's flag and monitor state (the profile stays); ``False``: no record."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            cur = self._db.execute(
                "UPDATE key_profiles SET state = NULL, flagged_at = NULL, updated_at = ? WHERE key_id = ?",
                (now, key_id),
            )
        return cur.rowcount > 0

    def delete(self, key_id: str) -> None:
        """Forget a key's profile (clears a flag once the monitor is reset too)."""
        with self._lock:
            self._db.execute("DELETE FROM key_profiles WHERE key_id = ?", (key_id,))
