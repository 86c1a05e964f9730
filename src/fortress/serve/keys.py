"""API keys and per-key query budgets in SQLite (WAL mode): exact under concurrency, durable across restarts.

Keys are random 256-bit tokens shown once when created; the ledger stores only their SHA-256
(a fast hash is the right tool for high-entropy tokens — there is nothing to brute-force). Every
charge is one conditional ``UPDATE`` (``used + n <= budget``), and a ``CHECK`` constraint holds the
same invariant inside the database, so concurrent requests — from threads or from several server
processes sharing the file — can never spend more than the budget, and a refused batch charges
nothing. This is the HTTP side of the oracle contract (DESIGN §3): the server counts exactly what a
:class:`~fortress.oracle.LocalOracle` would.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fortress.errors import BudgetExceeded, ConfigError, FortressError
from fortress.ledger import open_sqlite
from fortress.oracle import OutputMode

__all__ = ["ApiKey", "KeyRejected", "KeyStore", "hash_key"]

KEY_PREFIX = "fk_"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    budget      INTEGER CHECK (budget IS NULL OR budget >= 0),
    used        INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    output_mode TEXT NOT NULL CHECK (output_mode IN ('soft', 'hard', 'topk')),
    top_k       INTEGER NOT NULL DEFAULT 1 CHECK (top_k >= 1),
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT,
    CHECK (budget IS NULL OR used <= budget)
);
"""
_COLUMNS = "key_id, name, budget, used, output_mode, top_k, admin, created_at, revoked_at"


class KeyRejected(FortressError):
    """A request's API key is missing, unknown (401) or revoked (403).

    Attributes:
        status: the HTTP status to answer with.
    """

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class ApiKey:
    """One key's public record (never the secret).

    Attributes:
        key_id: short public id (used in logs, metrics and ``keys revoke``).
        name: the owner's label.
        budget: query budget (``None``: unlimited).
        used: queries charged so far.
        output_mode: what this key's answers reveal.
        top_k: ``k`` for ``topk``.
        admin: may read ``/metrics``.
        created_at: ISO-8601 UTC time of creation.
        revoked_at: ISO-8601 UTC time of revocation, or ``None``.
    """

    key_id: str
    name: str
    budget: int | None
    used: int
    output_mode: OutputMode
    top_k: int
    admin: bool
    created_at: str
    revoked_at: str | None

    @property
    def budget_left(self) -> int | None:
        """Queries left (``None``: unlimited)."""
        return None if self.budget is None else self.budget - self.used


def hash_key(secret: str) -> str:
    """The ledger's digest of a key (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _row(row: tuple[object, ...]) -> ApiKey:
    kid, name, budget, used, mode, top_k, admin, created, revoked = row
    return ApiKey(
        key_id=str(kid),
        name=str(name),
        budget=None if budget is None else int(str(budget)),
        used=int(str(used)),
        output_mode=OutputMode(str(mode)),
        top_k=int(str(top_k)),
        admin=bool(admin),
        created_at=str(created),
        revoked_at=None if revoked is None else str(revoked),
    )


class KeyStore:
    """The key ledger: add, list, revoke, authenticate, charge and refund.

    Args:
        path: the SQLite file (created with its folder if missing).
        busy_timeout_s: how long a writer waits for another process's lock.

    Example:
        >>> store = KeyStore(tmp / "keys.db")
        >>> key, secret = store.add("alice", budget=100)
        >>> store.charge(store.authenticate(secret).key_id, 60).used
        60
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        # autocommit: every statement below is its own transaction (the charge is a single UPDATE);
        # FULL: a charge is on disk before its answer leaves, so usage survives even a power cut
        self._db = open_sqlite(self.path, _SCHEMA, synchronous="FULL", busy_timeout_s=busy_timeout_s)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @property
    def journal_mode(self) -> str:
        """SQLite's journal mode (``wal``)."""
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def add(
        self,
        name: str,
        *,
        budget: int | None = None,
        output_mode: OutputMode | str = OutputMode.SOFT,
        top_k: int = 1,
        admin: bool = False,
    ) -> tuple[ApiKey, str]:
        """Create a key; return its record and the secret (shown once, never stored).

        Raises:
            ConfigError: empty name, negative budget, unknown output mode or ``top_k < 1``.
        """
        if not name.strip():
            raise ConfigError("a key needs a non-empty name")
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 or unlimited, got {budget}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        try:
            mode = OutputMode(output_mode)
        except ValueError:
            valid = ", ".join(m.value for m in OutputMode)
            raise ConfigError(f"unknown output mode {output_mode!r}; valid modes: {valid}") from None
        key_id = secrets.token_hex(4)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, name, key_hash, budget, used, output_mode, top_k, admin, created_at)"
                " VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
                (key_id, name, hash_key(secret), budget, mode.value, top_k, int(admin), _now()),
            )
        return self.get(key_id), secret

    def get(self, key_id: str) -> ApiKey:
        """The record of ``key_id``.

        Raises:
            ConfigError: no such key.
        """
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no API key with id {key_id!r} in {self.path} (see `fortress keys list`)")
        return _row(row)

    def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, rowid").fetchall()
        return [_row(r) for r in rows]

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke a key by id, or by name when exactly one active key has it; return its record.

        Raises:
            ConfigError: no such key, or the name is ambiguous.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id FROM api_keys WHERE key_id = ? OR (name = ? AND revoked_at IS NULL)",
                (key_id_or_name, key_id_or_name),
            ).fetchall()
        ids = sorted({str(r[0]) for r in rows})
        if not ids:
            raise ConfigError(f"no API key with id or active name {key_id_or_name!r} in {self.path}")
        if len(ids) > 1:
            raise ConfigError(f"{key_id_or_name!r} names {len(ids)} active keys ({', '.join(ids)}); revoke by id")
        with self._lock:
            self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (_now(), ids[0])
            )
        return self.get(ids[0])

    def authenticate(self, secret: str | None) -> ApiKey:
        """The active key whose secret is ``secret``.

        Raises:
            KeyRejected: missing or unknown key (401), revoked key (403).
        """
        if not secret:
            raise KeyRejected("missing API key: send it in the X-API-Key header (or Authorization: Bearer)", 401)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (hash_key(secret),)
            ).fetchone()
        if row is None:
            raise KeyRejected("unknown API key", 401)
        key = _row(row)
        if key.revoked_at is not None:
            raise KeyRejected(f"API key {key.key_id} was revoked at {key.revoked_at}", 403)
        return key

    def charge(self, key_id: str, n: int) -> ApiKey:
        """Charge ``n`` queries to ``key_id`` atomically, or refuse the whole batch.

        Returns:
            The key's record after the charge.

        Raises:
            BudgetExceeded: ``used + n`` would pass the budget; nothing was charged.
            KeyRejected: the key was revoked meanwhile (403).
        """
        if n < 0:
            raise ConfigError(f"cannot charge a negative number of queries ({n})")
        with self._lock:
            rows = self._db.execute(
                "UPDATE api_keys SET used = used + ? WHERE key_id = ? AND revoked_at IS NULL"
                f" AND (budget IS NULL OR used + ? <= budget) RETURNING {_COLUMNS}",
                (n, key_id, n),
            ).fetchall()  # fetch all: the UPDATE commits only once its statement is fully stepped
            if rows:
                return _row(rows[0])
            row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyRejected("unknown API key", 401)
        key = _row(row)
        if key.revoked_at is not None:
            raise KeyRejected(f"API key {key.key_id} was revoked at {key.revoked_at}", 403)
        assert key.budget is not None
        raise BudgetExceeded(n, key.used, key.budget)

    def refund(self, key_id: str, n: int) -> None:
        """Give back ``n`` queries charged to a batch that was never answered (timeout, server fault)."""
        with self._lock:
            self._db.execute("UPDATE api_keys SET used = MAX(used - ?, 0) WHERE key_id = ?", (n, key_id))
