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
        mode: ``"round-robin"`` (each batch from the next key) or ``"bursts"`` (each key spends
            ``per_key`` queries, then the next key starts).
        per_key: queries per key in ``"bursts"`` mode.
        created_at: creation time of every key (seconds; all in one window: the Sybil case).
    """

    keys: int = 1
    mode: Literal["round-robin", "bursts"] = "round-robin"
    per_key: int = 100
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if self.keys < 1 or self.per_key < 1 or self.mode not in ("round-robin", "bursts"):
            raise ConfigError(f"need keys >= 1, per_key >= 1, mode round-robin|bursts; got {self}")

    def key(self, batch_index: int, queries_before: int) -> str:
        """The key that sends batch ``batch_index`` (0-based), after ``queries_before`` queries in all."""
        if self.mode == "round-robin":
            return f"key-{batch_index % self.keys}"
        return f"key-{min(queries_before // self.per_key, self.keys - 1)}"


@dataclass
class _Log:
    flags: list[dict[str, Any]] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)
    queries: int = 0
    batches: int = 0
    degraded: int = 0


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
        self.log = _Log()

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
        key = self.plan.key(self.log.batches, self.log.queries)
        before = self.log.queries
        self.log.batches += 1
        self.log.queries += int(x.shape[0])
        if self.monitor is not None:
            v = self.monitor.observe(key, x, out.probs, out.exits)
            if v.flagged and v.flagged_at is not None:
                # the key's own query index → the attacker's (the key's count before this batch is v.queries - B)
                self._flag(key, self.monitor.name, before + v.flagged_at - (v.queries - int(x.shape[0])))
        if self.population is not None and self.dadd is not None:
            feats = self.dadd.featurize(x, out.probs)
            flag = self.population.add(key, self.plan.created_at, feats, out.probs.argmax(1), out.exits)
            if flag is not None:
                for k in flag.contributing:
                    self._flag(k, "population", self.log.queries)
        if key not in self.log.flagged or self.response is Response.LOG:
            return out
        self.log.degraded += int(x.shape[0])
        if self.response is Response.DEGRADE_LABEL:
            rows = torch.nn.functional.one_hot(out.probs.argmax(1), out.probs.shape[1]).to(out.probs.dtype)
            return DefenseOutput(rows, out.exits)
        assert isinstance(self.defense, DNF)
        with torch.inference_mode():
            probs = torch.softmax(self.defense.net.forward_all(x).mean_logits[0], dim=1)
        return DefenseOutput(probs, out.exits)


def find_dadd(monitor: Monitor | None) -> DADD | None:
    """``monitor`` itself when it is ``dadd``, its ``dadd`` member when it is a union, else ``None``."""
    if isinstance(monitor, DADD):
        return monitor
    for member in getattr(monitor, "members", []):
        if isinstance(member, DADD):
            return member
    return None
