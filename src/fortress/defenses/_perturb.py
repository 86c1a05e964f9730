"""Shared pieces of the output-perturbation baselines (RandP, MAD, GRAD², reverse sigmoid).

Holds the batched ℓ1-ball projection, the common way a perturbed batch is finished (floor, ℓ1 and
top-1 bookkeeping), the surrogate model MAD and GRAD² reason about, and save/load of a defense
directory (``defense.json`` + ``victim/`` + optional ``surrogate/``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.defenses.base import Defense, DefenseOutput, read_defense_meta
from fortress.errors import ConfigError, UnknownComponent
from fortress.models.io import atomic_write_text, load_model, save_model
from fortress.models.staged import StagedBackbone
from fortress.tensors import PROB_EPS

__all__ = [
    "SurrogateDefense",
    "check_budget",
    "distill_surrogate",
    "finish",
    "l1_ball_project",
    "load_parts",
    "random_surrogate",
    "save_parts",
]

log = logging.getLogger(__name__)

SURROGATE_DIR = "surrogate"


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

    Built-in architectures are rebuilt from the registry; a user's own network is deep-copied and
    every layer that can reset its parameters does so. Initialisation is seeded.
    """
    from fortress.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = create_model(victim.arch, **victim.arch_params)
        except (UnknownComponent, TypeError):
            net = copy.deepcopy(victim)
            for m in net.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    return net.eval()


def distill_surrogate(
    surrogate: nn.Module,
    victim: nn.Module,
    x: Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    max_shift: int = 2,
    seed: int = 0,
) -> list[float]:
    """Train ``surrogate`` to match the victim's posteriors on the defender's images (temperature 1).

    Mirrors GRAD²'s surrogate (Mazeika et al., 2022, distilled from the victim's clean outputs for
    10 epochs), with Adam in place of SGD because LeNet-sized nets train reliably with it.

    Returns:
        The mean soft cross-entropy of each epoch.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ConfigError(f"distillation needs a non-empty (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(surrogate.parameters(), lr=lr)
    losses: list[float] = []
    victim.eval()
    for _ in range(epochs):
        surrogate.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            xb = random_shift(x[perm[i : i + batch_size]], max_shift, gen)
            with torch.no_grad():
                target = torch.softmax(victim(xb), dim=1)
            loss = -(target * F.log_softmax(surrogate(xb), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
        losses.append(total / x.shape[0])
        log.info("surrogate distillation epoch %d/%d soft-CE %.4f", len(losses), epochs, losses[-1])
    surrogate.eval()
    return losses


def save_parts(defense: Defense, directory: Path, params: dict[str, Any], surrogate: StagedBackbone | None) -> Path:
    """Write ``victim/``, optionally ``surrogate/``, and ``defense.json`` = {"defense", "params"}."""
    directory = Path(directory)
    save_model(defense.victim, directory / "victim")
    if surrogate is not None:
        save_model(surrogate, directory / SURROGATE_DIR)
    meta = {"defense": defense.name, "params": params}
    atomic_write_text(directory / "defense.json", json.dumps(meta, indent=2))
    return directory


def load_parts(directory: Path, name: str) -> tuple[StagedBackbone, dict[str, Any], StagedBackbone | None]:
    """Read what :func:`save_parts` wrote: the victim, the saved parameters and the surrogate (if any)."""
    directory = Path(directory)
    _, params = read_defense_meta(directory, name)
    victim = load_model(directory / "victim")
    sdir = directory / SURROGATE_DIR
    surrogate = load_model(sdir) if sdir.is_dir() else None
    return victim, dict(params), surrogate


class SurrogateDefense(Defense):
    """A defense that reasons about the attacker through a surrogate network (MAD, GRAD²).

    Args:
        victim: the trained victim.
        surrogate: the defender's stand-in for the attacker's model; ``None`` builds a seeded,
            randomly initialised copy of the victim's architecture (call :meth:`fit` to distil it).
        seed: seeds the surrogate's initialisation and distillation.
    """

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

    def fit(self, x: Tensor, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 128) -> list[float]:
        """Distil the surrogate from the victim on the defender's own images ``x`` (no labels needed).

        Returns:
            Per-epoch soft cross-entropy.
        """
        for p in self.surrogate.parameters():
            p.requires_grad_(True)
        try:
            losses = distill_surrogate(
                self.surrogate, self.victim, x, epochs=epochs, lr=lr, batch_size=batch_size, seed=self.seed
            )
        finally:
            for p in self.surrogate.parameters():
                p.requires_grad_(False)
        self.surrogate_epochs += epochs
        return losses
