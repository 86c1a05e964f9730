"""API keys and per-key query budgets in SQLite (WAL mode): exact under concurrency, durable across crashes.

Keys are random 256-bit tokens shown once when created; the ledger stores only their SHA-256
(a fast hash is the right tool for high-entropy tokens — there is nothing to brute-force).

A batch is paid for in two steps. :meth:`KeyStore.reserve` sets its queries aside when it is
admitted — one conditional ``UPDATE`` (``used + reserved + n <= budget``) plus a row in
``reservations`` naming the server process — so concurrent requests, from threads or from several
server processes sharing the file, can never promise more than the budget, and a refused batch
costs nothing. :meth:`KeyStore.commit` turns the reservation into usage once the answer is ready,
durably (``synchronous=FULL``, many commits sharing one ``fsync``: :class:`~fortress.ledger.GroupCommit`),
just before the answer is sent. A batch that is not answered (timeout, fault) is released; one
whose server process was killed stays reserved only until the ledger is opened again (or until a
batch of that key is refused), when every reservation of a process that no longer runs is released.
So a client is charged for the answers it was sent: a ``CHECK`` constraint holds
``used + reserved <= budget`` inside the database. This is the HTTP side of the oracle contract
(DESIGN §3): the server counts exactly what a :class:`~fortress.oracle.LocalOracle` would.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fortress.errors import ArtifactError, BudgetExceeded, ConfigError, FortressError
from fortress.ledger import (
    GroupCommit,
    drop_owner,
    ledger_errors,
    open_sqlite,
    owner_alive,
    process_owner,
    sweep_owners,
)
from fortress.oracle import OutputMode

__all__ = ["ApiKey", "Commit", "KeyRejected", "KeyStore", "Reservation", "hash_key", "init_ledger"]

log = logging.getLogger(__name__)

#: A write operation run inside a ledger transaction (see :class:`~fortress.ledger.GroupCommit`).
Commit = Callable[[sqlite3.Connection], Any]

KEY_PREFIX = "fk_"
SCHEMA_VERSION = 2
#: A longer ``X-API-Key`` / bearer value is refused (401) without hashing or a ledger lookup.
MAX_KEY_CHARS = 256

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
    reserved    INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND (budget IS NULL OR used + reserved <= budget)),
    CHECK (budget IS NULL OR used <= budget)
);
CREATE TABLE IF NOT EXISTS reservations (
    id          INTEGER PRIMARY KEY,
    key_id      TEXT NOT NULL,
    n           INTEGER NOT NULL CHECK (n > 0),
    owner       TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
"""
# ledgers written before reservations existed gain the column (its CHECK holds for every old row)
_MIGRATE_V1 = (
    "ALTER TABLE api_keys ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0"
    " CHECK (reserved >= 0 AND (budget IS NULL OR used + reserved <= budget))"
)
_COLUMNS = "key_id, name, budget, used, output_mode, top_k, admin, created_at, revoked_at, reserved"


class KeyRejected(FortressError):
    """A request's API key is missing, unknown (401) or revoked (403).

    Attributes:
        status: the HTTP status to answer with.
    """

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)

    def __reduce__(self) -> tuple[type[KeyRejected], tuple[str, int]]:
        return (type(self), (str(self), self.status))


@dataclass(frozen=True)
class ApiKey:
    """One key's public record (never the secret).

    Attributes:
        key_id: short public id (used in logs, metrics and ``keys revoke``).
        name: the owner's label.
        budget: query budget (``None``: unlimited).
        used: queries charged so far (answers sent).
        output_mode: what this key's answers reveal.
        top_k: ``k`` for ``topk``.
        admin: may read ``/metrics``.
        created_at: ISO-8601 UTC time of creation.
        revoked_at: ISO-8601 UTC time of revocation, or ``None``.
        reserved: queries of admitted batches not answered yet (set aside, not charged).
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
    reserved: int = 0

    @property
    def budget_left(self) -> int | None:
        """Queries a new batch may still use (``None``: unlimited): budget less used and reserved."""
        return None if self.budget is None else self.budget - self.used - self.reserved


@dataclass(frozen=True)
class Reservation:
    """Queries set aside for one admitted batch (see :meth:`KeyStore.reserve`).

    Attributes:
        id: the row in ``reservations``.
        key_id: whose budget.
        n: queries (images) in the batch.
        key: the key's record right after the reservation.
    """

    id: int
    key_id: str
    n: int
    key: ApiKey


def hash_key(secret: str) -> str:
    """The ledger's digest of a key (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _row(row: tuple[object, ...]) -> ApiKey:
    kid, name, budget, used, mode, top_k, admin, created, revoked, reserved = row
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
        reserved=int(str(reserved)),
    )


def _refusal(db: sqlite3.Connection, key_id: str, n: int) -> FortressError:
    """Why a conditional update of ``key_id`` for ``n`` queries matched no row."""
    row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
    if row is None:
        return KeyRejected("unknown API key", 401)
    key = _row(row)
    if key.revoked_at is not None:
        return KeyRejected(f"API key {key.key_id} was revoked at {key.revoked_at}", 403)
    assert key.budget is not None
    return BudgetExceeded(n, key.used + key.reserved, key.budget)


class KeyStore:
    """The key ledger: add, list, revoke, authenticate, and reserve / commit / release queries.

    Args:
        path: the SQLite file. It must exist (``fortress keys init``) unless ``create`` is true.
        create: create a missing ledger (``fortress keys init`` and tests); a missing or empty file
            is otherwise an error, so a mistyped path never serves from a new, empty ledger.
        busy_timeout_s: how long a writer waits for another process's lock.

    Raises:
        ArtifactError: the file is missing, empty, damaged or not a key ledger (one line naming it).

    Example:
        >>> store = KeyStore(tmp / "keys.db", create=True)
        >>> key, secret = store.add("alice", budget=100)
        >>> store.charge(store.authenticate(secret).key_id, 60).used
        60
    """

    def __init__(self, path: Path, *, create: bool = False, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        table = None if create else "api_keys"
        # reads, authentication: NORMAL is enough, nothing durable is written on this connection
        self._db = open_sqlite(
            self.path, "", synchronous="NORMAL", busy_timeout_s=busy_timeout_s, create=create, required_table=table
        )
        self._lock = threading.Lock()
        try:
            with ledger_errors(self.path):
                self._migrate()
            self._writer = GroupCommit(self.path, busy_timeout_s=busy_timeout_s)
        except BaseException:
            self._db.close()
            raise
        self.owner = process_owner(self.path)
        self._closed = False
        self.release_stale()
        sweep_owners(self.path)

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='api_keys'").fetchone()
            if exists and "reserved" not in {str(r[1]) for r in db.execute("PRAGMA table_info(api_keys)")}:
                db.execute(_MIGRATE_V1)
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Give back this process's open reservations, stop the writer and close the connections."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.run(self._release_owner_op(self.owner), durable=False)
        except ArtifactError:
            log.exception("could not release open reservations in %s", self.path)
        self._writer.close()
        with self._lock:
            self._db.close()
        drop_owner(self.path)

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def journal_mode(self) -> str:
        """SQLite's journal mode (``wal``)."""
        return str(self._read("PRAGMA journal_mode")[0][0])

    @property
    def writer(self) -> GroupCommit:
        """The process's writer of this ledger (profiles write through it too, in the same transactions)."""
        return self._writer

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock, ledger_errors(self.path):
            return list(self._db.execute(sql, args).fetchall())

    # ----------------------------------------------------------------------------------------------
    # keys

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
        row = (key_id, name, hash_key(secret), budget, mode.value, top_k, int(admin), _now())
        self._writer.run(
            lambda db: db.execute(
                "INSERT INTO api_keys (key_id, name, key_hash, budget, used, output_mode, top_k, admin, created_at)"
                " VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
                row,
            )
        )
        return self.get(key_id), secret

    def get(self, key_id: str) -> ApiKey:
        """The record of ``key_id``.

        Raises:
            ConfigError: no such key.
        """
        rows = self._read(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
        if not rows:
            raise ConfigError(f"no API key with id {key_id!r} in {self.path} (see `fortress keys list`)")
        return _row(rows[0])

    def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""
        return [_row(r) for r in self._read(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, rowid")]

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke a key by id, or by name when exactly one active key has it; return its record.

        Raises:
            ConfigError: no such key, or the name is ambiguous.
        """
        rows = self._read(
            "SELECT key_id FROM api_keys WHERE key_id = ? OR (name = ? AND revoked_at IS NULL)",
            (key_id_or_name, key_id_or_name),
        )
        ids = sorted({str(r[0]) for r in rows})
        if not ids:
            raise ConfigError(f"no API key with id or active name {key_id_or_name!r} in {self.path}")
        if len(ids) > 1:
            raise ConfigError(f"{key_id_or_name!r} names {len(ids)} active keys ({', '.join(ids)}); revoke by id")
        when = _now()
        self._writer.run(
            lambda db: db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (when, ids[0])
            )
        )
        return self.get(ids[0])

    def authenticate(self, secret: str | None) -> ApiKey:
        """The active key whose secret is ``secret``.

        Raises:
            KeyRejected: missing, malformed or unknown key (401), revoked key (403).
        """
        if not secret:
            raise KeyRejected("missing API key: send it in the X-API-Key header (or Authorization: Bearer)", 401)
        if len(secret) > MAX_KEY_CHARS:
            raise KeyRejected(f"API key of {len(secret)} characters is over the limit of {MAX_KEY_CHARS}", 401)
        rows = self._read(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (hash_key(secret),))
        if not rows:
            raise KeyRejected("unknown API key", 401)
        key = _row(rows[0])
        if key.revoked_at is not None:
            raise KeyRejected(f"API key {key.key_id} was revoked at {key.revoked_at}", 403)
        return key

    # ----------------------------------------------------------------------------------------------
    # queries: reserve at admission, commit with the answer, release what is not answered

    def _reserve_op(self, key_id: str, n: int) -> Callable[[sqlite3.Connection], Reservation]:
        if n < 1:
            raise ConfigError(f"a batch needs at least one query, got {n}")
        owner, when = self.owner, _now()

        def op(db: sqlite3.Connection) -> Reservation:
            row = db.execute(
                f"UPDATE api_keys SET reserved = reserved + ? WHERE key_id = ? AND revoked_at IS NULL"
                f" AND (budget IS NULL OR used + reserved + ? <= budget) RETURNING {_COLUMNS}",
                (n, key_id, n),
            ).fetchone()
            if row is None:
                raise _refusal(db, key_id, n)
            rid = db.execute(
                "INSERT INTO reservations (key_id, n, owner, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                (key_id, n, owner, when),
            ).fetchone()[0]
            return Reservation(int(rid), key_id, n, _row(row))

        return op

    def reserve(self, key_id: str, n: int) -> Reservation:
        """Set ``n`` queries of ``key_id`` aside for one batch, or refuse the whole batch.

        Not durable on its own (a reservation lost to a crash is a reservation released). A refusal
        first releases what stopped server processes left reserved, and tries once more.

        Raises:
            BudgetExceeded: ``used + reserved + n`` would pass the budget; nothing was set aside.
            KeyRejected: unknown or revoked key.
        """
        try:
            return self._writer.run(self._reserve_op(key_id, n), durable=False)
        except BudgetExceeded:
            if not self.release_stale():
                raise
        return self._writer.run(self._reserve_op(key_id, n), durable=False)

    def _commit_op(self, res: Reservation, also: Commit | None) -> Callable[[sqlite3.Connection], ApiKey]:

        def op(db: sqlite3.Connection) -> ApiKey:
            gone = db.execute("DELETE FROM reservations WHERE id = ? RETURNING n", (res.id,)).fetchone() is None
            sql = (
                "UPDATE api_keys SET used = used + ? WHERE key_id = ?"
                f" AND (budget IS NULL OR used + reserved + ? <= budget) RETURNING {_COLUMNS}"
                if gone
                else "UPDATE api_keys SET used = used + ?, reserved = reserved - ?"
                f" WHERE key_id = ? RETURNING {_COLUMNS}"
            )
            args = (res.n, res.key_id, res.n) if gone else (res.n, res.n, res.key_id)
            row = db.execute(sql, args).fetchone()
            if row is None:
                raise _refusal(db, res.key_id, res.n)
            if also is not None:
                also(db)
            return _row(row)

        return op

    def commit(self, res: Reservation, *, also: Commit | None = None) -> ApiKey:
        """Charge the reserved queries for an answer about to be sent, durably; run ``also`` in the same transaction.

        Returns once the charge is on disk (``synchronous=FULL``; concurrent commits share the
        ``fsync``). A reservation that was released meanwhile (its process was taken for stopped)
        is charged afresh, within the budget; ``also`` commits only with the charge.

        Returns:
            The key's record after the charge.

        Raises:
            BudgetExceeded: the fresh charge of a released reservation was refused (do not send the answer).
            KeyRejected: the key vanished.
        """
        return self._writer.run(self._commit_op(res, also), durable=True)

    def commit_async(self, res: Reservation, *, also: Commit | None = None) -> Future[ApiKey]:
        """:meth:`commit` without blocking the caller (an event loop)."""
        return self._writer.submit(self._commit_op(res, also), durable=True)

    @staticmethod
    def _release_op(res: Reservation) -> Commit:
        def op(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM reservations WHERE id = ? RETURNING n", (res.id,)).fetchone() is not None:
                db.execute("UPDATE api_keys SET reserved = reserved - ? WHERE key_id = ?", (res.n, res.key_id))

        return op

    def release(self, res: Reservation) -> None:
        """Give back the queries of a batch that will not be answered (timeout, fault); idempotent."""
        self._writer.run(self._release_op(res), durable=False)

    def release_async(self, res: Reservation) -> Future[None]:
        """:meth:`release` without blocking the caller (an event loop)."""
        return self._writer.submit(self._release_op(res), durable=False)

    def charge(self, key_id: str, n: int) -> ApiKey:
        """Reserve and commit ``n`` queries at once (no answer to wait for); refuse the whole batch.

        Raises:
            BudgetExceeded: ``used + reserved + n`` would pass the budget; nothing was charged.
            KeyRejected: unknown or revoked key.
        """
        return self.commit(self.reserve(key_id, n))

    def release_stale(self) -> int:
        """Release every reservation whose server process no longer runs; return the queries released."""
        rows = self._read("SELECT DISTINCT owner FROM reservations WHERE owner != ?", (self.owner,))
        owners = {str(r[0]) for r in rows}
        released = 0
        for owner in sorted(owners):
            if not owner_alive(self.path, owner):
                released += self._writer.run(self._release_owner_op(owner), durable=False)
        if released:
            log.warning("released %d queries reserved by stopped server processes in %s", released, self.path)
        return released

    @staticmethod
    def _release_owner_op(owner: str) -> Commit:
        def op(db: sqlite3.Connection) -> int:
            rows = db.execute("DELETE FROM reservations WHERE owner = ? RETURNING key_id, n", (owner,)).fetchall()
            per_key: dict[str, int] = {}
            for kid, n in rows:
                per_key[str(kid)] = per_key.get(str(kid), 0) + int(n)
            for kid, n in per_key.items():
                db.execute("UPDATE api_keys SET reserved = MAX(reserved - ?, 0) WHERE key_id = ?", (n, kid))
            return sum(per_key.values())

        return op


def init_ledger(path: Path) -> Path:
    """Create a new, empty key ledger at ``path`` (``fortress keys init``); return the path.

    Raises:
        ArtifactError: ``path`` already exists (a ledger is never overwritten or re-initialised).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ArtifactError(f"{path} already exists: a key ledger is never overwritten (choose another path)")
    KeyStore(path, create=True).close()
    return path
