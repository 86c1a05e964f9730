"""Reverse sigmoid (Lee et al., 2019): a deceptive, mostly top-1-preserving output perturbation.

ŷ = α·(y − β·(σ(γ·σ⁻¹(y)) − ½)) elementwise, with σ⁻¹(y) = log(y/(1 − y)) the per-class logit and
α renormalising the row. Small probabilities are pushed up and large ones down, which misleads a
cross-entropy-trained copy while the label mostly stays. This follows Lee et al. and Orekondy et
al.'s ``reverse_sigmoid`` (no clamp of the odds ratio, so the top class is perturbed too).
It has no ℓ1 budget; β is tuned to a tolerated accuracy drop (DNF's fair-comparison protocol).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fortress.defenses._perturb import finish
from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone

__all__ = ["ReverseSigmoid"]


class ReverseSigmoid(Defense):
    """Reverse-sigmoid output perturbation (Lee et al., 2019).

    Args:
        victim: the trained victim.
        beta: perturbation magnitude β > 0 (ModelGuard uses 0.21 for 10-class CIFAR10).
        gamma: slope γ > 0 of the inner sigmoid (0.2 in ModelGuard and for non-CIFAR10 data in Mazeika et al.).

    Example:
        >>> from fortress.models import create_model
        >>> ReverseSigmoid(create_model("lenet5"))(torch.rand(2, 1, 28, 28)).sum(1)
        tensor([1.0000, 1.0000])
    """

    name = "reverse-sigmoid"

    def __init__(self, victim: StagedBackbone, *, beta: float = 0.21, gamma: float = 0.2) -> None:
        super().__init__(victim)
        for label, v in (("beta", beta), ("gamma", gamma)):
            if not (math.isfinite(float(v)) and float(v) > 0):
                raise ConfigError(f"{label} must be a finite number > 0, got {v!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)
        return finish(y, reverse_sigmoid(y, self.beta, self.gamma))


def reverse_sigmoid(y: Tensor, beta: float, gamma: float) -> Tensor:
    """Apply the reverse-sigmoid map to probability rows ``y`` and renormalise (negatives clamped to 0).

    Shape:
        ``(B, K)`` → ``(B, K)``.
    """
    # σ⁻¹(0) = −inf and σ⁻¹(1) = +inf map to 0 and 1 through σ(γ·), so no NaN arises for γ > 0.
    r = y - beta * (torch.sigmoid(gamma * torch.logit(y)) - 0.5)
    r = r.clamp_min(0)  # β > 1 can push entries below 0 (Lee et al. clamp before renormalising)
    s = r.sum(dim=1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(torch.finfo(y.dtype).tiny), y)
