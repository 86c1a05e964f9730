"""The Defense contract: a victim wrapped so that ``defense(x)`` returns probability rows.

A defense may perturb outputs (baselines), route queries through exits (DNF) or do nothing
(``undefended``). Besides the probabilities it reports, per query, the exit taken (when it has
exits), the ℓ1 distance it added to the victim's own output and whether top-1 changed (when it
perturbs) — the oracle logs these and the benchmark tabulates them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from fortress.errors import ArtifactError
from fortress.models.io import read_json
from fortress.models.staged import StagedBackbone
from fortress.tensors import check_images

__all__ = ["Defense", "DefenseOutput", "read_defense_meta"]


@dataclass(frozen=True)
class DefenseOutput:
    """One batch of answers.

    Attributes:
        probs: ``(B, K)`` probability rows (non-negative, rows sum to 1).
        exits: ``(B,)`` int64 exit index per query, or ``None`` for defenses without exits.
        l1: ``(B,)`` ℓ1 distance to the victim's own probabilities, or ``None`` when not measured.
        top1_changed: ``(B,)`` bool, whether top-1 differs from the victim's, or ``None``.
    """

    probs: Tensor
    exits: Tensor | None = None
    l1: Tensor | None = None
    top1_changed: Tensor | None = None


class Defense(ABC):
    """Base class of every defense: ``Defense(victim, *, ...hyper-parameters)``.

    Subclasses implement :meth:`_respond` (inputs already validated) and set the class attributes
    below. They never know which attack is running.

    Attributes:
        name: registry name.
        needs_gradients: answering a query back-propagates through a model (cost marker).
        needs_proxy_data: ``fit`` needs data beyond the victim's training set.
        num_exits: number of exits whose histogram is logged (``None``: no exits).
    """

    name: ClassVar[str] = "defense"
    needs_gradients: ClassVar[bool] = False
    needs_proxy_data: ClassVar[bool] = False

    def __init__(self, victim: StagedBackbone) -> None:
        self.victim = victim
        self.victim.eval()

    @property
    def num_exits(self) -> int | None:
        """Exits the defense routes queries through (``None`` if it has none)."""
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes in every probability row."""
        return self.victim.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-image input shape ``(C, H, W)``."""
        return self.victim.input_shape

    def modules(self) -> list[nn.Module]:
        """Every network the defense runs (for device moves and parameter counts)."""
        return [self.victim]

    def respond(self, x: Tensor) -> DefenseOutput:
        """Validate ``x`` against the tensor contract and answer it.

        Shape:
            ``(B, C, H, W)`` float32 in [0, 1] → :class:`DefenseOutput` with ``probs`` ``(B, K)``.
        """
        check_images(x, self.input_shape)
        return self._respond(x)

    def __call__(self, x: Tensor) -> Tensor:
        """Probability rows for images ``x`` (see :meth:`respond`)."""
        return self.respond(x).probs

    @abstractmethod
    def _respond(self, x: Tensor) -> DefenseOutput:
        """Answer a validated batch."""

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters this defense was built with (recorded next to results)."""
        return {}

    def save(self, directory: Path) -> Path:
        """Save the defense (victim included) so :func:`fortress.defenses.load_defense` restores it."""
        raise NotImplementedError(f"defense {self.name!r} cannot be saved")

    @classmethod
    def load(cls, directory: Path) -> Defense:
        """Restore a defense written by :meth:`save`."""
        raise NotImplementedError(f"defense {cls.name!r} cannot be loaded")


def read_defense_meta(directory: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``directory/defense.json`` written by defense ``name``: the whole record and its ``params``.

    Raises:
        ArtifactError: the file is missing or unreadable, belongs to another defense, or its
            ``params`` is not an object.
    """
    path = Path(directory) / "defense.json"
    meta = read_json(path)
    if meta.get("defense") != name:
        raise ArtifactError(f"{path} holds defense {meta.get('defense')!r}, not {name!r}")
    params = meta.get("params", {})
    if not isinstance(params, dict):
        raise ArtifactError(f"{path}: 'params' must be an object, got {type(params).__name__}")
    return meta, dict(params)
