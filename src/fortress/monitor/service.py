"""The server side of monitoring: per-key profiles, a detector, persistence and the response to flags.

:class:`Watch` is what ``fortress serve`` calls once per answered batch. It updates the key's
:class:`~fortress.monitor.profile.KeyProfile`, feeds the batch to the configured monitor, saves both
in the ledger file (:class:`~fortress.monitor.store.ProfileStore`) and, for a flagged key, turns
the answer into what the configured :class:`~fortress.monitor.base.Response` allows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fortress.defenses import DNF, Defense
from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Response, Verdict
from fortress.monitor.exit_sprt import ExitSPRT
from fortress.monitor.profile import KeyProfile
from fortress.monitor.store import ProfileStore

__all__ = ["ALERT_LOGGER", "Answer", "Watch", "first_exit_probs"]

log = logging.getLogger(__name__)
ALERT_LOGGER = "fortress.monitor.alert"


def first_exit_probs(defense: Defense) -> Callable[[Tensor], Tensor]:
    """A function answering images with DNF's first exit (the ``degrade-exit0`` response).

    Raises:
        ConfigError: ``defense`` is not a DNF.
    """
    if not isinstance(defense, DNF):
        raise ConfigError(f"the degrade-exit0 response needs a DNF defense, got {defense.name!r}")

    def answer(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.softmax(defense.net.forward_all(x).mean_logits[0], dim=1)

    return answer


@dataclass(frozen=True)
class Answer:
    """What the server sends for one batch after monitoring.

    Attributes:
        probs: ``(B, K)`` rows to answer with (degraded for a flagged key under ``degrade-exit0``).
        labels_only: answer with labels only (``degrade-label`` for a flagged key).
        delay_s: seconds to hold the answer back (``throttle`` for a flagged key).
        verdict: the monitor's verdict (``None`` without a monitor).
    """

    probs: Tensor
    labels_only: bool
    delay_s: float
    verdict: Verdict | None


class Watch:
    """Per-key profiles and monitoring for the server (module docstring).

    Args:
        path: the key ledger file (profiles live in its ``key_profiles`` table).
        num_exits: exits of the served defense (0: none).
        monitor: the detector, or ``None`` to keep profiles only.
        response: what a flagged key gets.
        exit0: first-exit answers (needed by ``degrade-exit0``; see :func:`first_exit_probs`).
        webhook: URL the ``alert`` response POSTs a JSON event to (``None``: log line only).
        throttle_s_per_query: ``throttle`` delay per image of a flagged key's requests.
        flush_s: a key's profile is written to the ledger at most this often (and at once when the
            key is flagged, and on :meth:`close`), keeping the write off most batches' path.
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
        flush_s: float = 1.0,
    ) -> None:
        if response is Response.DEGRADE_EXIT0 and exit0 is None:
            raise ConfigError("the degrade-exit0 response needs the defense's first exit (a DNF)")
        if throttle_s_per_query < 0:
            raise ConfigError(f"throttle_s_per_query must be >= 0, got {throttle_s_per_query}")
        self.store = ProfileStore(path)
        self.num_exits = num_exits
        self.monitor = monitor
        self.response = response
        self.exit0 = exit0
        self.webhook = webhook
        self.throttle_s_per_query = throttle_s_per_query
        self.flush_s = flush_s
        self._profiles: dict[str, KeyProfile] = {}
        self._saved_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Write every profile not yet saved and close the ledger connection."""
        with self._lock:
            for key_id in self._profiles:
                self._save(key_id)
        self.store.close()

    def _save(self, key_id: str) -> None:
        verdict = None if self.monitor is None else self.monitor.verdict(key_id)
        self.store.save(
            key_id,
            self._profiles[key_id].as_dict(),
            monitor=None if self.monitor is None else self.monitor.name,
            state=None if self.monitor is None else self.monitor.state(key_id),
            flagged_at=None if verdict is None else verdict.flagged_at,
        )
        self._saved_at[key_id] = time.monotonic()

    def _profile(self, key_id: str) -> KeyProfile:
        prof = self._profiles.get(key_id)
        if prof is None:  # first batch since start: continue from the ledger
            rec = self.store.load(key_id)
            prof = KeyProfile(num_exits=self.num_exits)
            if rec is not None and int(rec["profile"].get("num_exits", -1)) == self.num_exits:
                prof = KeyProfile.from_dict(rec["profile"])
                if self.monitor is not None and rec["monitor"] == self.monitor.name and rec["state"] is not None:
                    self.monitor.restore(key_id, rec["state"])
            self._profiles[key_id] = prof
        return prof

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Answer:
        """Record one answered batch of ``key_id`` and return the answer to send."""
        with self._lock:
            prof = self._profile(key_id)
            prof.update(probs, exits)
            verdict = was = None
            if self.monitor is not None:
                was = self.monitor.verdict(key_id).flagged
                verdict = self.monitor.observe(key_id, images, probs, exits)
            newly = verdict is not None and verdict.flagged and not was
            if newly or time.monotonic() - self._saved_at.get(key_id, -float("inf")) >= self.flush_s:
                self._save(key_id)
        if verdict is None or not verdict.flagged:
            return Answer(probs, False, 0.0, verdict)
        if not was:
            self._announce(verdict)
        n = int(probs.shape[0])
        if self.response is Response.DEGRADE_LABEL:
            return Answer(probs, True, 0.0, verdict)
        if self.response is Response.DEGRADE_EXIT0:
            assert self.exit0 is not None
            return Answer(self.exit0(images), False, 0.0, verdict)
        if self.response is Response.THROTTLE:
            return Answer(probs, False, n * self.throttle_s_per_query, verdict)
        return Answer(probs, False, 0.0, verdict)

    def _announce(self, verdict: Verdict) -> None:
        what = self.monitor.name if self.monitor is not None else "monitor"
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
        over from this point, so the key is flagged again only by new evidence. The cleared state is
        written to the ledger at once. Returns :meth:`profile` after the reset.
        """
        with self._lock:
            self._profile(key_id)
            if self.monitor is not None:
                self.monitor.reset(key_id)
            self._save(key_id)
        log.warning("API key %s: monitor flag and evidence reset", key_id)
        return self.profile(key_id)

    def profile(self, key_id: str) -> dict[str, Any]:
        """The key's profile, monitor verdict and the ID reference (what ``GET .../profile`` shows)."""
        with self._lock:
            prof = self._profile(key_id).as_dict()
            verdict = None if self.monitor is None else self.monitor.verdict(key_id).as_dict()
        reference = self.monitor.calibration.id_profile if isinstance(self.monitor, ExitSPRT) else None
        return {
            "key_id": key_id,
            "profile": prof,
            "monitor": None if self.monitor is None else self.monitor.name,
            "verdict": verdict,
            "id_reference": reference,
        }
