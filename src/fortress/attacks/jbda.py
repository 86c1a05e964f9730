"""Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017) and PRADA's variants (Juuti et al. 2019).

Start from a small queried seed set, train the clone, then grow the set with points the clone's
input gradient says lie near its decision boundaries, query them, and repeat until the budget is
spent. Sign conventions follow the ModelGuard / prediction-poisoning code (see the class docstring).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks.base import AttackRun, PoolKind
from fortress.attacks.growing_set import GrowingSetAttack
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError

__all__ = ["JBDA", "JBDAVariant"]

#: Augmentation policies: Papernot's step, its mirror image, PRADA's targeted top-k PGD and the
#: targeted-random PGD (JBDA-TR) of the ModelGuard lineage.
JBDAVariant = Literal["jbda", "jbself", "jbtop", "jbtr"]

#: Rows per forward/backward pass when computing input gradients (bounds memory, stays batched).
_GRAD_CHUNK = 1024


class JBDA(GrowingSetAttack):
    """JBDA (Papernot et al., AsiaCCS 2017) with the JB-self and JB-top-k variants of PRADA (Juuti et al. 2019).

    ``seed_size`` random pool images are queried; then every round (1) trains the clone on the whole
    labelled set ``D`` (soft cross-entropy on the oracle's rows: probabilities, renormalised top-k
    rows or one-hot rows), from its initial weights when ``retrain_from_scratch``, and (2) augments
    ``D`` and queries the new points. With ``y`` the oracle's top-1 label of ``x`` and
    ``δ = λ·sign(∇x CE(clone(x), y))``:

    * ``"jbda"`` queries ``x + δ`` (an untargeted FGSM step, away from ``y``; this is the
      ModelGuard/PRADA convention, which may differ in sign from Papernot's original);
    * ``"jbself"`` queries ``x − δ``;
    * ``"jbtop"`` runs, for each of the clone's ``top_k`` most likely classes other than ``y``, a
      targeted PGD attack (L∞ radius λ, ``pgd_steps`` steps of ``1.85·λ/pgd_steps``) toward it, so
      ``top_k`` queries per point;
    * ``"jbtr"`` (JBDA-TR) runs ``top_k`` targeted PGD attacks per point toward a random class
      other than ``y``, re-drawn at every PGD step (seeded).

    Every point is clipped to [0, 1] in pixel space (the reference code clips in normalised space).
    ``D`` grows by ``(1 + k)``× per round (``k = 1`` except for ``jbtop``); the last round is cut
    (a seeded random subset of ``D`` is augmented) so the attack spends exactly ``budget`` queries
    when the rounds allow it. The loop stops when the budget is spent or ``rounds`` augmentation
    rounds are done, and the clone is trained once more on the final ``D``.

    Papernot's two query savers are options: the periodic step ``λ_ρ = λ·(−1)^⌊ρ/τ⌋`` (``tau``;
    round ``ρ`` counts augmentation rounds from 0), and reservoir sampling (``kappa``, ``sigma``):
    from augmentation round ``sigma`` on, only ``kappa`` points of ``D``, drawn at random, are
    augmented per round, so ``D`` grows linearly instead of doubling.

    Args:
        oracle: soft, hard or top-k oracle.
        budget: queries to spend (seed set included).
        seed: seeds the seed-set draw, subset draws, the clone's batch order and torch's RNG.
        variant: ``"jbda"``, ``"jbself"`` or ``"jbtop"``.
        seed_size: pool images in the seed set (Papernot: 150 for MNIST).
        step: λ, the FGSM step and PGD radius in [0, 1] pixel units (paper: 0.1).
        rounds: augmentation rounds (``None``: until the budget is spent; Papernot: 6).
        top_k: target classes per point for ``"jbtop"``, random targets per point for ``"jbtr"``.
        pgd_steps: PGD iterations for ``"jbtop"`` and ``"jbtr"`` (reference: 8).
        tau: period τ of the step-sign flip in rounds (``None``: never flip; Papernot: used, the
            ModelGuard CLI default is 5).
        kappa: points augmented per round from round ``sigma`` on (``None``: every point; Papernot: 400).
        sigma: augmentation rounds before reservoir sampling starts (Papernot: 3).
        epochs_per_round: clone training epochs per round (Papernot: about 10).
        lr: Adam learning rate of the clone.
        batch_size: training mini-batch size.
        retrain_from_scratch: reset the clone to its initial weights before each round's training
            (ModelGuard); otherwise fine-tune across rounds.
        top1: train on the top-1 label of every answer only (the attacker's counter to output
            perturbation; with JBDA-TR this is ModelGuard's "top-1" attacker variant).

    Example:
        >>> from fortress.defenses import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")), output_mode="hard")
        >>> attack = JBDA(oracle, budget=40, seed_size=10, epochs_per_round=1)
        >>> result = attack.run(create_model("lenet5"), torch.rand(20, 1, 28, 28))
        >>> result.queries_used, result.extras["set_size"], result.extras["rounds"]
        (40, 40, 2)
    """

    name = "jbda"
    pool_kind = PoolKind.ID_SEEDS
    default_pool = "mnist-attacker"

    variant: JBDAVariant = hp(default="jbda")
    seed_size: int = hp(default=150, ge=1)
    step: float = hp(default=0.1, gt=0, le=1, unit="pixel units")
    rounds: int | None = hp(default=None, ge=0)
    top_k: int = hp(default=1, ge=1)
    pgd_steps: int = hp(default=8, ge=1)
    epochs_per_round: int = hp(default=10, ge=1)
    tau: int | None = hp(default=None, ge=1, unit="round")
    kappa: int | None = hp(default=None, ge=1, unit="point")
    sigma: int = hp(default=3, ge=0, unit="rounds")

    def _validate(self) -> None:
        if self.seed_size > self.budget:
            raise ConfigError(f"seed_size ({self.seed_size}) must not exceed the budget ({self.budget})")
        k = self.oracle.num_classes
        if self.top_k > k - 1:
            raise ConfigError(f"top_k must be at most num_classes - 1 = {k - 1}, got {self.top_k}")

    @property
    def _per_point(self) -> int:
        """New queries per augmented point."""
        return self.top_k if self.variant in ("jbtop", "jbtr") else 1

    def step_sign(self, round_index: int) -> float:
        """Papernot's periodic step sign ``(−1)^⌊ρ/τ⌋`` for augmentation round ``ρ`` (``+1`` without τ)."""
        return 1.0 if self.tau is None else float((-1) ** (round_index // self.tau))

    # -- augmentation ---------------------------------------------------------------------------
    def _input_grad(self, clone: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
        """``∇x Σ CE(clone(x), labels)`` (per-row input gradients), computed in chunks."""
        device = next(clone.parameters()).device
        grads: list[Tensor] = []
        for i in range(0, x.shape[0], _GRAD_CHUNK):
            xb = x[i : i + _GRAD_CHUNK].to(device).requires_grad_(True)
            loss = F.cross_entropy(clone(xb), labels[i : i + _GRAD_CHUNK].to(device), reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            grads.append(g.to(x.device))
        return torch.cat(grads)

    def _top_targets(self, clone: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
        """The clone's ``top_k`` most likely classes other than ``labels``, ``(N, top_k)``."""
        device = next(clone.parameters()).device
        out: list[Tensor] = []
        with torch.no_grad():
            for i in range(0, x.shape[0], _GRAD_CHUNK):
                logits = clone(x[i : i + _GRAD_CHUNK].to(device)).float()
                logits.scatter_(1, labels[i : i + _GRAD_CHUNK].to(device).unsqueeze(1), float("-inf"))
                out.append(logits.topk(self.top_k, dim=1).indices.to(x.device))
        return torch.cat(out)

    def _random_targets(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        """A uniformly random class other than each label, ``(N,)``."""
        k = self.oracle.num_classes
        offset = torch.randint(1, k, labels.shape, generator=generator)
        return (labels + offset) % k

    def augment(
        self,
        clone: nn.Module,
        x: Tensor,
        labels: Tensor,
        *,
        sign: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """New points from ``x`` with oracle labels ``labels``, per :attr:`variant`, clipped to [0, 1].

        Args:
            clone: the current clone (its input gradients steer the new points).
            x: points of ``D`` to augment.
            labels: their oracle top-1 labels.
            sign: Papernot's periodic step sign (``+1`` or ``−1``) applied to λ.
            generator: draws the random targets of ``"jbtr"``.

        Shape:
            ``(N, C, H, W)`` and ``(N,)`` → ``(N·k, C, H, W)`` (``k = top_k`` for ``"jbtop"`` and
            ``"jbtr"``, else 1; the ``k`` points of one input are adjacent).
        """
        clone.eval()
        if self.variant in ("jbda", "jbself"):
            delta = sign * self.step * self._input_grad(clone, x, labels).sign()
            new = x + delta if self.variant == "jbda" else x - delta
            return new.clamp(0.0, 1.0)
        x0 = x.repeat_interleave(self.top_k, dim=0)
        y0 = labels.repeat_interleave(self.top_k, dim=0)
        if self.variant == "jbtop":
            targets = self._top_targets(clone, x, labels).reshape(-1)
        alpha = 1.85 * self.step / self.pgd_steps
        adv = x0.clone()
        for _ in range(self.pgd_steps):
            if self.variant == "jbtr":
                targets = self._random_targets(y0, generator)
            g = self._input_grad(clone, adv, targets)
            adv = adv - alpha * g.sign()  # descend the loss of the target class
            adv = torch.minimum(torch.maximum(adv, x0 - self.step), x0 + self.step).clamp(0.0, 1.0)
        return adv

    # -- the attack -----------------------------------------------------------------------------
    def _epochs(self) -> int:
        return self.epochs_per_round

    def _seed_count(self) -> int:
        return self.seed_size

    def _pool_minimum(self) -> tuple[int, str]:
        return self.seed_size, f"seed_size={self.seed_size}"

    def _grow(self, run: AttackRun, x: Tensor, y: Tensor, round_index: int) -> Tensor | None:
        """Augment ``D`` (a seeded subset of it in the last round, or from round ``sigma`` with ``kappa``)."""
        left = run.queries_left
        if left <= 0 or (self.rounds is not None and round_index >= self.rounds):
            return None
        n_points = x.shape[0]
        take = n_points
        if self.kappa is not None and round_index >= self.sigma:
            take = min(take, self.kappa)  # reservoir sampling: κ random points of D
        take = min(take, math.ceil(left / self._per_point))  # cut the last round to the budget
        if take < n_points:
            idx = torch.randperm(n_points, generator=run.rng)[:take]
            x, y = x[idx], y[idx]
        sign = self.step_sign(round_index)
        return self.augment(run.clone, x, y.argmax(dim=1), sign=sign, generator=run.rng)[:left]

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Query a seed set from the pool, then alternate clone training and Jacobian augmentation.

        The pool holds the attacker's in-distribution images ``(N, C, H, W)`` in [0, 1], ``N >=
        seed_size``. Checkpoints are scored after a round's training whenever ``eval_every`` queries
        have passed since the last one (``None``: after every round).

        Extras of the result: ``rounds`` (augmentation rounds done), ``set_size`` (final ``|D|``),
        ``round_sizes`` (``|D|`` at each training), ``label_hist`` (oracle top-1 counts over ``D``)
        and ``train_loss`` (last epoch's loss of each training).
        """
        extras = super()._extract(run)
        return {**extras, "set_size": extras["round_sizes"][-1]}
