"""Several detectors on one stream: a key is flagged as soon as any of them flags it.

The exit-profile test and PRADA look at different things: ``exit-sprt`` sees where queries leave
DNF (attack traffic that DNF recognises as out-of-distribution leaves early), PRADA sees how the
queries are spread in input space (synthetic steps around a few seeds are not normally spread).
Traffic that looks in-distribution to DNF — JBDA's small steps around real digits — passes the
first and is caught by the second; data-free and natural-image traffic is caught by the first
within a handful of queries. The union's false-positive rate is at most the sum of its members'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Verdict

__all__ = ["AnyOf"]


class AnyOf(Monitor):
    """Flag a key when any member flags it (``fortress serve --monitor exit-sprt+prada``).

    The verdict's ``score`` and ``threshold`` are those of the member that flagged first (of the
    first member while none has); ``flagged_at`` is the earliest flag among the members.

    Args:
        members: the detectors, fed the same batches in order.

    Example:
        >>> from fortress.monitor.prada import Prada
        >>> AnyOf([Prada(), Prada(delta=0.95)]).verdict("k").flagged
        False
    """

    name: ClassVar[str] = "any-of"

    def __init__(self, members: Sequence[Monitor]) -> None:
        if len(members) < 2:
            raise ConfigError(f"a union of monitors needs at least 2 members, got {len(members)}")
        self.members = list(members)

    def _combine(self, verdicts: list[Verdict]) -> Verdict:
        flagged = [v for v in verdicts if v.flagged_at is not None]
        if not flagged:
            return verdicts[0]
        return min(flagged, key=lambda v: v.flagged_at or 0)

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        return self._combine([m.observe(key_id, images, probs, exits) for m in self.members])

    def verdict(self, key_id: str) -> Verdict:
        return self._combine([m.verdict(key_id) for m in self.members])

    def state(self, key_id: str) -> dict[str, Any] | None:
        states = [m.state(key_id) for m in self.members]
        return None if all(s is None for s in states) else {"members": states}

    def restore(self, key_id: str, state: dict[str, Any]) -> None:
        for member, saved in zip(self.members, state.get("members", []), strict=False):
            if saved is not None:
                member.restore(key_id, saved)

    def reset(self, key_id: str) -> None:
        for member in self.members:
            member.reset(key_id)
