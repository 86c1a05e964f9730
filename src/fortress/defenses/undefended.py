"""The undefended victim: its own softmax, nothing else (the reference row of every table)."""

from __future__ import annotations

import torch
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.models.staged import StagedBackbone

__all__ = ["Undefended"]


class Undefended(Defense):
    """Return the victim's softmax unchanged.

    Example:
        >>> from fortress.models import create_model
        >>> Undefended(create_model("lenet5"))(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    name = "undefended"

    def __init__(self, victim: StagedBackbone) -> None:
        super().__init__(victim)

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        probs = torch.softmax(self.victim(x), dim=1)
        zeros = torch.zeros(x.shape[0], dtype=probs.dtype)
        return DefenseOutput(probs=probs, l1=zeros, top1_changed=torch.zeros(x.shape[0], dtype=torch.bool))
