"""Key profiles and monitor flags in the key ledger's SQLite file (table ``key_profiles``).

The table sits beside ``api_keys`` in the same file, so a profile survives restarts with its key,
and every server process sharing the file sees the same rows:

* a profile is only ever **added to**: each answered batch contributes its own counts and moments,
  merged into the stored row inside one transaction (Chan et al.'s parallel merge), never a copy of
  one process's view written over another's — so profile counts equal the queries answered;
* a **flag** is written when it is raised and never cleared by a later write (``COALESCE``): only an
  operator's reset clears it, and a reset bumps the row's ``epoch`` so that every process drops the
  evidence it holds in memory for that key on its next batch;
* ``state`` is the monitor's evidence as the last writer saw it (per process; what a restart resumes).

The server applies a batch's record in the same transaction as the batch's charge
(:meth:`ProfileStore.apply`), so a profile never counts an answer that was not charged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fortress.ledger import ledger_errors, open_sqlite
from fortress.monitor.profile import KeyProfile, RunningMoments

__all__ = ["ProfileRecord", "ProfileStore", "merge_profiles"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_profiles (
    key_id      TEXT PRIMARY KEY,
    profile     TEXT NOT NULL,
    monitor     TEXT,
    state       TEXT,
    flagged_at  INTEGER,
    updated_at  TEXT NOT NULL,
    epoch       INTEGER NOT NULL DEFAULT 0
);
"""


def _merge_moments(a: RunningMoments, b: RunningMoments) -> RunningMoments:
    """The moments of two streams joined (Chan, Golub & LeVeque 1979): exact, order-free."""
    n = a.n + b.n
    if not n:
        return RunningMoments()
    delta = b.mean - a.mean
    return RunningMoments(n, a.mean + delta * b.n / n, a.m2 + b.m2 + delta * delta * a.n * b.n / n)


def merge_profiles(a: KeyProfile, b: KeyProfile) -> KeyProfile:
    """The profile of ``a``'s queries followed by ``b``'s (same exits); ``b`` alone if the exits differ."""
    if a.num_exits != b.num_exits:
        return b
    return KeyProfile(
        num_exits=a.num_exits,
        queries=a.queries + b.queries,
        exit_counts=[x + y for x, y in zip(a.exit_counts, b.exit_counts, strict=True)],
        entropy=_merge_moments(a.entropy, b.entropy),
        confidence=_merge_moments(a.confidence, b.confidence),
    )


@dataclass(frozen=True)
class ProfileRecord:
    """What one answered batch adds to its key's row.

    Attributes:
        key_id: the key.
        delta: the profile of this batch alone (added to the stored profile).
        monitor: the monitor's name (``None``: profiles only).
        state: the monitor's evidence for the key after this batch (``None``: leave as stored).
        flagged_at: set when this batch raised the key's flag (a flag already stored is kept).
        epoch: the key's reset epoch this process's evidence belongs to; a record from an older
            epoch (the key was reset meanwhile) adds its counts but neither state nor flag.
    """

    key_id: str
    delta: KeyProfile
    monitor: str | None = None
    state: dict[str, Any] | None = None
    flagged_at: int | None = None
    epoch: int = 0


class ProfileStore:
    """Read and add to per-key profiles and flags in the ledger file.

    Args:
        path: the SQLite key ledger (created if missing: profiles are statistics; the server opens
            the ledger strictly with :class:`~fortress.serve.keys.KeyStore` first).

    Example:
        >>> store = ProfileStore(tmp / "keys.db")
        >>> prof = KeyProfile(num_exits=0); prof.update(torch.full((3, 2), 0.5), None)
        >>> store.save(ProfileRecord("k1", prof))
        >>> store.load("k1")["profile"]["queries"]
        3
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._db = open_sqlite(self.path, _SCHEMA, synchronous="NORMAL", busy_timeout_s=busy_timeout_s, create=True)
        with ledger_errors(self.path):
            cols = {str(r[1]) for r in self._db.execute("PRAGMA table_info(key_profiles)")}
            if "epoch" not in cols:  # ledgers written before resets were shared across processes
                self._db.execute("ALTER TABLE key_profiles ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @staticmethod
    def apply(db: sqlite3.Connection, rec: ProfileRecord) -> None:
        """Add ``rec`` to its key's row, inside the caller's transaction on ``db`` (the ledger's writer)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        row = db.execute("SELECT profile, epoch FROM key_profiles WHERE key_id = ?", (rec.key_id,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO key_profiles (key_id, profile, monitor, state, flagged_at, updated_at, epoch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.key_id,
                    json.dumps(rec.delta.as_dict()),
                    rec.monitor,
                    None if rec.state is None else json.dumps(rec.state),
                    rec.flagged_at,
                    now,
                    rec.epoch,
                ),
            )
            return
        merged = merge_profiles(KeyProfile.from_dict(json.loads(row[0])), rec.delta)
        current = int(row[1]) == rec.epoch
        db.execute(
            "UPDATE key_profiles SET profile = ?, monitor = COALESCE(?, monitor), updated_at = ?,"
            " state = CASE WHEN ? AND ? THEN ? ELSE state END,"
            " flagged_at = COALESCE(flagged_at, CASE WHEN ? THEN ? END) WHERE key_id = ?",
            (
                json.dumps(merged.as_dict()),
                rec.monitor,
                now,
                current,
                rec.state is not None,
                None if rec.state is None else json.dumps(rec.state),
                current,
                rec.flagged_at,
                rec.key_id,
            ),
        )

    def save(self, rec: ProfileRecord) -> None:
        """:meth:`apply` in a transaction of its own (library use; the server commits with the charge)."""
        with self._lock, ledger_errors(self.path, "profile store"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self.apply(self._db, rec)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load(self, key_id: str) -> dict[str, Any] | None:
        """The stored row (``profile``, ``monitor``, ``state``, ``flagged_at``, ``updated_at``, ``epoch``)."""
        with self._lock, ledger_errors(self.path, "profile store"):
            row = self._db.execute(
                "SELECT profile, monitor, state, flagged_at, updated_at, epoch FROM key_profiles WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None:
            return None
        profile, monitor, state, flagged_at, updated, epoch = row
        return {
            "profile": json.loads(profile),
            "monitor": monitor,
            "state": None if state is None else json.loads(state),
            "flagged_at": flagged_at,
            "updated_at": updated,
            "epoch": int(epoch),
        }

    def flag(self, key_id: str) -> tuple[int | None, int]:
        """The key's stored flag (``flagged_at`` or ``None``) and reset epoch (0 for a key never stored)."""
        with self._lock, ledger_errors(self.path, "profile store"):
            row = self._db.execute("SELECT flagged_at, epoch FROM key_profiles WHERE key_id = ?", (key_id,)).fetchone()
        return (None, 0) if row is None else (None if row[0] is None else int(row[0]), int(row[1]))

    def clear_flag(self, key_id: str) -> bool:
        """Clear a key's flag and monitor evidence (the profile stays) and bump its epoch; ``False``: no row.

        Every server process drops the evidence it holds for the key on its next batch of it.
        """
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock, ledger_errors(self.path, "profile store"):
            cur = self._db.execute(
                "UPDATE key_profiles SET state = NULL, flagged_at = NULL, epoch = epoch + 1, updated_at = ?"
                " WHERE key_id = ?",
                (now, key_id),
            )
        return cur.rowcount > 0

    def delete(self, key_id: str) -> None:
        """Forget a key's profile and flag."""
        with self._lock, ledger_errors(self.path, "profile store"):
            self._db.execute("DELETE FROM key_profiles WHERE key_id = ?", (key_id,))
