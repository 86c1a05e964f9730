"""Knockoff Nets with averaged re-queries: an attacker's counter to output perturbation (smoothing).

Each transfer-set image is queried ``repeats`` times — itself and jittered copies (small random
shifts, pixel noise) — and the clone trains on the mean answer. Noise drawn per query, and
perturbations that jump with small input changes, partly average out; the price is ``repeats``
queries per image. ModelGuard (Tang et al., USENIX Security 2024) evaluates defenses against this
attacker ("qpi averaging"); the original idea of averaging repeated answers against randomised
defenses is the prediction-poisoning code's ``queries_per_image``.
"""

from __future__ import annotations

from typing import Any

import torch

from fortress.attacks.answers import smoothed_answers, top1_rows
from fortress.attacks.base import Attack, AttackRun, PoolKind
from fortress.attacks.common import OptimizerName, train_transfer_set
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError
from fortress.oracle import OutputMode

__all__ = ["Smoothing"]


class Smoothing(Attack):
    """Knockoff-random transfer set, each image answered by the mean of ``repeats`` jittered queries.

    ``n = min(budget // repeats, len(pool))`` pool images are drawn uniformly without replacement
    (seeded); image ``i`` is sent as itself and ``repeats − 1`` copies shifted by up to
    ``max_shift`` pixels with Gaussian pixel noise ``noise_std`` (clamped to [0, 1]), in oracle
    calls of ``query_batch_size`` rows; its answer is the mean of the ``repeats`` rows (optionally
    reduced to its top-1, ``top1``). The clone then trains like Knockoff's random strategy (soft
    cross-entropy, Adam). Queries: exactly ``n · repeats``.

    Args:
        oracle: soft, hard or top-k oracle (hard answers average to vote shares).
        budget: queries (``repeats`` per transfer-set image).
        seed: seeds the pool draw, the jitter and the batch order.
        repeats: queries per image, the image itself included (1: plain Knockoff).
        max_shift: largest shift of a jittered copy, in pixels.
        noise_std: pixel noise of a jittered copy.
        top1: train on the top-1 label of the mean answer instead of the mean row.
        query_batch_size: rows per oracle call.
        epochs, batch_size, optimizer, lr, max_train_shift: clone training, as Knockoff's
            ``epochs``, ``batch_size``, ``optimizer``, ``lr`` and ``max_shift``.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> attack = Smoothing(oracle, budget=100, repeats=4, epochs=1)
        >>> result = attack.run(create_model("lenet5-half"), torch.rand(50, 1, 28, 28))
        >>> result.queries_used, result.extras["transfer_set_size"]
        (100, 25)
    """

    name = "smoothing"
    output_modes = (OutputMode.SOFT, OutputMode.HARD, OutputMode.TOPK)
    pool_kind = PoolKind.NATURAL
    default_pool = "patches"

    repeats: int = hp(default=4, ge=1)
    max_shift: int = hp(default=2, ge=0, unit="pixels")
    noise_std: float = hp(default=0.02, ge=0)
    top1: bool = hp(default=False)
    query_batch_size: int = hp(default=64, ge=1)
    epochs: int = hp(default=30, ge=1)
    batch_size: int = hp(default=64, ge=1)
    optimizer: OptimizerName = hp(default="adam")
    lr: float = hp(default=1e-3, gt=0)
    max_train_shift: int = hp(default=0, ge=0, unit="pixels")

    def _validate(self) -> None:
        if self.budget < self.repeats:
            raise ConfigError(f"budget {self.budget} cannot pay for one image queried repeats={self.repeats} times")

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Extras: ``transfer_set_size``, ``pool_size``, ``stopped_at_pool``, ``train_loss``."""
        pool = run.pool
        n = min(self.budget // self.repeats, pool.shape[0])
        images = pool[torch.randperm(pool.shape[0], generator=run.rng)[:n]]
        targets = smoothed_answers(
            run.query_batches,
            images,
            repeats=self.repeats,
            max_shift=self.max_shift,
            noise_std=self.noise_std,
            batch_size=self.query_batch_size,
            generator=run.rng,
        )
        if self.top1:
            targets = top1_rows(targets)
        losses = train_transfer_set(self, run.clone, images, targets, max_shift=self.max_train_shift, generator=run.rng)
        return {
            "transfer_set_size": n,
            "pool_size": int(pool.shape[0]),
            "stopped_at_pool": self.budget // self.repeats > pool.shape[0],
            "train_loss": losses,
        }
