"""The undefended victim: its own softmax, nothing else (the reference row of every table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.models.io import atomic_write_text, load_model, save_model
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

    def hparams(self) -> dict[str, Any]:
        return {}

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        save_model(self.victim, directory / "victim")
        atomic_write_text(directory / "defense.json", json.dumps({"defense": self.name, "params": {}}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path) -> Undefended:
        """Restore an undefended victim saved by :meth:`save`."""
        return cls(load_model(Path(directory) / "victim"))
