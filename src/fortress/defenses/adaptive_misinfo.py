"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020): OOD-looking queries get a misinformation model's answer.

An in-distribution score ``s(x)`` — the victim's maximum softmax probability — decides, through a
steep sigmoid, how much of the answer comes from a second network trained to be wrong:

    ŷ = (1 − α)·y + α·ŷ_mis,   α = 1 / (1 + exp(ν·(s(x) − τ)))

with ``y`` the victim's softmax and ``ŷ_mis`` the misinformation model's softmax. ``ŷ_mis`` is
trained on the defender's labelled data to minimise ``−log(1 − p̂_y(x))``, i.e. to put little mass
on the true class (defense fact sheet §6.2). The threshold ``τ`` is calibrated on ID validation data
so that a chosen fraction (the false-positive rate) of benign queries falls below it.

Differences from the original, both forced by the fair-comparison protocol (fact sheet §9.2, same
victim checkpoint for every defense): the victim is *not* retrained with Outlier Exposure, so the
max-softmax detector is the plain one; and the misinformation model is a separate network of the
victim's architecture trained after the victim (as in Mazeika et al.'s re-implementation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.defenses.base import DefenseOutput
from fortress.defenses.trainable import DefenderData, NetworkFitConfig, TrainableDefense
from fortress.errors import ConfigError, ModelFactoryError, UnknownComponent
from fortress.models.staged import StagedBackbone
from fortress.training import EpochLoop, History, RunOptions

__all__ = ["AdaptiveMisinformation", "MisinformationFitConfig", "misinformation_loss"]

log = logging.getLogger(__name__)


def misinformation_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean of ``−log(1 − p_y)`` over the batch: small when the true class gets little mass.

    Computed stably as ``logsumexp(z) − logsumexp(z without class y)``.

    Shape:
        ``logits (B, K)``, ``y (B,)`` → scalar.
    """
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def _fresh_network(victim: StagedBackbone, seed: int) -> StagedBackbone:
    """A seeded, freshly initialised network with the victim's architecture."""
    from fortress.models.user import rebuild_architecture

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return rebuild_architecture(victim).eval()
        except (UnknownComponent, ModelFactoryError, TypeError) as exc:
            raise ConfigError(
                f"cannot rebuild the victim's architecture {victim.arch!r} for the misinformation model; "
                "pass misinfo=<a network with the same input shape and classes>"
            ) from exc


@dataclass(frozen=True)
class MisinformationFitConfig(NetworkFitConfig):
    """How :meth:`AdaptiveMisinformation.fit` trains the misinformation model (5 epochs)."""


class AdaptiveMisinformation(TrainableDefense[MisinformationFitConfig]):
    """Answer ID-looking queries with the victim and OOD-looking ones with a misinformation model.

    Args:
        victim: the trained victim (its max softmax is the ID score).
        tau: ID-score threshold τ; queries scoring below it are answered by the misinformation
            model. :meth:`calibrate` (called by :meth:`fit` on the defender's validation images)
            sets it from ``fpr``. Default 0.5 until calibrated.
        nu: sigmoid steepness ν (paper: 1000, a near step).
        fpr: fraction of ID validation queries that :meth:`calibrate` lets fall below τ.
        misinfo: the misinformation network (default: a seeded fresh copy of the victim's
            architecture, to be trained by :meth:`fit`).
        seed: seeds the misinformation network's initialisation and training order.

    Example:
        >>> from fortress.models import create_model
        >>> am = AdaptiveMisinformation(create_model("lenet5"), tau=0.5)
        >>> am(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    name = "adaptive-misinformation"
    saved_parts = ("misinfo",)
    fit_config = MisinformationFitConfig

    def __init__(
        self,
        victim: StagedBackbone,
        *,
        tau: float = 0.5,
        nu: float = 1000.0,
        fpr: float = 0.05,
        misinfo: StagedBackbone | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(victim)
        if not (isinstance(tau, int | float) and 0.0 <= float(tau) <= 1.0):
            raise ConfigError(f"tau (threshold on the max softmax) must be in [0, 1], got {tau!r}")
        if not (isinstance(nu, int | float) and math.isfinite(nu) and nu > 0):
            raise ConfigError(f"nu (sigmoid steepness) must be a finite number > 0, got {nu!r}")
        if not (isinstance(fpr, int | float) and 0.0 < float(fpr) < 1.0):
            raise ConfigError(f"fpr (false-positive rate on ID data) must be in (0, 1), got {fpr!r}")
        self.tau = float(tau)
        self.nu = float(nu)
        self.fpr = float(fpr)
        self.seed = int(seed)
        self.misinfo = _fresh_network(victim, self.seed) if misinfo is None else misinfo.eval()
        if self.misinfo.num_classes != victim.num_classes or self.misinfo.input_shape != victim.input_shape:
            raise ConfigError(
                f"misinformation model takes {self.misinfo.input_shape} → {self.misinfo.num_classes} classes, "
                f"the victim {victim.input_shape} → {victim.num_classes}; they must agree"
            )
        self.misinfo_epochs = 0
        self.calibrated = False

    def modules(self) -> list[nn.Module]:
        return [self.victim, self.misinfo]

    @torch.no_grad()
    def id_score(self, x: Tensor) -> Tensor:
        """The victim's maximum softmax probability per query ``(B,)``."""
        return torch.softmax(self.victim(x), dim=1).amax(dim=1)

    def misinformation_weight(self, score: Tensor) -> Tensor:
        """α = 1 / (1 + exp(ν·(s − τ))) for ID scores ``s`` (computed as a stable sigmoid)."""
        return torch.sigmoid(-self.nu * (score - self.tau))

    @torch.no_grad()
    def calibrate(self, x_val: Tensor) -> float:
        """Set τ to the ``fpr``-quantile of the ID score on held-out ID images; returns τ."""
        if x_val.dim() != 4 or x_val.shape[0] == 0:
            raise ConfigError(f"calibration needs a non-empty (N, C, H, W) batch, got shape {tuple(x_val.shape)}")
        scores = self.id_score(x_val)
        self.tau = float(torch.quantile(scores.double(), self.fpr))
        self.calibrated = True
        log.info("adaptive misinformation: tau = %.6f (fpr %.3f on %d ID images)", self.tau, self.fpr, scores.numel())
        return self.tau

    def _fit(self, data: DefenderData, config: MisinformationFitConfig, options: RunOptions) -> History:
        """Train the misinformation model on the labelled ID training data, then calibrate τ on the validation images.

        Adam, the loss of :func:`misinformation_loss`, light random shifts (as the victim's training);
        batches and shifts come from one generator seeded by ``seed`` and the epochs trained so far.
        """
        x, y = data.x_train, data.y_train
        opt = torch.optim.Adam(self.misinfo.parameters(), lr=config.lr)
        history = History()

        def train_epoch(epoch: int, gen: torch.Generator) -> float:
            self.misinfo.train()
            perm = torch.randperm(x.shape[0], generator=gen)
            total = 0.0
            for i in range(0, x.shape[0], config.batch_size):
                idx = perm[i : i + config.batch_size]
                loss = misinformation_loss(self.misinfo(random_shift(x[idx], config.max_shift, gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            self.misinfo.eval()
            return total / x.shape[0]

        seed = self.seed * 1_000_003 + self.misinfo_epochs
        loop = EpochLoop(
            "misinformation model",
            epochs=config.epochs,
            seed=seed,
            config={**asdict(config), "seed": seed},
            parts={"misinfo": self.misinfo},
            optimizer=opt,
            reseed_each_epoch=False,
        )
        try:
            loop.run(history, train_epoch, options=options)
        finally:
            self.misinfo.eval()
        self.misinfo_epochs += config.epochs
        self.calibrate(data.x_val)
        return history

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)
        # both networks run for every query, so response time does not reveal the detector's verdict
        mis = torch.softmax(self.misinfo(x), dim=1)
        alpha = self.misinformation_weight(y.amax(dim=1))[:, None]
        y_hat = (1 - alpha) * y + alpha * mis
        return DefenseOutput(
            probs=y_hat,
            l1=(y_hat - y).abs().sum(dim=1),
            top1_changed=y_hat.argmax(dim=1) != y.argmax(dim=1),
        )

    def _state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated, "misinfo_epochs": self.misinfo_epochs}

    def _restore_state(self, meta: dict[str, Any]) -> None:
        self.calibrated = bool(meta.get("calibrated", False))
        self.misinfo_epochs = int(meta.get("misinfo_epochs", 0))
