"""Stateless tensor functions shared by attacks and defenses (a neutral layer below both)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["entropy"]


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` per row (DNF paper Eq. 2).

    Shape:
        ``(B, K)`` → ``(B,)``.

    Example:
        >>> entropy(torch.zeros(1, 4))  # doctest: +SKIP
        tensor([1.3863])
    """
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)
