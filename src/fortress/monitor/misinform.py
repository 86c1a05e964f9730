"""The ``misinform`` response: a flagged key's answers with the classes relabelled by a secret derangement.

A flagged key keeps getting answers of the usual form, but every row's mass moves from class ``c``
to class ``π(c)``, with ``π`` a permutation that leaves no class in place (a derangement). The
clone of an attacker who is flagged learns ``π ∘ victim``: a consistent, confident and wrong
function that contradicts what it learned before the flag (the answers a Knockoff clone got before
a detector's first check, JBDA's labelled seeds), instead of the uninformative-but-harmless answers of
``degrade-exit0``. It is the intent of Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020: an
OOD-looking query gets a misinformation function's answer) applied per account, with the
misinformation function made systematic so that it outweighs the clean answers.

``π`` is drawn from a seed; by default the seed is the SHA-256 of the served model's weights, so
every server process on the same model answers with the same ``π`` and the attacker cannot compute it
without the weights it is trying to steal. A benign key flagged by mistake gets wrong answers, which
is why the detectors' benign rates are calibrated and measured (docs/monitoring.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from fortress.defenses import Defense
from fortress.errors import ConfigError
from fortress.monitor.base import Response

__all__ = ["Misinformation", "derangement", "relabel", "weights_seed"]


def derangement(k: int, seed: int) -> Tensor:
    """A uniformly drawn permutation of ``range(k)`` with no fixed point (rejection sampling).

    Raises:
        ConfigError: ``k < 2`` (one class has no derangement).
    """
    if k < 2:
        raise ConfigError(f"misinformation needs at least 2 classes, got {k}")
    gen = torch.Generator().manual_seed(seed)
    while True:  # accepted with probability ≈ 1/e per draw
        perm = torch.randperm(k, generator=gen)
        if not bool((perm == torch.arange(k)).any()):
            return perm


def weights_seed(defense: Defense) -> int:
    """A 63-bit seed from the SHA-256 of the defense's parameters and buffers (names and bytes, sorted by name)."""
    h = hashlib.sha256()
    for i, module in enumerate(defense.modules()):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


class Misinformation:
    """Relabel answers by a secret derangement ``π``: row ``p`` becomes ``q`` with ``q[π(c)] = p[c]``.

    Args:
        num_classes: ``K``.
        seed: draws ``π`` (:func:`derangement`); see :meth:`for_defense` for the served default.

    Shape:
        ``probs (B, K)`` → ``(B, K)``; each row keeps its values (and its sum), moved to other classes,
        so the top-1 label is ``π(argmax p)``, never ``argmax p``.

    Example:
        >>> m = Misinformation(3, seed=0)
        >>> bool((m(torch.eye(3)).argmax(1) != torch.arange(3)).all())
        True
    """

    def __init__(self, num_classes: int, seed: int) -> None:
        self.perm = derangement(num_classes, seed)

    @classmethod
    def for_defense(cls, defense: Defense, seed: int | None = None) -> Misinformation:
        """``π`` for the served ``defense``: from ``seed``, or (``None``) from its weights (:func:`weights_seed`)."""
        return cls(defense.victim.num_classes, weights_seed(defense) if seed is None else seed)

    def __call__(self, probs: Tensor) -> Tensor:
        if probs.dim() != 2 or probs.shape[1] != self.perm.numel():
            raise ConfigError(f"misinformation expects (B, {self.perm.numel()}) rows, got {tuple(probs.shape)}")
        out = torch.empty_like(probs)
        out[:, self.perm.to(probs.device)] = probs
        return out


def relabel(misinform: Callable[[Tensor], Tensor], response: Response, probs: Tensor, exits: Tensor | None) -> Tensor:
    """A flagged key's answers under ``misinform`` (every row relabelled) or ``misinform-id``.

    ``misinform-id`` relabels only the rows a DNF answered at a later exit than its first (``exits > 0``:
    queries that look in-distribution, whose answers carry the victim's knowledge); rows answered at
    exit 0 go out unchanged (that exit is trained to mislead out-of-distribution queries, paper
    Eq. 7, and relabelling would undo it). Without exits (``None``) every row is relabelled.

    Shape:
        ``probs (B, K)``, ``exits (B,)`` or ``None`` → ``(B, K)``.
    """
    if response is Response.MISINFORM or exits is None:
        return misinform(probs)
    return torch.where((exits > 0).to(probs.device)[:, None], misinform(probs), probs)
