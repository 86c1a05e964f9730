"""The server side of monitoring: per-key profiles, a detector, persistence and the response to flags.

:class:`Watch` is what ``fortress serve`` calls once per answered batch. It computes the batch's
:class:`~fortress.monitor.profile.KeyProfile` increment, feeds the batch to the configured monitor,
reads the key's flag from the ledger (:class:`~fortress.monitor.store.ProfileStore`: a flag raised by
any process counts) and, for a flagged key, turns the answer into what the configured
:class:`~fortress.monitor.base.Response` allows. The increment, the evidence and a newly raised
flag go to the ledger in the same transaction as the batch's charge.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Response, Verdict
from fortress.monitor.closed_loop import find_dadd, first_exit_probs
from fortress.monitor.exit_sprt import ExitSPRT
from fortress.monitor.misinform import relabel
from fortress.monitor.population import PopulationDrift
from fortress.monitor.profile import KeyProfile
from fortress.monitor.step import WindowSteps
from fortress.monitor.store import ProfileRecord, ProfileStore

__all__ = ["ALERT_LOGGER", "Answer", "Watch", "first_exit_probs"]

log = logging.getLogger(__name__)
ALERT_LOGGER = "fortress.monitor.alert"


@dataclass(frozen=True)
class Answer:
    """What the server sends for one batch after monitoring, and what the batch adds to the ledger.

    Attributes:
        probs: ``(B, K)`` rows to answer with (for a flagged key: replaced under ``degrade-exit0``
            and the ``misinform`` responses).
        labels_only: answer with labels only (``degrade-label`` for a flagged key).
        delay_s: seconds to hold the answer back (``throttle`` for a flagged key).
        verdict: the monitor's verdict, flagged also when another process flagged the key
            (``None`` without a monitor).
        record: the batch's profile increment, state and new flag, to commit with the batch's charge.
        flagged: the key is flagged (by this process or, as stored in the ledger, by any).
    """

    probs: Tensor
    labels_only: bool
    delay_s: float
    verdict: Verdict | None
    record: ProfileRecord | None = None
    flagged: bool = False


class Watch:
    """Per-key profiles and monitoring for the server (module docstring).

    Profiles and flags live in the ledger (:class:`~fortress.monitor.store.ProfileStore`), shared by
    every server process on the file: each batch adds its own counts, a raised flag is stored at once
    and honoured by every process from its next batch of the key on, and an operator's reset (from
    any process or the CLI) makes every process drop its evidence for the key. The monitor's evidence
    itself is per process (restored from the ledger when a process first sees the key).

    Args:
        path: the key ledger file (profiles live in its ``key_profiles`` table).
        num_exits: exits of the served defense (0: none).
        monitor: the detector, or ``None`` to keep profiles only.
        response: what a flagged key gets.
        exit0: first-exit answers (needed by ``degrade-exit0``; see :func:`first_exit_probs`).
        misinform: the relabelling of a flagged key's answers (needed by ``misinform`` and
            ``misinform-id``; see :class:`~fortress.monitor.misinform.Misinformation`).
        webhook: URL the ``alert`` response POSTs a JSON event to (``None``: log line only).
        throttle_s_per_query: ``throttle`` delay per image of a flagged key's requests.
        population: drift test over all keys created in a window (the Sybil case); it pools the
            features of ``monitor``'s ``dadd`` member, and a key that contributed to a flagged window
            is flagged like one the monitor flagged (``None``: per-key monitoring only).
        created_at: a key's creation time in epoch seconds (needed with ``population``).
        window_steps: ``step`` over all keys created in one window as one stream
            (:class:`~fortress.monitor.step.WindowSteps`; JBDA spread over keys); its contributing
            keys are flagged like the population detector's (``None``: none).
    """

    def __init__(
        self,
        path: Path,
        *,
        num_exits: int,
        monitor: Monitor | None = None,
        response: Response = Response.LOG,
        exit0: Callable[[Tensor], Tensor] | None = None,
        webhook: str | None = None,
        throttle_s_per_query: float = 0.01,
        population: PopulationDrift | None = None,
        created_at: Callable[[str], float] | None = None,
        window_steps: WindowSteps | None = None,
        misinform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if population is not None and (find_dadd(monitor) is None or created_at is None):
            raise ConfigError("the population detector needs a monitor with dadd and the keys' creation times")
        if window_steps is not None and (monitor is None or created_at is None):
            raise ConfigError("the window-wide step detector needs a monitor and the keys' creation times")
        if response is Response.DEGRADE_EXIT0 and exit0 is None:
            raise ConfigError("the degrade-exit0 response needs the defense's first exit (a DNF)")
        if response.relabels and misinform is None:
            raise ConfigError(f"the {response.value} response needs its relabelling (fortress.monitor.Misinformation)")
        if throttle_s_per_query < 0:
            raise ConfigError(f"throttle_s_per_query must be >= 0, got {throttle_s_per_query}")
        self.store = ProfileStore(path)
        self.num_exits = num_exits
        self.monitor = monitor
        self.response = response
        self.exit0 = exit0
        self.misinform = misinform
        self.webhook = webhook
        self.throttle_s_per_query = throttle_s_per_query
        self.population = population
        self.window_steps = window_steps
        self.created_at = created_at
        self._population_flagged: set[str] = set()
        self._announced: set[str] = set()
        self._epochs: dict[str, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the ledger connection (every answered batch is already stored)."""
        self.store.close()

    def _sync(self, key_id: str) -> tuple[int | None, int]:
        """The key's stored flag and epoch; on first sight or after a reset, reload this process's evidence."""
        flagged_at, epoch = self.store.flag(key_id)
        if self._epochs.get(key_id) != epoch:
            if self.monitor is not None:
                self.monitor.reset(key_id)
                rec = self.store.load(key_id)
                if rec is not None and rec["monitor"] == self.monitor.name and rec["state"] is not None:
                    self.monitor.restore(key_id, rec["state"])
            self._epochs[key_id] = epoch
        return flagged_at, epoch

    def _verdict(self, key_id: str, stored_flag: int | None) -> Verdict | None:
        if self.monitor is None:
            return None
        verdict = self.monitor.verdict(key_id)
        if stored_flag is not None and not verdict.flagged:  # flagged by another process
            verdict = replace(verdict, flagged=True, flagged_at=stored_flag)
        return verdict

    def assess(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Answer:
        """Judge one answered batch of ``key_id``; return the answer to send and the record to commit.

        Nothing is stored: the server commits ``answer.record`` with the batch's charge
        (:meth:`ProfileStore.apply`); :meth:`observe` stores it at once.
        """
        delta = KeyProfile(num_exits=self.num_exits)
        delta.update(probs, exits)
        newly = None
        with self._lock:
            stored_flag, epoch = self._sync(key_id)
            state = None
            if self.monitor is not None:
                was = self.monitor.verdict(key_id).flagged
                now = self.monitor.observe(key_id, images, probs, exits)
                state = self.monitor.state(key_id)
                if now.flagged and not was:
                    newly = now
                newly = self._population(key_id, images, probs, exits, now, was or stored_flag is not None, newly)
                newly = self._window_steps(key_id, images, probs, now, was or stored_flag is not None, newly)
            verdict = self._verdict(key_id, stored_flag)
        record = ProfileRecord(
            key_id,
            delta,
            monitor=None if self.monitor is None else self.monitor.name,
            state=state,
            flagged_at=None if newly is None else newly.flagged_at,
            epoch=epoch,
        )
        if stored_flag is None and newly is None and (verdict is None or not verdict.flagged):
            return Answer(probs, False, 0.0, verdict, record, False)
        if newly is not None and stored_flag is None and key_id not in self._announced:
            self._announce(newly)
        n = int(probs.shape[0])
        if self.response is Response.DEGRADE_LABEL:
            return Answer(probs, True, 0.0, verdict, record, True)
        if self.response is Response.DEGRADE_EXIT0:
            assert self.exit0 is not None
            return Answer(self.exit0(images), False, 0.0, verdict, record, True)
        if self.response.relabels:
            assert self.misinform is not None
            return Answer(relabel(self.misinform, self.response, probs, exits), False, 0.0, verdict, record, True)
        if self.response is Response.THROTTLE:
            return Answer(probs, False, n * self.throttle_s_per_query, verdict, record, True)
        return Answer(probs, False, 0.0, verdict, record, True)

    def _population(
        self,
        key_id: str,
        images: Tensor,
        probs: Tensor,
        exits: Tensor | None,
        now: Verdict,
        already: bool,
        newly: Verdict | None,
    ) -> Verdict | None:
        """Feed the batch to the population detector; a newly contributing key gets a flag at its last query."""
        dadd = find_dadd(self.monitor)
        if self.population is None or dadd is None or self.created_at is None:
            return newly
        flag = self.population.add(
            key_id, self.created_at(key_id), dadd.featurize(images, probs), probs.argmax(1), exits
        )
        if flag is None:
            return newly
        threshold = self.population.calibration.threshold
        # keys of the window that contributed but send nothing more: their flag is stored now
        for other in flag.contributing:
            if other != key_id and other not in self._population_flagged:
                self._flag_other(other, self.population.queries(other), flag.score, threshold, "population")
        if already or newly is not None or not self.population.flagged(key_id) or key_id in self._population_flagged:
            return newly
        return self._flag_this(key_id, now, flag.score, threshold, "population")

    def _flag_this(self, key_id: str, now: Verdict, score: float, threshold: float, by: str) -> Verdict:
        """Flag the key whose batch is being judged, found by a detector across keys, at its last query."""
        self._population_flagged.add(key_id)
        verdict = Verdict(key_id, True, now.queries, now.queries, score, threshold)
        self._announce(verdict, by=by)
        self._announced.add(key_id)
        return verdict

    def _flag_other(self, other: str, at: int, score: float, threshold: float, by: str) -> None:
        """Store and announce the flag of a key found by a detector across keys (while another key's batch ran)."""
        self._population_flagged.add(other)
        _, epoch = self.store.flag(other)
        rec = ProfileRecord(
            other, KeyProfile(num_exits=self.num_exits), monitor=self.monitor_name, flagged_at=at, epoch=epoch
        )
        self.store.save(rec)
        self._announce(Verdict(other, True, at, at, score, threshold), by=by)

    def _window_steps(
        self, key_id: str, images: Tensor, probs: Tensor, now: Verdict, already: bool, newly: Verdict | None
    ) -> Verdict | None:
        """Feed the batch to the window-wide ``step``; flag its contributing keys (this one: returned)."""
        if self.window_steps is None or self.created_at is None:
            return newly
        ws = self.window_steps
        contributing = ws.add(key_id, self.created_at(key_id), images, probs)
        for other in contributing:
            if other != key_id and other not in self._population_flagged:
                self._flag_other(other, ws.queries(other), *ws.evidence(other), "population-step")
        if already or newly is not None or key_id not in contributing or key_id in self._population_flagged:
            return newly
        return self._flag_this(key_id, now, *ws.evidence(key_id), "population-step")

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Answer:
        """:meth:`assess` one answered batch and store its record at once; return the answer to send."""
        answer = self.assess(key_id, images, probs, exits)
        assert answer.record is not None
        self.store.save(answer.record)
        return answer

    @property
    def monitor_name(self) -> str | None:
        """The monitor's registry name (``None``: profiles only)."""
        return None if self.monitor is None else self.monitor.name

    def _announce(self, verdict: Verdict, *, by: str | None = None) -> None:
        what = by or (self.monitor.name if self.monitor is not None else "monitor")
        msg = (
            f"API key {verdict.key_id} flagged by {what} at query {verdict.flagged_at} "
            f"(score {verdict.score:.4g}, threshold {verdict.threshold:.4g}); response: {self.response.value}"
        )
        if self.response is not Response.ALERT:
            log.warning(msg)
            return
        logging.getLogger(ALERT_LOGGER).warning(msg)
        if self.webhook:
            event = {"event": "key_flagged", "monitor": what, "response": self.response.value, **verdict.as_dict()}
            threading.Thread(
                target=self._post, args=(self.webhook, {"key_id": verdict.key_id, **event}), daemon=True
            ).start()

    @staticmethod
    def _post(url: str, event: dict[str, Any]) -> None:
        try:
            import httpx

            httpx.post(url, json=event, timeout=5.0).raise_for_status()
        except Exception as exc:  # an unreachable webhook must never break serving
            log.warning("alert webhook %s failed: %s", url, exc)

    def reset(self, key_id: str) -> dict[str, Any]:
        """Clear a key's flag and restart its monitor's evidence (after an operator's review).

        The profile's statistics (queries, exits, entropy, confidence) are kept; the monitor starts
        over from this point, so the key is flagged again only by new evidence. The cleared flag is
        written to the ledger at once, and every other server process drops its evidence for the key
        on its next batch of it. Returns :meth:`profile` after the reset.
        """
        with self._lock:
            if self.monitor is not None:
                self.monitor.reset(key_id)
            self.store.clear_flag(key_id)
            self._epochs[key_id] = self.store.flag(key_id)[1]
        log.warning("API key %s: monitor flag and evidence reset", key_id)
        return self.profile(key_id)

    def profile(self, key_id: str) -> dict[str, Any]:
        """The key's stored profile, monitor verdict and the ID reference (what ``GET .../profile`` shows)."""
        with self._lock:
            stored_flag, _ = self._sync(key_id)
            verdict = self._verdict(key_id, stored_flag)
        rec = self.store.load(key_id)
        prof = KeyProfile(num_exits=self.num_exits).as_dict() if rec is None else rec["profile"]
        reference = self.monitor.calibration.id_profile if isinstance(self.monitor, ExitSPRT) else None
        return {
            "key_id": key_id,
            "profile": prof,
            "monitor": None if self.monitor is None else self.monitor.name,
            "verdict": None if verdict is None else verdict.as_dict(),
            "id_reference": reference,
        }
