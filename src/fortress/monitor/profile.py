"""Per-key running statistics of what a key's queries did: exits taken, output entropy and confidence.

DNF's exits are a signal as well as a defense (paper Table 12: extraction traffic leaves at the
first exits far more often than in-distribution traffic), so the server keeps, per API key, the
exit histogram and the running mean and variance of the answers' entropy and top-1 confidence.
Means and variances are merged batch by batch (Chan et al.'s parallel form of Welford's update),
so one batch costs a few tensor reductions and no per-query Python work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fortress.errors import ConfigError, InvalidInput

__all__ = ["KeyProfile", "RunningMoments", "entropy_and_confidence"]


def entropy_and_confidence(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Shannon entropy (nats) and top-1 probability of each probability row.

    Shape:
        ``probs (B, K)`` → two ``(B,)`` float64 tensors.
    """
    p = probs.detach().to(torch.float64)
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return ent, p.amax(dim=1)


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (``m2``) of a scalar stream, merged per batch.

    ``var`` is the population variance (``m2 / n``), equal to ``torch.var(stream, correction=0)``.
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: Tensor) -> None:
        """Merge a batch of values (Chan et al. 1979: exact, one pass over the batch)."""
        nb = int(values.numel())
        if nb == 0:
            return
        v = values.detach().to(torch.float64).flatten()
        mb = float(v.mean())
        m2b = float(((v - mb) ** 2).sum())
        total = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / total
        self.m2 += m2b + delta * delta * self.n * nb / total
        self.n = total

    @property
    def var(self) -> float:
        """Population variance (0 before any value)."""
        return self.m2 / self.n if self.n else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(max(self.var, 0.0))

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready state."""
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunningMoments:
        """Inverse of :meth:`as_dict`."""
        return cls(n=int(d["n"]), mean=float(d["mean"]), m2=float(d["m2"]))


@dataclass
class KeyProfile:
    """One key's query profile: queries seen, exit counts, entropy and confidence moments.

    Args:
        num_exits: exits of the served defense (0: it has none; exit counts stay empty).

    Example:
        >>> prof = KeyProfile(num_exits=4)
        >>> prof.update(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([0, 3]))
        >>> prof.exit_counts, prof.queries
        ([1, 0, 0, 1], 2)
    """

    num_exits: int = 0
    queries: int = 0
    exit_counts: list[int] = field(default_factory=list)
    entropy: RunningMoments = field(default_factory=RunningMoments)
    confidence: RunningMoments = field(default_factory=RunningMoments)

    def __post_init__(self) -> None:
        if self.num_exits < 0:
            raise ConfigError(f"num_exits must be >= 0, got {self.num_exits}")
        if not self.exit_counts:
            self.exit_counts = [0] * self.num_exits
        if len(self.exit_counts) != self.num_exits:
            raise ConfigError(f"exit_counts has {len(self.exit_counts)} entries, expected num_exits={self.num_exits}")

    def update(self, probs: Tensor, exits: Tensor | None) -> None:
        """Add one answered batch: ``probs (B, K)`` rows and ``exits (B,)`` (or ``None``).

        Raises:
            InvalidInput: shapes disagree, or an exit index is outside ``[0, num_exits)``.
        """
        if probs.dim() != 2:
            raise InvalidInput(f"probs must be (B, K), got shape {tuple(probs.shape)}")
        b = int(probs.shape[0])
        if exits is not None and self.num_exits:
            if exits.shape != (b,):
                raise InvalidInput(f"exits must have shape ({b},), got {tuple(exits.shape)}")
            if b and (int(exits.min()) < 0 or int(exits.max()) >= self.num_exits):
                raise InvalidInput(f"exit indices must lie in [0, {self.num_exits}), got {exits.tolist()[:8]}...")
            counts = torch.bincount(exits.to(torch.long), minlength=self.num_exits).tolist()
            self.exit_counts = [a + c for a, c in zip(self.exit_counts, counts, strict=True)]
        ent, conf = entropy_and_confidence(probs)
        self.entropy.update(ent)
        self.confidence.update(conf)
        self.queries += b

    @property
    def exit_hist(self) -> list[float]:
        """Share of queries per exit (empty without exits or queries)."""
        total = sum(self.exit_counts)
        return [c / total for c in self.exit_counts] if total else []

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready state (what the ledger stores and the admin route shows)."""
        return {
            "num_exits": self.num_exits,
            "queries": self.queries,
            "exit_counts": list(self.exit_counts),
            "exit_hist": self.exit_hist,
            "entropy": {**self.entropy.as_dict(), "std": self.entropy.std},
            "confidence": {**self.confidence.as_dict(), "std": self.confidence.std},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyProfile:
        """Inverse of :meth:`as_dict`."""
        return cls(
            num_exits=int(d["num_exits"]),
            queries=int(d["queries"]),
            exit_counts=[int(c) for c in d["exit_counts"]],
            entropy=RunningMoments.from_dict(d["entropy"]),
            confidence=RunningMoments.from_dict(d["confidence"]),
        )
