"""The monitor contract: per-key detectors of extraction traffic, fed one answered batch at a time.

A :class:`Monitor` watches every key's stream of answered queries and says, after each batch,
whether the key looks like an extraction attack. Flags are sticky: once a key is flagged it stays
flagged (the server's :class:`Response` then applies to it) until an operator resets it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from torch import Tensor

__all__ = ["Monitor", "Response", "Verdict"]


class Response(str, Enum):
    """What the server does to a flagged key.

    ``log``: one warning line when the key is flagged; ``alert``: the same on the
    ``fortress.monitor.alert`` logger plus a POST to the configured webhook; ``throttle``: every
    later request of the key is delayed in proportion to its images; ``degrade-label``: answers
    carry the top-1 label only; ``degrade-exit0``: answers come from DNF's first exit (trained to
    mislead out-of-distribution queries, paper Eq. 7); ``misinform``: answers relabelled by a
    secret derangement of the classes (:class:`fortress.monitor.misinform.Misinformation`), so a
    clone trained on them learns a consistent wrong function; ``misinform-id``: the same relabelling
    for the answers DNF gives at a later exit than its first (queries that look in-distribution),
    while its first exit's answers (already trained to mislead) go out as they are.
    """

    LOG = "log"
    ALERT = "alert"
    THROTTLE = "throttle"
    DEGRADE_LABEL = "degrade-label"
    DEGRADE_EXIT0 = "degrade-exit0"
    MISINFORM = "misinform"
    MISINFORM_ID = "misinform-id"

    @property
    def relabels(self) -> bool:
        """Whether the response relabels answers by the secret derangement."""
        return self in (Response.MISINFORM, Response.MISINFORM_ID)


@dataclass(frozen=True)
class Verdict:
    """A monitor's judgement of one key after a batch.

    Attributes:
        key_id: the key.
        flagged: the key is (or has been) flagged.
        queries: queries of the key observed so far.
        flagged_at: 1-based index of the query at which the key was first flagged, or ``None``.
        score: the detector's current statistic (CUSUM for ``exit-sprt``, Shapiro–Wilk W for ``prada``).
        threshold: the value of ``score`` that flags (above it for ``exit-sprt``, below for ``prada``).
    """

    key_id: str
    flagged: bool
    queries: int
    flagged_at: int | None
    score: float
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "flagged": self.flagged,
            "queries": self.queries,
            "flagged_at": self.flagged_at,
            "score": self.score,
            "threshold": self.threshold,
        }


class Monitor(ABC):
    """Base class of the detectors in :data:`fortress.monitor.MONITORS`.

    Subclasses keep per-key state and implement :meth:`observe`; they see the images, the
    defense's probability rows (before any output mode) and the exits, never the attack.

    Attributes:
        name: registry name.
    """

    name: ClassVar[str] = "monitor"

    @abstractmethod
    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        """Add one answered batch of ``key_id`` and return the key's verdict.

        Args:
            key_id: whose queries these are.
            images: ``(B, C, H, W)`` queries in [0, 1].
            probs: ``(B, K)`` the defense's probability rows.
            exits: ``(B,)`` exit per query, or ``None`` for defenses without exits.
        """

    @abstractmethod
    def verdict(self, key_id: str) -> Verdict:
        """The key's current verdict without adding anything (an unseen key: not flagged, 0 queries)."""

    def state(self, key_id: str) -> dict[str, Any] | None:
        """JSON-ready per-key state to persist (``None``: this monitor does not persist its state)."""
        return None

    def restore(self, key_id: str, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Load a key's state saved by :meth:`state`."""

    @abstractmethod
    def reset(self, key_id: str) -> None:
        """Forget a key (clears its flag)."""
