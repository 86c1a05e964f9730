"""DNF as a :class:`~fortress.defenses.base.Defense`: an early-exit victim that answers each query
from the exit it takes (paper §4.2 "Deployment of DNF", Alg. 2)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.defenses.dnf.training import (
    DNFTrainConfig,
    DNFTrainReport,
    StepInfo,
    load_trainable_state,
    train_dnf,
)
from fortress.errors import ArtifactError, ConfigError
from fortress.exits.heads import HeadKind, PoolKind
from fortress.exits.network import EarlyExitNet
from fortress.generative.ood import OODSource
from fortress.models.io import atomic_write_text, load_model, load_state, read_json, save_model, save_state
from fortress.models.staged import StagedBackbone

__all__ = ["DNF"]

Compute = Literal["dynamic", "full"]
WEIGHTS = "dnf.safetensors"


class DNF(Defense):
    """Dynamic Neural Fortress: exit heads on the frozen victim; queries leave at the first confident exit.

    Args:
        victim: the trained, staged victim (frozen; never modified).
        exit_after: stages that get a head (default: all; LeNet-5: after each convolution, Table 6).
        head_kind: ``"vib"`` (paper Eq. 5, default) or ``"plain"`` (the released code's heads).
        hidden: head hidden/latent width (``None``: one linear layer per head, Table 6).
        pool: feature reduction before each head.
        thresholds: per-head thresholds (default: the paper's for ``dataset``; MNIST 0.92/0.94/0.96).
        dataset: picks the paper's default thresholds.
        train_final_exit: also train a copy of the final classifier (default: frozen, as in the paper).
        compute: ``"dynamic"`` skips the stages a query no longer needs; ``"full"`` runs every stage for
            every query, so response time does not reveal the exit (same answers).
        seed: seeds the heads' initial weights.

    Example:
        >>> from fortress.models import create_model
        >>> dnf = DNF(create_model("lenet5"))
        >>> dnf.respond(torch.rand(4, 1, 28, 28)).exits.shape
        torch.Size([4])
    """

    name = "dnf"
    needs_proxy_data = True

    def __init__(
        self,
        victim: StagedBackbone,
        *,
        exit_after: Sequence[int] | None = None,
        head_kind: HeadKind = "vib",
        hidden: int | None = None,
        pool: PoolKind = "auto",
        thresholds: Sequence[float] | None = None,
        dataset: str | None = None,
        train_final_exit: bool = False,
        compute: Compute = "dynamic",
        seed: int | None = None,
    ) -> None:
        super().__init__(victim)
        if compute not in ("dynamic", "full"):
            raise ConfigError(f"compute must be 'dynamic' or 'full', got {compute!r}")
        self.net = EarlyExitNet(
            victim,
            exit_after=exit_after,
            head_kind=head_kind,
            hidden=hidden,
            pool=pool,
            thresholds=thresholds,
            dataset=dataset,
            train_final_exit=train_final_exit,
            seed=seed,
        ).eval()
        self.compute: Compute = compute
        self._init = {
            "exit_after": list(self.net.exit_after),
            "head_kind": head_kind,
            "hidden": hidden,
            "pool": pool,
            "dataset": dataset,
            "train_final_exit": train_final_exit,
            "seed": seed,
        }
        self.initial_thresholds = self.thresholds
        self.guarded = False
        self.attempts: list[dict[str, float]] = []
        self.train_report: DNFTrainReport | None = None
        self.ood_description: dict[str, Any] | None = None

    @property
    def num_exits(self) -> int:
        return self.net.num_exits

    @property
    def thresholds(self) -> list[float]:
        """Current per-head thresholds."""
        return [float(t) for t in self.net.thresholds]

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Replace the per-head thresholds."""
        self.net.set_thresholds(thresholds)

    def modules(self) -> list[torch.nn.Module]:
        return [self.net]

    def fit(
        self,
        x_id: Tensor,
        y_id: Tensor,
        ood: OODSource,
        *,
        config: DNFTrainConfig | None = None,
        val: tuple[Tensor, Tensor] | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> DNFTrainReport:
        """Train the exit heads (paper Alg. 1); see :func:`~fortress.defenses.dnf.training.train_dnf`."""
        report = train_dnf(
            self.net,
            x_id,
            y_id,
            ood,
            config=config,
            val=val,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            on_step=on_step,
        )
        self.net.eval()
        self.train_report = report
        self.ood_description = ood.describe()
        self._train_config = (config or DNFTrainConfig()).as_dict()
        return report

    @torch.no_grad()
    def exit_share(self, x: Tensor, exit_index: int = 0) -> float:
        """Fraction of the rows of ``x`` that leave at ``exit_index``."""
        _, exits = self.net.forward_dynamic(x)
        return float((exits == exit_index).float().mean())

    @torch.no_grad()
    def guard_utility(self, x_val: Tensor, y_val: Tensor, *, max_harm: int = 0) -> list[float]:
        """Raise thresholds so early exits do not cost utility on held-out ID data.

        Goes beyond the paper (whose App. H searches thresholds under a utility constraint): head by
        head, in depth order, the rows of ``(x_val, y_val)`` that would leave at head ``j`` are
        checked against the final exit; while more than ``max_harm`` of them are answered wrongly by
        the head but rightly by the final exit, head ``j``'s threshold is raised just above the
        confidence of the most confident such row. Thresholds only ever go up.

        Returns:
            The new thresholds (also set on the network).
        """
        allx = self.net.forward_all(x_val)
        conf = torch.softmax(allx.logits, dim=2).amax(dim=2)  # (E, N)
        pred = allx.logits.argmax(dim=2)
        final_ok = pred[-1] == y_val
        thr = self.thresholds
        pending = torch.ones(x_val.shape[0], dtype=torch.bool)
        for j in range(len(thr)):
            harmful = pending & (pred[j] != y_val) & final_ok
            while True:
                leaves = pending & (conf[j] >= thr[j])
                bad = harmful & leaves
                if int(bad.sum()) <= max_harm:
                    break
                worst = torch.sort(conf[j][bad], descending=True).values[max_harm]
                thr[j] = float(torch.nextafter(worst, torch.tensor(2.0)))
            pending &= ~(conf[j] >= thr[j])
        self.net.set_thresholds(thr)
        self.guarded = True
        return thr

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        if self.compute == "dynamic":
            logits, exits = self.net.forward_dynamic(x)
        else:
            logits, exits = self.net.forward_static(x)
        return DefenseOutput(probs=torch.softmax(logits, dim=1), exits=exits)

    def hparams(self) -> dict[str, Any]:
        return {
            **self._init,
            "thresholds": self.thresholds,
            "initial_thresholds": self.initial_thresholds,
            "utility_guard": self.guarded,
            "attempts": self.attempts,
            "compute": self.compute,
            "train": getattr(self, "_train_config", None),
            "ood": self.ood_description,
        }

    def save(self, directory: Path) -> Path:
        """Write ``victim/`` (safetensors + JSON), ``dnf.safetensors`` (heads) and ``defense.json``."""
        directory = Path(directory)
        save_model(self.victim, directory / "victim")
        from fortress.defenses.dnf.training import _trainable_state

        save_state(_trainable_state(self.net), directory / WEIGHTS, metadata={"format": "fortress-dnf"})
        meta = {
            "defense": self.name,
            "params": {**self._init, "thresholds": self.thresholds, "compute": self.compute},
            "initial_thresholds": self.initial_thresholds,
            "utility_guard": self.guarded,
            "attempts": self.attempts,
            "train": getattr(self, "_train_config", None),
            "ood": self.ood_description,
            "report": None if self.train_report is None else self.train_report.__dict__,
        }
        atomic_write_text(directory / "defense.json", json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path, *, compute: Compute | None = None) -> DNF:
        """Restore a DNF saved by :meth:`save` (``compute`` overrides the saved mode)."""
        directory = Path(directory)
        meta = read_json(directory / "defense.json")
        if meta.get("defense") != cls.name:
            raise ArtifactError(f"{directory / 'defense.json'} holds defense {meta.get('defense')!r}, not 'dnf'")
        victim = load_model(directory / "victim")
        params = dict(meta.get("params", {}))
        if compute is not None:
            params["compute"] = compute
        try:
            dnf = cls(victim, **params)
        except TypeError as exc:
            raise ArtifactError(f"{directory / 'defense.json'} has invalid DNF parameters: {exc}") from exc
        load_trainable_state(dnf.net, load_state(directory / WEIGHTS), directory / WEIGHTS)
        dnf.net.eval()
        dnf.ood_description = meta.get("ood")
        dnf.initial_thresholds = [float(t) for t in meta.get("initial_thresholds", dnf.thresholds)]
        dnf.guarded = bool(meta.get("utility_guard", False))
        dnf.attempts = list(meta.get("attempts", []))
        if meta.get("train") is not None:
            dnf._train_config = meta["train"]
        return dnf
