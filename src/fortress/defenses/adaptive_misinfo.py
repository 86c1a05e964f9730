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

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.defenses.base import Defense, DefenseOutput, read_defense_meta
from fortress.errors import ArtifactError, ConfigError, UnknownComponent
from fortress.models.io import atomic_write_text, load_model, save_model
from fortress.models.staged import StagedBackbone
from fortress.tensors import check_labels

__all__ = ["AdaptiveMisinformation", "build_adaptive_misinformation", "misinformation_loss"]

log = logging.getLogger(__name__)

MISINFO_DIR = "misinfo"


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
    from fortress.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return create_model(victim.arch, **victim.arch_params).eval()
        except (UnknownComponent, TypeError) as exc:
            raise ConfigError(
                f"cannot rebuild the victim's architecture {victim.arch!r} for the misinformation model; "
                "pass misinfo=<a network with the same input shape and classes>"
            ) from exc


class AdaptiveMisinformation(Defense):
    """Answer ID-looking queries with the victim and OOD-looking ones with a misinformation model.

    Args:
        victim: the trained victim (its max softmax is the ID score).
        tau: ID-score threshold τ; queries scoring below it are answered by the misinformation
            model. :meth:`calibrate` (called by :meth:`fit` when given validation images) sets it
            from ``fpr``. Default 0.5 until calibrated.
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

    def fit(
        self,
        x: Tensor,
        y: Tensor,
        *,
        x_val: Tensor | None = None,
        epochs: int = 5,
        lr: float = 1e-3,
        batch_size: int = 128,
        max_shift: int = 2,
    ) -> list[float]:
        """Train the misinformation model on labelled ID data; calibrate τ on ``x_val`` if given.

        Adam, the loss of :func:`misinformation_loss`, light random shifts (as the victim's training).

        Returns:
            The mean loss of each epoch.
        """
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
        y = check_labels(y, len(x), self.num_classes, name="labels")
        if x.dim() != 4 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"need matching non-empty images and labels, got {tuple(x.shape)} and {tuple(y.shape)}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.misinfo_epochs)
        opt = torch.optim.Adam(self.misinfo.parameters(), lr=lr)
        losses: list[float] = []
        self.misinfo.train()
        try:
            for epoch in range(epochs):
                perm = torch.randperm(x.shape[0], generator=gen)
                total = 0.0
                for i in range(0, x.shape[0], batch_size):
                    idx = perm[i : i + batch_size]
                    loss = misinformation_loss(self.misinfo(random_shift(x[idx], max_shift, gen)), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * idx.numel()
                losses.append(total / x.shape[0])
                log.info("misinformation model epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
        finally:
            self.misinfo.eval()
        self.misinfo_epochs += epochs
        if x_val is not None:
            self.calibrate(x_val)
        return losses

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

    def hparams(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "nu": self.nu,
            "fpr": self.fpr,
            "seed": self.seed,
            "calibrated": self.calibrated,
            "misinfo_epochs": self.misinfo_epochs,
        }

    def save(self, directory: Path) -> Path:
        """Write ``victim/``, ``misinfo/`` (safetensors + JSON each) and ``defense.json``."""
        directory = Path(directory)
        save_model(self.victim, directory / "victim")
        save_model(self.misinfo, directory / MISINFO_DIR)
        params = {"tau": self.tau, "nu": self.nu, "fpr": self.fpr, "seed": self.seed}
        meta = {
            "defense": self.name,
            "params": params,
            "calibrated": self.calibrated,
            "misinfo_epochs": self.misinfo_epochs,
        }
        atomic_write_text(directory / "defense.json", json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path) -> AdaptiveMisinformation:
        """Restore a defense saved by :meth:`save`."""
        directory = Path(directory)
        meta, params = read_defense_meta(directory, cls.name)
        victim = load_model(directory / "victim")
        misinfo = load_model(directory / MISINFO_DIR)
        try:
            am = cls(victim, misinfo=misinfo, **params)
        except TypeError as exc:
            raise ArtifactError(f"{directory / 'defense.json'} has invalid {cls.name} parameters: {exc}") from exc
        am.calibrated = bool(meta.get("calibrated", False))
        am.misinfo_epochs = int(meta.get("misinfo_epochs", 0))
        return am


def build_adaptive_misinformation(
    victim: StagedBackbone,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    *,
    fpr: float = 0.05,
    nu: float = 1000.0,
    epochs: int = 5,
    seed: int = 0,
    out: Path | None = None,
) -> AdaptiveMisinformation:
    """Build, train and calibrate Adaptive Misinformation around ``victim``; save to ``out`` if given.

    Args:
        victim: the trained victim.
        x_train: the defender's labelled ID images (the misinformation model's training set).
        y_train: their labels.
        x_val: held-out ID images for calibrating τ at ``fpr``.
        fpr: false-positive rate of the OOD detector on ID data.
        nu: sigmoid steepness.
        epochs: misinformation-model training epochs.
        seed: seeds initialisation and batch order.
        out: directory to save to (``None``: not saved).
    """
    am = AdaptiveMisinformation(victim, nu=nu, fpr=fpr, seed=seed)
    am.fit(x_train, y_train, x_val=x_val, epochs=epochs)
    if out is not None:
        am.save(out)
    return am
