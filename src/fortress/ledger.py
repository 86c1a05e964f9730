"""The one way fortress opens its SQLite files (the key ledger and the per-key profiles beside it).

Three pieces, all below ``serve`` and ``monitor``:

* :func:`open_sqlite` opens a ledger in WAL mode, refusing a missing, empty, damaged or foreign file
  with one line naming it (unless asked to create it).
* :class:`GroupCommit` is the process's single writer of a file: write operations share transactions,
  so that many durable commits share one ``fsync`` (group commit, leader/follower).
* :func:`process_owner` / :func:`owner_alive` tell whether the process that wrote a row is still
  running (an ``flock`` held for the process's lifetime), so a restarted server can release what a
  killed one left uncommitted without touching what a live one holds.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from fortress.errors import ArtifactError

__all__ = ["GroupCommit", "ledger_errors", "open_sqlite", "owner_alive", "process_owner", "sweep_owners"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Sync = Literal["NORMAL", "FULL"]


@contextmanager
def ledger_errors(path: Path, what: str = "key ledger") -> Iterator[None]:
    """Turn any SQLite failure inside the block into one :class:`ArtifactError` line naming ``path``."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise ArtifactError(f"{what} {path} is unreadable or damaged: {' '.join(str(exc).split())}") from None
    except sqlite3.Error as exc:
        raise ArtifactError(f"{what} {path} failed: {' '.join(str(exc).split())}") from None


def open_sqlite(
    path: Path,
    schema: str,
    *,
    synchronous: Sync,
    busy_timeout_s: float = 30.0,
    create: bool = False,
    required_table: str | None = None,
) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with autocommit, shared across threads, and apply ``schema``.

    Every statement is its own transaction (``isolation_level=None``) unless the caller opens one;
    callers serialise access with their own lock. ``synchronous="FULL"`` puts each commit on disk
    before it returns; ``"NORMAL"`` may lose the last commits on power loss (never on a process
    crash), never corrupts the file.

    Args:
        path: the SQLite file.
        schema: ``CREATE ... IF NOT EXISTS`` statements applied after opening (migrations included).
        synchronous: see above.
        busy_timeout_s: how long a writer waits for another process's lock.
        create: create a missing file (``fortress keys init``); otherwise a missing file is an error.
        required_table: a table that must already exist (an existing file without it is not ours).

    Raises:
        ArtifactError: ``path`` is missing (and ``create`` is false), empty, damaged, not an SQLite
            file, or lacks ``required_table`` — one line naming the file.
    """
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise ArtifactError(f"no key ledger at {path}: create one with `fortress keys init {path}`")
    elif path.is_dir():
        raise ArtifactError(f"key ledger {path} is a directory, expected an SQLite file")
    elif path.stat().st_size == 0 and not _nonempty(Path(f"{path}-wal")):
        raise ArtifactError(
            f"key ledger {path} is empty (0 bytes): restore it from a backup, or create a new one with "
            f"`fortress keys init` at another path"
        )
    uri = f"file:{path.resolve()}?mode={'rwc' if create else 'rw'}"
    with ledger_errors(path):
        db = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            if not create:
                problems = [str(r[0]) for r in db.execute("PRAGMA quick_check(3)").fetchall()]
                if problems != ["ok"]:
                    detail = " ".join("; ".join(problems).replace("*** in database main ***", "").split())
                    raise ArtifactError(f"key ledger {path} is damaged: {detail[:300]}")
                if required_table is not None and not _has_table(db, required_table):
                    raise ArtifactError(f"{path} is an SQLite file but not a fortress key ledger (no {required_table})")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.executescript(schema)
        except BaseException:
            db.close()
            raise
    return db


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


# --------------------------------------------------------------------------------------------------
# Which process wrote a row: an flock held for the process's lifetime


@dataclass
class _Owner:
    token: str
    fd: int
    users: int = 0


_owners: dict[Path, _Owner] = {}
_owners_lock = threading.Lock()


def _owners_dir(ledger: Path) -> Path:
    return Path(f"{ledger}-owners")


def process_owner(ledger: Path) -> str:
    """This process's owner token for ``ledger`` (held until :func:`drop_owner` balances every call).

    The token names a lock file under ``<ledger>-owners/`` that this process keeps locked
    (``flock``); the kernel drops the lock when the process ends, however it ends. The file is
    locked under a temporary name and then renamed, so no other process ever sees it unlocked
    while its owner lives.
    """
    key = Path(ledger).resolve()
    with _owners_lock:
        own = _owners.get(key)
        if own is None:
            folder = _owners_dir(key)
            folder.mkdir(exist_ok=True)
            token = f"{os.getpid()}-{secrets.token_hex(6)}"
            tmp = folder / f".{token}.tmp"
            fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, folder / f"{token}.lock")
            own = _owners[key] = _Owner(token, fd)
        own.users += 1
        return own.token


def drop_owner(ledger: Path) -> None:
    """Balance one :func:`process_owner` call; the last one unlocks and removes the lock file."""
    key = Path(ledger).resolve()
    with _owners_lock:
        own = _owners.get(key)
        if own is None:
            return
        own.users -= 1
        if own.users > 0:
            return
        del _owners[key]
        (_owners_dir(key) / f"{own.token}.lock").unlink(missing_ok=True)
        os.close(own.fd)


def owner_alive(ledger: Path, token: str) -> bool:
    """Whether the process behind ``token`` still runs (its lock file is locked); removes a dead one's file."""
    key = Path(ledger).resolve()
    with _owners_lock:
        own = _owners.get(key)
        if own is not None and own.token == token:
            return True
    lock = _owners_dir(key) / f"{token}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock we may have taken
    lock.unlink(missing_ok=True)
    return False


def sweep_owners(ledger: Path) -> int:
    """Remove the lock files of processes that no longer run (killed ones leave theirs); return how many."""
    folder = _owners_dir(Path(ledger).resolve())
    if not folder.is_dir():
        return 0
    return sum(not owner_alive(ledger, f.name[: -len(".lock")]) for f in folder.glob("*.lock"))


def _forget_owners_in_child() -> None:  # a forked child is another process: it gets its own token
    global _owners, _owners_lock
    _owners = {}
    _owners_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_owners_in_child)


# --------------------------------------------------------------------------------------------------
# Group commit


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    future: Future[Any] = field(default_factory=Future)


class GroupCommit:
    """The process's writer of one ledger file: write operations share transactions (group commit).

    Each operation is a function of the connection, run inside ``BEGIN IMMEDIATE ... COMMIT`` under
    its own savepoint (an operation that raises is rolled back alone and gets the exception; the
    others commit). Writers follow the leader/follower scheme: a thread that finds no transaction
    running runs its own operation at once, on its own thread (no hand-off); operations that arrive
    while a transaction runs wait, and the first of them to wake runs them all as the next
    transaction — so under load one ``fsync`` makes many commits durable. Durable operations commit
    with ``synchronous=FULL`` (on disk before :meth:`run` returns); the others with ``NORMAL``
    (visible to every process at once, durable against a process crash but not a power cut), in a
    transaction of their own that never waits for a disk flush.

    Args:
        path: the SQLite file (already opened and migrated by the caller).
        busy_timeout_s: how long a transaction waits for another process's write lock.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        # one connection per durability (no PRAGMA switch per transaction); no SQLite busy handler (it
        # sleeps 1, 2, 5, 10 ... ms): _begin waits for another process's lock in tens of microseconds
        self._dbs: dict[Sync, sqlite3.Connection] = {}
        for sync in ("NORMAL", "FULL"):
            self._dbs[sync] = open_sqlite(self.path, "", synchronous=sync, busy_timeout_s=0.0)
        self._queue: list[_Op] = []
        self._cv = threading.Condition()
        self._leading = False
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self.groups = 0  # transactions run (for tests and benchmarks)
        self.ops = 0

    def run(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(connection)`` in the next transaction and return its result once committed.

        Blocks the calling thread (never call it on an event loop: see :meth:`submit`).

        Raises:
            ArtifactError: the writer was closed, or the transaction failed (nothing committed).
            Exception: what ``fn`` raised (only ``fn``'s writes were rolled back).
        """
        op = _Op(fn, durable)
        with self._cv:
            if self._closed:
                raise ArtifactError(f"key ledger {self.path} is closed")
            self._queue.append(op)
            while not op.future.done() and self._leading:
                self._cv.wait()
            if op.future.done():
                return cast(T, op.future.result())
            self._leading = True
            ops, self._queue = self._queue, []
        try:
            self._execute(ops)
        finally:
            with self._cv:
                self._leading = False
                self._cv.notify_all()
        return cast(T, op.future.result())

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> Future[T]:
        """:meth:`run` on a helper thread; for callers that must not block (an event loop)."""
        with self._cv:
            if self._closed:
                raise ArtifactError(f"key ledger {self.path} is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"ledger:{self.path.name}")
            pool = self._pool
        return pool.submit(self.run, fn, durable=durable)

    def close(self) -> None:
        """Wait for submitted operations, then close the connection (later calls raise)."""
        with self._cv:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._cv:
            self._closed = True
            while self._leading:
                self._cv.wait()
        for db in self._dbs.values():
            db.close()

    def _execute(self, ops: list[_Op]) -> None:
        fast = [op for op in ops if not op.durable]
        slow = [op for op in ops if op.durable]
        if fast:
            self._transaction(fast, "NORMAL")
        if slow:
            self._transaction(slow, "FULL")

    def _begin(self, db: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, waiting for another process's write lock in short, growing steps.

        Another server process holds the lock for one transaction (a fraction of a millisecond, plus
        an ``fsync``); SQLite's own busy handler would sleep whole milliseconds, and growing ones.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 20e-6
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def _transaction(self, ops: list[_Op], sync: Sync) -> None:
        results: list[tuple[_Op, Any, BaseException | None]] = []
        db = self._dbs[sync]
        try:
            self._begin(db)
            alone = len(ops) == 1  # no savepoint needed: a failing operation rolls back the whole transaction
            for op in ops:
                if not alone:
                    db.execute("SAVEPOINT op")
                try:
                    value = op.fn(db)
                except Exception as exc:  # this operation alone is rolled back
                    if not alone:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    results.append((op, None, exc))
                else:
                    if not alone:
                        db.execute("RELEASE op")
                    results.append((op, value, None))
            db.execute("ROLLBACK" if alone and results[0][2] is not None else "COMMIT")
        except Exception as exc:  # the whole transaction failed: nothing of it was committed
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed on %s", self.path)
            err = ArtifactError(f"key ledger {self.path} could not commit: {exc}")
            log.error("%s", err)
            for op in ops:
                op.future.set_exception(err)
            return
        self.groups += 1
        self.ops += len(ops)
        for op, value, error in results:
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)
