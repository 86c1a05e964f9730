"""DNF as a :class:`~fortress.defenses.base.Defense`: an early-exit victim that answers each query
from the exit it takes (paper §4.2 "Deployment of DNF", Alg. 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.defenses.base import DefenseOutput
from fortress.defenses.dnf.provenance import Attempt, GuardResult, Provenance
from fortress.defenses.dnf.training import DNFTrainConfig, DNFTrainReport, StepInfo, train_dnf, trainable_parts
from fortress.defenses.trainable import DefenderData, TrainableDefense
from fortress.errors import ConfigError
from fortress.exits.heads import HeadKind, PoolKind
from fortress.exits.network import EarlyExitNet
from fortress.generative.ood import NoiseOOD, OODSource, PoolOOD
from fortress.models.staged import StagedBackbone
from fortress.training import EpochCallback, RunOptions

__all__ = ["DNF"]

Compute = Literal["dynamic", "full"]
#: File of the trained exit heads in a saved DNF directory (``dnf.safetensors``).
WEIGHTS = "dnf"


class DNF(TrainableDefense[DNFTrainConfig]):
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

    Attributes:
        provenance: how the protection recipe made this DNF (attempts, utility guard, threshold
            search; :func:`fortress.defenses.dnf.recipe.protect`), ``None`` for heads trained by
            :meth:`fit` alone.

    Example:
        >>> from fortress.models import create_model
        >>> dnf = DNF(create_model("lenet5"))
        >>> dnf.respond(torch.rand(4, 1, 28, 28)).exits.shape
        torch.Size([4])
    """

    name = "dnf"
    needs_proxy_data = True
    fit_config = DNFTrainConfig

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
        self.exit_after = list(self.net.exit_after)
        self.head_kind: HeadKind = head_kind
        self.hidden = hidden
        self.pool: PoolKind = pool
        self.dataset = dataset
        self.train_final_exit = train_final_exit
        self.seed = seed
        self.initial_thresholds = self.thresholds
        self.provenance: Provenance | None = None
        self.train_report: DNFTrainReport | None = None
        self.train_config: dict[str, Any] | None = None
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
        data: DefenderData,
        config: DNFTrainConfig | None = None,
        *,
        ood: OODSource | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = True,
        on_epoch: EpochCallback | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> DNFTrainReport:
        """Train the exit heads on ``data`` (paper Alg. 1); see :func:`~fortress.defenses.dnf.training.train_dnf`.

        This trains the heads only. What ``fortress protect`` does besides — the DCGAN OOD source,
        the acceptance check, the utility guard and the threshold search — is the recipe
        :func:`fortress.defenses.dnf.recipe.protect`.

        Args:
            data: the defender's data (ID training images and labels; validation data are logged).
            config: training hyper-parameters (default :class:`DNFTrainConfig`, paper App. D).
            ood: the OOD source (default: the proxy pool of ``data`` if it has one, else noise).
            checkpoint_dir: per-epoch checkpoints go here (``None``: none).
            resume: continue from a checkpoint in ``checkpoint_dir`` written with the same config.
            on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each epoch.
            on_step: called after every step (progress bars).
        """
        cfg = self._fit_config(data, config)
        return self._train(data, cfg, ood or _default_ood(data), RunOptions(checkpoint_dir, resume, on_epoch), on_step)

    def _fit(self, data: DefenderData, config: DNFTrainConfig, options: RunOptions) -> DNFTrainReport:
        return self._train(data, config, _default_ood(data), options, None)

    def _train(
        self,
        data: DefenderData,
        config: DNFTrainConfig,
        ood: OODSource,
        options: RunOptions,
        on_step: Callable[[StepInfo], None] | None,
    ) -> DNFTrainReport:
        report = train_dnf(
            self.net,
            data.x_train,
            data.y_train,
            ood,
            config=config,
            val=(data.x_val, data.y_val),
            checkpoint_dir=options.checkpoint_dir,
            resume=options.resume,
            on_step=on_step,
            on_epoch=options.on_epoch,
        )
        self.net.eval()
        self.train_report = report
        self.ood_description = ood.describe()
        self.train_config = config.as_dict()
        return report

    @torch.no_grad()
    def exit_share(self, x: Tensor, exit_index: int = 0) -> float:
        """Fraction of the rows of ``x`` that leave at ``exit_index``."""
        _, exits = self.net.forward_dynamic(x.to(self.device))
        return float((exits == exit_index).float().mean())

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        if self.compute == "dynamic":
            logits, exits = self.net.forward_dynamic(x)
        else:
            logits, exits = self.net.forward_static(x)
        return DefenseOutput(probs=torch.softmax(logits, dim=1), exits=exits)

    def hparams(self) -> dict[str, Any]:
        prov = self.provenance
        return {
            **self._params(),
            "initial_thresholds": self.initial_thresholds,
            "utility_guard": prov is not None and prov.guard is not None,
            "attempts": [] if prov is None else [asdict(a) for a in prov.attempts],
            "train": self.train_config,
            "ood": self.ood_description,
            **({} if prov is None or prov.selection is None else {"selection": prov.selection.to_json()}),
        }

    def _parts(self) -> dict[str, torch.nn.Module]:
        # the trained heads only: the frozen backbone is saved as ``victim/``
        return {WEIGHTS: torch.nn.ModuleDict(trainable_parts(self.net))}

    def _state(self) -> dict[str, Any]:
        return {
            "initial_thresholds": self.initial_thresholds,
            "train": self.train_config,
            "ood": self.ood_description,
            "report": None if self.train_report is None else asdict(self.train_report),
            "provenance": None if self.provenance is None else self.provenance.to_json(),
        }

    def _restore_state(self, meta: dict[str, Any]) -> None:
        self.net.eval()
        self.initial_thresholds = [float(t) for t in meta.get("initial_thresholds", self.thresholds)]
        self.train_config = meta.get("train")
        self.ood_description = meta.get("ood")
        report = meta.get("report")
        if isinstance(report, dict):
            self.train_report = DNFTrainReport(**report)
        if meta.get("provenance") is not None:
            self.provenance = Provenance.from_json(meta["provenance"])
        elif meta.get("attempts"):  # written before the provenance record existed
            # the old format kept only whether the guard ran: its result is taken as the saved thresholds
            guard = GuardResult(tuple(self.initial_thresholds), tuple(self.thresholds))
            self.provenance = Provenance(
                attempts=tuple(Attempt(int(a["head_seed"]), float(a["ood_exit0"])) for a in meta["attempts"]),
                min_ood_exit0=0.0,
                guard=guard if meta.get("utility_guard") else None,
            )


def _default_ood(data: DefenderData) -> OODSource:
    """The defender's proxy pool if it has one, else noise images."""
    if data.proxy is not None:
        return PoolOOD(data.proxy, name="proxy")
    return NoiseOOD(data.image_shape)
