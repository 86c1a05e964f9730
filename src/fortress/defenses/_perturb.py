"""Shared pieces of the output-perturbation baselines (RandP, MAD, GRAD², reverse sigmoid).

Holds the batched ℓ1-ball projection, the common way a perturbed batch is finished (floor, ℓ1 and
top-1 bookkeeping) and the surrogate model MAD and GRAD² reason about, with its distillation.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.defenses.base import DefenseOutput
from fortress.defenses.trainable import DefenderData, NetworkFitConfig, TrainableDefense
from fortress.errors import ConfigError, ModelFactoryError, UnknownComponent
from fortress.models.staged import StagedBackbone
from fortress.tensors import PROB_EPS
from fortress.training import EpochLoop, History, RunOptions

__all__ = [
    "SurrogateDefense",
    "SurrogateFitConfig",
    "check_budget",
    "distill_surrogate",
    "finish",
    "l1_ball_project",
    "random_surrogate",
]

log = logging.getLogger(__name__)


def check_budget(epsilon: float) -> float:
    """Validate an output-space ℓ1 budget: the simplex has ℓ1 diameter 2, so ε must lie in [0, 2]."""
    eps = float(epsilon)
    if not 0.0 <= eps <= 2.0:
        raise ConfigError(f"epsilon (ℓ1 budget in output space) must be in [0, 2], got {epsilon!r}")
    return eps


def l1_ball_project(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the ℓ1 ball of ``radius`` (Duchi et al., 2008).

    Sort-based and batched: rows already inside the ball are returned unchanged; the others are
    soft-thresholded at the per-row θ that puts them on the sphere, signs kept.

    Shape:
        ``(B, K)`` → ``(B, K)``.
    """
    a = v.abs()
    k = v.shape[1]
    u = torch.sort(a, dim=1, descending=True).values
    css = u.cumsum(dim=1) - radius
    idx = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / idx) > 0).sum(dim=1, keepdim=True).clamp_min(1)
    theta = (css.gather(1, rho - 1) / rho.to(v.dtype)).clamp_min(0)
    inside = a.sum(dim=1, keepdim=True) <= radius
    shrunk = torch.sign(v) * (a - theta).clamp_min(0)
    return torch.where(inside, v, shrunk)


def finish(y: Tensor, y_hat: Tensor, floor: float = PROB_EPS) -> DefenseOutput:
    """Floor ``y_hat`` at ``floor`` and renormalise, then report per-row ℓ1 to ``y`` and top-1 changes.

    The floor keeps every answer strictly positive (attacks such as DFME take logs of it); it moves
    at most ``K·floor`` mass, far inside the 1e-4 tolerance on the budget.
    """
    q = y_hat.clamp_min(floor)
    q = q / q.sum(dim=1, keepdim=True)
    l1 = (q - y).abs().sum(dim=1)
    changed = q.argmax(dim=1) != y.argmax(dim=1)
    return DefenseOutput(probs=q, l1=l1, top1_changed=changed)


def random_surrogate(victim: StagedBackbone, seed: int) -> StagedBackbone:
    """A freshly initialised network with the victim's architecture (the defender's model of the attacker).

    Built-in and user architectures named by a factory are rebuilt (:func:`~fortress.models.user.rebuild_architecture`);
    a network staged in Python is deep-copied and
    every layer that can reset its parameters does so. Initialisation is seeded.
    """
    from fortress.models.user import rebuild_architecture

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = rebuild_architecture(victim)
        except (UnknownComponent, ModelFactoryError, TypeError):
            net = copy.deepcopy(victim)
            for m in net.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    return net.eval()


@dataclass(frozen=True)
class SurrogateFitConfig(NetworkFitConfig):
    """How :meth:`SurrogateDefense.fit` distils the surrogate (GRAD²: 10 epochs)."""

    epochs: int = 10


def distill_surrogate(
    surrogate: nn.Module,
    victim: nn.Module,
    x: Tensor,
    *,
    config: SurrogateFitConfig | None = None,
    seed: int = 0,
    options: RunOptions | None = None,
) -> History:
    """Train ``surrogate`` to match the victim's posteriors on the defender's images (temperature 1).

    Mirrors GRAD²'s surrogate (Mazeika et al., 2022, distilled from the victim's clean outputs for
    10 epochs), with Adam in place of SGD because LeNet-sized nets train reliably with it. Batches
    and shifts come from one generator seeded with ``seed``; runs in the resumable epoch loop.

    Returns:
        The history; ``loss`` is the mean soft cross-entropy of each epoch.
    """
    cfg = config or SurrogateFitConfig()
    if x.dim() != 4 or x.shape[0] == 0:
        raise ConfigError(f"distillation needs a non-empty (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    opt = torch.optim.Adam(surrogate.parameters(), lr=cfg.lr)
    history = History()
    victim.eval()

    def train_epoch(epoch: int, gen: torch.Generator) -> float:
        surrogate.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], cfg.batch_size):
            xb = random_shift(x[perm[i : i + cfg.batch_size]], cfg.max_shift, gen)
            with torch.no_grad():
                target = torch.softmax(victim(xb), dim=1)
            loss = -(target * F.log_softmax(surrogate(xb), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
        surrogate.eval()
        return total / x.shape[0]

    loop = EpochLoop(
        "surrogate distillation",
        epochs=cfg.epochs,
        seed=seed,
        config={**asdict(cfg), "seed": seed},
        parts={"surrogate": surrogate},
        optimizer=opt,
        reseed_each_epoch=False,
    )
    return loop.run(history, train_epoch, options=options)


class SurrogateDefense(TrainableDefense[SurrogateFitConfig]):
    """A defense that reasons about the attacker through a surrogate network (MAD, GRAD²).

    Args:
        victim: the trained victim.
        surrogate: the defender's stand-in for the attacker's model; ``None`` builds a seeded,
            randomly initialised copy of the victim's architecture (call :meth:`fit` to distil it).
        seed: seeds the surrogate's initialisation and distillation.
    """

    saved_parts = ("surrogate",)
    fit_config = SurrogateFitConfig

    def __init__(self, victim: StagedBackbone, *, surrogate: StagedBackbone | None = None, seed: int = 0) -> None:
        super().__init__(victim)
        self.seed = int(seed)
        self.surrogate = random_surrogate(victim, self.seed) if surrogate is None else surrogate
        if self.surrogate.num_classes != victim.num_classes:
            raise ConfigError(
                f"surrogate has {self.surrogate.num_classes} classes, the victim {victim.num_classes}; they must agree"
            )
        self.surrogate.eval()
        for p in self.surrogate.parameters():
            p.requires_grad_(False)
        self.surrogate_epochs = 0

    def modules(self) -> list[nn.Module]:
        return [self.victim, self.surrogate]

    def _state(self) -> dict[str, Any]:
        return {"surrogate_epochs": self.surrogate_epochs}

    def _restore_state(self, meta: dict[str, Any]) -> None:
        self.surrogate_epochs = int(meta.get("surrogate_epochs", 0))

    def _fit(self, data: DefenderData, config: SurrogateFitConfig, options: RunOptions) -> History:
        """Distil the surrogate from the victim on the defender's own training images (no labels used)."""
        for p in self.surrogate.parameters():
            p.requires_grad_(True)
        try:
            history = distill_surrogate(
                self.surrogate, self.victim, data.x_train, config=config, seed=self.seed, options=options
            )
        finally:
            for p in self.surrogate.parameters():
                p.requires_grad_(False)
        self.surrogate_epochs += config.epochs
        return history
