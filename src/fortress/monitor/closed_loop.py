"""DNF + monitor + response as one in-process defense: the closed loop, with one key or many (Sybil).

:class:`Monitored` answers like the server does with monitoring on: the wrapped defense answers
the batch, the per-key monitor and the population detector see it under the key the batch was sent
with, and a flagged key's answer is replaced by the response. Which key sends a batch is the
attacker's choice, modelled by :class:`KeyPlan`: one key, ``N`` keys in turn (round-robin, one
batch each), or ``N`` keys one after the other (bursts of ``budget / N`` queries). Every flag is
recorded (key, detector, the attacker's query index at which it fired) so a result says who was
caught when.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fortress.defenses import DNF, Defense
from fortress.defenses.base import DefenseOutput
from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Response
from fortress.monitor.dadd import DADD
from fortress.monitor.population import PopulationDrift

__all__ = ["KeyPlan", "Monitored", "find_dadd"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPlan:
    """How an attacker spreads its queries over keys.

    Attributes:
        keys: number of keys (1: a single account).
        mode: ``"round-robin"`` (each batch from the next key with budget left, split over the
            following keys where it passes that key's ``per_key``) or ``"bursts"`` (each key spends
            ``per_key`` queries, then the next key starts), as :class:`fortress.bench.sybil.SybilOracle`.
        per_key: each key's query budget (once all are spent, the next key in turn takes the rest).
        created_at: creation time of every key (seconds; all in one window: the Sybil case).
    """

    keys: int = 1
    mode: Literal["round-robin", "bursts"] = "round-robin"
    per_key: int = 100
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if self.keys < 1 or self.per_key < 1 or self.mode not in ("round-robin", "bursts"):
            raise ConfigError(f"need keys >= 1, per_key >= 1, mode round-robin|bursts; got {self}")

    def split(self, n: int, used: list[int], turn: int) -> tuple[list[tuple[int, int, int]], int]:
        """A batch of ``n`` as ``(key, start, stop)`` pieces, given each key's queries so far; and the next turn."""
        pieces = []
        done = 0
        while done < n:
            if self.mode == "bursts":
                k = next((i for i in range(self.keys) if used[i] < self.per_key), self.keys - 1)
            else:
                k = next(
                    ((turn + j) % self.keys for j in range(self.keys) if used[(turn + j) % self.keys] < self.per_key),
                    turn % self.keys,
                )
                turn = k + 1
            room = self.per_key - used[k] if used[k] < self.per_key else n - done
            m = min(room, n - done)
            pieces.append((k, done, done + m))
            used[k] += m
            done += m
        return pieces, turn


@dataclass
class _Log:
    flags: list[dict[str, Any]] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)
    queries: int = 0
    batches: int = 0
    degraded: int = 0
    used: list[int] = field(default_factory=list)
    turn: int = 0


class Monitored(Defense):
    """A defense answered through per-key monitoring, a population detector and a response.

    Args:
        defense: the defense that answers (DNF for ``degrade-exit0``).
        monitor: per-key detector (``None``: none).
        population: detector across keys created in a window (``None``: none); it is fed the
            ``dadd`` features of ``monitor`` (a :class:`DADD` or a union holding one).
        response: what flagged keys get: ``degrade-exit0`` (DNF's first exit), ``degrade-label``
            (top-1 one-hot rows) or ``log`` (answers unchanged, flags recorded).
        plan: which key sends each batch.

    Raises:
        ConfigError: an unsupported response, or ``degrade-exit0`` without a DNF.
    """

    name: ClassVar[str] = "monitored"

    def __init__(
        self,
        defense: Defense,
        *,
        monitor: Monitor | None,
        population: PopulationDrift | None = None,
        response: Response = Response.DEGRADE_EXIT0,
        plan: KeyPlan | None = None,
    ) -> None:
        super().__init__(defense.victim)
        if response not in (Response.DEGRADE_EXIT0, Response.DEGRADE_LABEL, Response.LOG):
            raise ConfigError(f"the closed loop supports degrade-exit0, degrade-label and log, got {response.value!r}")
        if response is Response.DEGRADE_EXIT0 and not isinstance(defense, DNF):
            raise ConfigError(f"degrade-exit0 needs a DNF defense, got {defense.name!r}")
        self.defense = defense
        self.monitor = monitor
        self.population = population
        self.response = response
        self.plan = plan or KeyPlan()
        self.dadd = find_dadd(monitor)
        if population is not None and self.dadd is None:
            raise ConfigError("the population detector pools dadd features: the monitor must include 'dadd'")
        self.log = _Log(used=[0] * self.plan.keys)

    @property
    def num_exits(self) -> int | None:
        return self.defense.num_exits

    def modules(self) -> list[torch.nn.Module]:
        return self.defense.modules()

    def hparams(self) -> dict[str, Any]:
        return {
            "defense": self.defense.hparams(),
            "monitor": None if self.monitor is None else self.monitor.name,
            "population": self.population is not None,
            "response": self.response.value,
            "plan": {"keys": self.plan.keys, "mode": self.plan.mode, "per_key": self.plan.per_key},
        }

    def records(self) -> dict[str, Any]:
        """Who was flagged at which query, and how many answers were degraded."""
        return {
            "flags": list(self.log.flags),
            "keys_flagged": len(self.log.flagged),
            "keys": self.plan.keys,
            "queries": self.log.queries,
            "degraded_answers": self.log.degraded,
        }

    def _flag(self, key: str, by: str, at: int) -> None:
        if key not in self.log.flagged:
            self.log.flagged.add(key)
            self.log.flags.append({"key": key, "by": by, "query": at})
            log.info("key %s flagged by %s at query %d", key, by, at)

    def _respond(self, x: Tensor) -> DefenseOutput:
        out = self.defense.respond(x)
        pieces, self.log.turn = self.plan.split(int(x.shape[0]), self.log.used, self.log.turn)
        self.log.batches += 1
        probs = out.probs.clone()
        for k, start, stop in pieces:
            probs[start:stop] = self._piece(f"key-{k}", x[start:stop], out.probs[start:stop], out.exits, start, stop)
        return DefenseOutput(probs, out.exits)

    def _piece(self, key: str, x: Tensor, probs: Tensor, all_exits: Tensor | None, start: int, stop: int) -> Tensor:
        """Monitor one key's share of a batch; return its answers (the response's for a flagged key)."""
        exits = None if all_exits is None else all_exits[start:stop]
        before = self.log.queries
        n = int(x.shape[0])
        self.log.queries += n
        if self.monitor is not None:
            v = self.monitor.observe(key, x, probs, exits)
            if v.flagged and v.flagged_at is not None:
                # the key's own query index → the attacker's (the key's count before this piece is v.queries - n)
                self._flag(key, self.monitor.name, before + v.flagged_at - (v.queries - n))
        if self.population is not None and self.dadd is not None:
            feats = self.dadd.featurize(x, probs)
            flag = self.population.add(key, self.plan.created_at, feats, probs.argmax(1), exits)
            if flag is not None:
                for k in flag.contributing:
                    self._flag(k, "population", self.log.queries)
        if key not in self.log.flagged or self.response is Response.LOG:
            return probs
        self.log.degraded += n
        if self.response is Response.DEGRADE_LABEL:
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        assert isinstance(self.defense, DNF)
        with torch.inference_mode():
            return torch.softmax(self.defense.net.forward_all(x).mean_logits[0], dim=1)


def find_dadd(monitor: Monitor | None) -> DADD | None:
    """``monitor`` itself when it is ``dadd``, its ``dadd`` member when it is a union, else ``None``."""
    if isinstance(monitor, DADD):
        return monitor
    for member in getattr(monitor, "members", []):
        if isinstance(member, DADD):
            return member
    return None
