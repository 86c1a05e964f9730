"""RandP: random perturbation of the victim's probability vector (Orekondy et al., 2020; DNF paper App. C).

Two published "random perturbation" baselines, chosen by ``mode``:

* ``"random-class"`` (default; Mazeika et al., 2022, the "Random" baseline): move ε/2 of the mass
  onto one class drawn uniformly among the non-argmax classes, ŷ = (ε/2)·e_r + (1 − ε/2)·y. It uses
  the output-space ℓ1 budget ‖ŷ − y‖₁ = ε(1 − y_r) ≤ ε that the DNF paper states (§5, ε = 1.0).
* ``"logit-noise"`` (Orekondy et al., 2020, ``rand_noise``): add non-negative noise to each class's
  own logit σ⁻¹(y_k), project it onto the ℓ1 ball of radius ε in *logit* space, map back with the
  sigmoid and renormalise. The output moves far less than ε (sigmoid is ¼-Lipschitz).

Fresh noise is drawn for every call from a generator seeded at construction, so two defenses built
with the same seed answer the same sequence of batches identically; :meth:`RandP.reset_rng` rewinds.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fortress.defenses._perturb import check_budget, finish, l1_ball_project
from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone

__all__ = ["RandP"]

RandPMode = Literal["random-class", "logit-noise"]
NoiseKind = Literal["uniform", "gaussian"]


class RandP(Defense):
    """Random perturbation of the output probabilities within an ℓ1 budget (DNF paper baseline "RandP").

    Args:
        victim: the trained victim.
        epsilon: ℓ1 budget — in output space for ``"random-class"``, in per-class logit space for
            ``"logit-noise"`` (paper §5: 1.0).
        mode: ``"random-class"`` (Mazeika et al.) or ``"logit-noise"`` (Orekondy et al.).
        noise: ``"logit-noise"`` only: ``"uniform"`` draws U[0, 1]·2ε/K per class (expected ℓ1 = ε);
            ``"gaussian"`` draws standard normal noise; both are then projected onto the ℓ1 ball.
        seed: seeds the noise generator.

    Example:
        >>> from fortress.models import create_model
        >>> out = RandP(create_model("lenet5"), seed=0).respond(torch.rand(3, 1, 28, 28))
        >>> bool((out.l1 <= 1.0 + 1e-4).all())
        True
    """

    name = "randp"

    def __init__(
        self,
        victim: StagedBackbone,
        *,
        epsilon: float = 1.0,
        mode: RandPMode = "random-class",
        noise: NoiseKind = "uniform",
        seed: int = 0,
    ) -> None:
        super().__init__(victim)
        if mode not in ("random-class", "logit-noise"):
            raise ConfigError(f"mode must be 'random-class' or 'logit-noise', got {mode!r}")
        if noise not in ("uniform", "gaussian"):
            raise ConfigError(f"noise must be 'uniform' or 'gaussian', got {noise!r}")
        if mode == "logit-noise":
            if not float(epsilon) >= 0:
                raise ConfigError(f"epsilon (ℓ1 budget in logit space) must be >= 0, got {epsilon!r}")
            self.epsilon = float(epsilon)
        else:
            self.epsilon = check_budget(epsilon)
        self.mode: RandPMode = mode
        self.noise: NoiseKind = noise
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def reset_rng(self) -> None:
        """Rewind the noise generator to its seed (the next calls repeat the first ones)."""
        self._gen.manual_seed(self.seed)

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)
        if self.mode == "random-class":
            return finish(y, self._random_class(y))
        return finish(y, self._logit_noise(y))

    def _random_class(self, y: Tensor) -> Tensor:
        b, k = y.shape
        top = y.argmax(dim=1)
        r = torch.randint(0, k - 1, (b,), generator=self._gen).to(y.device)
        r = r + (r >= top).long()  # uniform over the K − 1 classes that are not the argmax
        half = self.epsilon / 2
        return (1 - half) * y + half * torch.nn.functional.one_hot(r, k).to(y.dtype)

    def _logit_noise(self, y: Tensor) -> Tensor:
        b, k = y.shape
        if self.noise == "uniform":
            delta = torch.rand((b, k), generator=self._gen) * (2 * self.epsilon / k)
        else:
            delta = torch.randn((b, k), generator=self._gen)
        delta = l1_ball_project(delta.to(device=y.device, dtype=y.dtype), self.epsilon)
        # σ⁻¹ per class; y = 0 or 1 gives ∓inf, which the sigmoid maps back without NaN.
        z = torch.logit(y)
        y_hat = torch.sigmoid(z + delta)
        return y_hat / y_hat.sum(dim=1, keepdim=True)
