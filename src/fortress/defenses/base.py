"""The Defense contract: a victim wrapped so that ``defense(x)`` returns probability rows.

A defense may perturb outputs (baselines), route queries through exits (DNF) or do nothing
(``undefended``). Besides the probabilities it reports, per query, the exit taken (when it has
exits), the ℓ1 distance it added to the victim's own output and whether top-1 changed (when it
perturbs) — the oracle logs these and the benchmark tabulates them.

Saving is written once, here: a defense directory holds ``victim/`` (safetensors + JSON), one file
or directory per stateful part (:attr:`Defense.saved_parts`) and ``defense.json`` with the registry
name, the constructor's keyword arguments (read back from the attributes of the same names) and the
defense's JSON state (:meth:`Defense._state`). :meth:`Defense.load` rebuilds the defense from the
constructor and copies the parts back, checking every tensor's name and shape.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from fortress.device import device_of
from fortress.errors import ArtifactError
from fortress.models.io import (
    atomic_write_text,
    copy_state_checked,
    load_model,
    load_state,
    read_json,
    save_model,
    save_state,
)
from fortress.models.staged import StagedBackbone
from fortress.tensors import check_images

__all__ = ["Defense", "DefenseOutput", "read_defense_meta"]

D = TypeVar("D", bound="Defense")


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

    def to(self, device: torch.device | str) -> DefenseOutput:
        """The same answers with every tensor on ``device`` (itself when they are there already)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return DefenseOutput(self.probs.to(device), move(self.exits), move(self.l1), move(self.top1_changed))


class Defense(ABC):
    """Base class of every defense: ``Defense(victim, *, ...hyper-parameters)``.

    Subclasses implement :meth:`_respond` (inputs already validated) and set the class attributes
    below. They never know which attack is running.

    Attributes:
        name: registry name.
        needs_gradients: answering a query back-propagates through a model (cost marker).
        needs_proxy_data: ``fit`` needs data beyond the victim's training set.
        saved_parts: attributes holding the defense's own networks, saved with it: a staged network
            as a directory ``<name>/`` (safetensors + JSON), any other module as ``<name>.safetensors``.
            A part that is also a constructor argument is loaded first and passed to the constructor.
        num_exits: number of exits whose histogram is logged (``None``: no exits).
    """

    name: ClassVar[str] = "defense"
    needs_gradients: ClassVar[bool] = False
    needs_proxy_data: ClassVar[bool] = False
    saved_parts: ClassVar[tuple[str, ...]] = ()

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

    @property
    def device(self) -> torch.device:
        """Where the defense computes: the device of its victim's parameters."""
        return device_of(self.victim)

    def to(self: D, device: torch.device | str) -> D:
        """Move every network of the defense (:meth:`modules`) to ``device``; returns ``self``.

        Defenses that keep tensors of their own besides networks extend this.
        """
        for m in self.modules():
            m.to(device)
        return self

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
        """The hyper-parameters this defense was built with, recorded next to results.

        Default: the constructor's keyword arguments and the saved state (:meth:`_state`).
        """
        return {**self._params(), **self._state()}

    # ------------------------------------------------------------------------------------- saving

    def _params(self) -> dict[str, Any]:
        """The constructor's keyword arguments, read from the attributes of the same names (parts excluded)."""
        params: dict[str, Any] = {}
        for p in list(inspect.signature(type(self).__init__).parameters.values())[2:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in self.saved_parts:
                continue
            params[p.name] = getattr(self, p.name)
        return params

    def _parts(self) -> dict[str, nn.Module]:
        """The stateful networks saved with the defense, by file name (default: :attr:`saved_parts`)."""
        return {name: getattr(self, name) for name in self.saved_parts}

    def _state(self) -> dict[str, Any]:
        """JSON-ready state beyond the constructor's arguments, saved as top-level keys of ``defense.json``."""
        return {}

    def _restore_state(self, meta: dict[str, Any]) -> None:  # noqa: B027 (a hook: most defenses have no state)
        """Restore what :meth:`_state` saved (``meta`` is the whole ``defense.json``)."""

    def save(self, directory: Path) -> Path:
        """Save the defense (victim included) so :func:`fortress.defenses.load_defense` restores it.

        Writes ``victim/``, one entry per part (:attr:`saved_parts`) and, last, ``defense.json``.
        """
        directory = Path(directory)
        save_model(self.victim, directory / "victim")
        for name, part in self._parts().items():
            if isinstance(part, StagedBackbone):
                save_model(part, directory / name)
            else:
                meta = {"format": f"fortress-{self.name}"}
                save_state(part.state_dict(), directory / f"{name}.safetensors", metadata=meta)
        record = {"defense": self.name, "params": self._params(), **self._state()}
        atomic_write_text(directory / "defense.json", json.dumps(record, indent=2))
        return directory

    @classmethod
    def load(cls: type[D], directory: Path, **overrides: Any) -> D:
        """Restore a defense written by :meth:`save`; ``overrides`` replace saved constructor arguments.

        Raises:
            ArtifactError: a file is missing or corrupt, belongs to another defense, or does not fit.
        """
        directory = Path(directory)
        meta, params = read_defense_meta(directory, cls.name)
        params.update(overrides)
        ctor = inspect.signature(cls).parameters
        given = {n: load_model(directory / n) for n in cls.saved_parts if n in ctor and (directory / n).is_dir()}
        try:
            defense = cls(load_model(directory / "victim"), **params, **given)
        except TypeError as exc:
            raise ArtifactError(f"{directory / 'defense.json'} has invalid {cls.name} parameters: {exc}") from exc
        for name, part in defense._parts().items():
            if name in given:
                continue
            if isinstance(part, StagedBackbone):
                copy_state_checked(part, load_model(directory / name).state_dict(), directory / name)
            else:
                source = directory / f"{name}.safetensors"
                copy_state_checked(part, load_state(source), source)
        defense._restore_state(meta)
        return defense


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
