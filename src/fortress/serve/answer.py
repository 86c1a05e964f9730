"""Answering one predict request: decode, reserve, compute, monitor, render and charge on one worker thread.

:meth:`Service.prepare` runs the whole preparation of an answer in a single thread hop — decoding
the body, reserving the batch's queries in the ledger, waiting for an inference slot, running the
defense and the monitor's step, rendering the answer's JSON and, last, charging it durably — so the
event loop only reads the body and sends; under load every hand-off between threads costs a
scheduling delay. Its :class:`Job` is the handshake with the waiting request: a request that gives
up (timeout) before the charge begins releases the reservation, and once the charge has begun the
answer is sent; an answer that is not sent is never charged and never stays reserved.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pydantic_core
import torch
from torch import Tensor

from fortress.defenses import Defense, DefenseOutput
from fortress.errors import BudgetExceeded, FortressError
from fortress.monitor.service import Watch
from fortress.monitor.store import ProfileRecord, ProfileStore
from fortress.oracle import OutputMode, apply_output_mode
from fortress.serve.body import BodyBudget
from fortress.serve.keys import ApiKey, Commit, KeyStore, Reservation
from fortress.serve.metrics import Metrics
from fortress.serve.settings import ServeSettings
from fortress.serve.timing import PaddedCompute

__all__ = ["Job", "Prepared", "Service", "Unavailable", "answer_tail", "profile_commit"]


class Unavailable(FortressError):
    """The batch could not be answered in time (HTTP 503; nothing charged)."""


@dataclass(frozen=True)
class Prepared:
    """An answer ready to be sent (charged), or to be held and then charged (``charged is None``).

    Attributes:
        res: the batch's reservation.
        head: the answer's JSON up to its counters (see :func:`answer_tail`).
        n: images in the batch.
        seconds: inference time.
        exits: images per exit (DNF) or ``None``.
        delay_s: how long to hold the answer before charging and sending it (the ``throttle`` response).
        record: the batch's profile increment, committed with the charge (``None``: profiles off).
        charged: the key's record after the charge, or ``None`` while the answer is held.
    """

    res: Reservation
    head: bytes
    n: int
    seconds: float
    exits: list[int] | None
    delay_s: float
    record: ProfileRecord | None
    charged: ApiKey | None


class Job:
    """The handshake between a waiting request and the thread preparing its answer.

    The request may give up (timeout) only before the thread starts charging; from then on the
    answer is charged and the request sends it. Whichever side sees the other's move releases the
    reservation, so a batch whose answer is not sent is neither charged nor left reserved.
    """

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._state = "open"  # open -> abandoned | charging
        self.res: Reservation | None = None

    def hold(self, res: Reservation) -> None:
        """Record the batch's reservation (the thread's side); an abandoned job releases it at once."""
        with self._lock:
            if self._state == "open":
                self.res = res
                return
        self._store.release(res)
        raise Unavailable("the request gave up while its batch was admitted; nothing was charged")

    def begin_charge(self) -> bool:
        """The thread is about to charge: ``False`` if the request gave up already (nothing to charge)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "charging"
            return True

    def abandon(self) -> bool:
        """The request gives up: ``False`` if the charge has begun (the answer must then be sent)."""
        with self._lock:
            if self._state == "charging":
                return False
            self._state = "abandoned"
            res, self.res = self.res, None
        if res is not None:
            self._store.release_async(res)
        return True

    def fail(self) -> None:
        """The thread failed: release the reservation whatever the state (idempotent)."""
        with self._lock:
            self._state = "abandoned"
            res, self.res = self.res, None
        if res is not None:
            self._store.release(res)


class Service:
    """The loaded defense, the key ledger, monitoring and the limits shared by every request.

    Args:
        settings: the server's settings.
        defense: the loaded defense.
        store: the key ledger (opened from ``settings.keys_path``; closed by :meth:`close`).
        watch: profiles and monitoring (``None``: off).
        padded: the ``padded`` compute mode's clock (``None``: another mode).
    """

    def __init__(
        self,
        settings: ServeSettings,
        defense: Defense,
        store: KeyStore,
        watch: Watch | None,
        padded: PaddedCompute | None,
    ) -> None:
        self.settings = settings
        self.defense = defense
        self.store = store
        self.watch = watch
        self.padded = padded
        self.metrics = Metrics()
        self.slots = threading.BoundedSemaphore(settings.inference_workers)
        self.bodies = BodyBudget(settings.buffered_bodies * settings.max_body_bytes)
        # threads preparing answers: a few more than the inference slots, so decoding and charging
        # overlap inference; not one per request, as Python-bound threads queue for the interpreter
        # lock and every one of them delays the event loop that sends the answers
        self.pool = ThreadPoolExecutor(max_workers=2 * settings.inference_workers + 2, thread_name_prefix="answer")

    def close(self) -> None:
        """Close the ledger (this process's open reservations are released) and the profile store."""
        self.pool.shutdown(wait=True)
        self.store.close()
        if self.watch is not None:
            self.watch.close()

    def reserve(self, key_id: str, n: int) -> Reservation:
        """Reserve ``n`` queries (a refusal is counted in the metrics)."""
        try:
            return self.store.reserve(key_id, n)
        except BudgetExceeded:
            self.metrics.observe_refusal(key_id, "budget")
            raise

    def prepare(self, job: Job, decode: Callable[[], Tensor], key: ApiKey, deadline: float) -> Prepared:
        """Decode, reserve, compute, monitor, render and charge one batch (on a worker thread).

        The charge comes last, once the answer's bytes are ready; a held (throttled) answer is
        returned uncharged.

        Raises:
            InvalidInput / TooLarge: a bad body (nothing reserved).
            BudgetExceeded: the batch would pass the key's budget (nothing reserved).
            Unavailable: no inference slot before ``deadline``, or the request gave up (released).
        """
        x = decode()
        n = int(x.shape[0])
        job.hold(self.reserve(key.key_id, n))
        try:
            out, seconds = self._infer(x, deadline)
            probs, mode, delay, record = out.probs, key.output_mode, 0.0, None
            if self.watch is not None:
                ans = self.watch.assess(key.key_id, x, out.probs, out.exits)
                probs, delay, record = ans.probs, ans.delay_s, ans.record
                mode = OutputMode.HARD if ans.labels_only else mode
            if self.padded is not None:  # hold the answer until the full path's time (the slot is free meanwhile)
                self.padded.pad(n, seconds)
            exits = None
            if out.exits is not None and self.defense.num_exits:
                exits = torch.bincount(out.exits, minlength=self.defense.num_exits).tolist()
            head = _answer_head(mode, probs, key.top_k)
            res = job.res
            assert res is not None
            charged = None
            if not delay:
                if not job.begin_charge():
                    raise Unavailable("the request gave up before its answer was ready; nothing was charged")
                charged = self.store.commit(res, also=profile_commit(record))
            return Prepared(res, head, n, seconds, exits, delay, record, charged)
        except BaseException:
            job.fail()
            raise

    def _infer(self, x: Tensor, deadline: float) -> tuple[DefenseOutput, float]:
        if not self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Unavailable("server busy: no inference slot freed up in time; nothing was charged")
        try:
            if time.monotonic() > deadline:  # the client has been answered 503 already
                raise Unavailable("request timed out while queued; nothing was charged")
            t0 = time.perf_counter()
            with torch.inference_mode():
                xd = x.to(self.defense.device)  # the defense's device; answers come back to the CPU
                out = (self.defense.respond(xd) if self.padded is None else self.padded.respond(xd)).to("cpu")
            return out, time.perf_counter() - t0
        finally:
            self.slots.release()


def profile_commit(record: ProfileRecord | None) -> Commit | None:
    """The profile increment to commit with a charge."""
    if record is None:
        return None
    return lambda db: ProfileStore.apply(db, record)


def _answer_head(mode: OutputMode, probs: Tensor, top_k: int) -> bytes:
    """The answer's JSON up to its counters (rendered before the charge, so the charge is the last step).

    Floats are written by pydantic-core (shortest round-trip form, as ``json.dumps`` writes them, at
    a tenth of the time: ~35 µs for 64 rows of 10).
    """
    labels = pydantic_core.to_json(probs.argmax(1).tolist())
    rows = pydantic_core.to_json(None if mode is OutputMode.HARD else apply_output_mode(probs, mode, top_k).tolist())
    return b'{"output_mode":"' + mode.value.encode() + b'","labels":' + labels + b',"probabilities":' + rows


def answer_tail(n: int, key: ApiKey) -> bytes:
    """The counters after the charge (see :class:`~fortress.serve.schemas.PredictResponse`)."""
    return (
        f',"queries_charged":{n},"queries_used":{key.used},"budget":{json.dumps(key.budget)},'
        f'"budget_left":{json.dumps(key.budget_left)}}}'
    ).encode()
