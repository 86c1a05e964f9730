"""D-DAE: a defense-penetrating extraction attack (Chen, Guan, Gong, Dong, Xue, IEEE S&P 2023).

The attacker knows the defense's algorithm and parameters, not its weights. It builds its own
*shadow* victim, defends it the same way, and learns from (clean, perturbed) answer pairs of the
shadow two small networks: a **detector** (is this answer perturbed?) and a **recovery** network
(perturbed answer → clean answer). The victim's answers that the detector flags are replaced by
their recovery before the clone trains on them.

Attacks never import defenses: the defense's algorithm reaches the attack as an injected
:data:`PerturbFactory`; ``fortress.bench.shadow.perturb_factory`` builds one from a registered
defense name and its parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks.answers import jittered_copies, top1_rows
from fortress.attacks.base import Attack, AttackRun, PoolKind
from fortress.attacks.common import (
    OptimizerName,
    centered_log_probs,
    soft_cross_entropy,
    train_clone,
    train_transfer_set,
)
from fortress.attacks.hparams import hp
from fortress.attacks.replay import reinitialised_copy
from fortress.errors import ConfigError
from fortress.models.train import predict_logits
from fortress.oracle import OutputMode

__all__ = ["DDAE", "PerturbFactory", "Recovery", "fit_recovery"]

log = logging.getLogger(__name__)

#: The defense's algorithm as the attacker knows it: given a model (the attacker's shadow), a
#: function from images ``(B, C, H, W)`` to the *defended* probability rows ``(B, K)`` of that model.
PerturbFactory = Callable[[nn.Module], Callable[[Tensor], Tensor]]


def _mlp(k_in: int, k_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(k_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, k_out)
    )


class Recovery(nn.Module):
    """D-DAE's detector and recovery network over answer rows (inputs: mean-centred log-probabilities).

    Shape:
        :meth:`detect` ``(B, K)`` rows → ``(B,)`` probability that a row is perturbed;
        :meth:`recover` ``(B, K)`` → ``(B, K)`` recovered probability rows;
        :meth:`forward` ``(B, K)`` → ``(B, K)``: recovered where flagged, unchanged elsewhere.
    """

    def __init__(self, num_classes: int, hidden: int = 64, threshold: float = 0.5) -> None:
        super().__init__()
        self.detector = _mlp(num_classes, 1, hidden)
        self.recovery = _mlp(num_classes, num_classes, hidden)
        self.threshold = threshold

    def detect(self, rows: Tensor) -> Tensor:
        """Probability that each row was perturbed ``(B,)``."""
        return torch.sigmoid(self.detector(centered_log_probs(rows)).squeeze(1))

    def recover(self, rows: Tensor) -> Tensor:
        """The recovery network's estimate of each clean row ``(B, K)``."""
        return F.softmax(self.recovery(centered_log_probs(rows)), dim=1)

    @torch.no_grad()
    def forward(self, rows: Tensor) -> Tensor:
        flagged = self.detect(rows) >= self.threshold
        return torch.where(flagged.unsqueeze(1), self.recover(rows), rows)


def fit_recovery(
    clean: Tensor,
    perturbed: Tensor,
    *,
    hidden: int,
    epochs: int,
    batch_size: int,
    lr: float,
    threshold: float,
    generator: torch.Generator,
) -> tuple[Recovery, dict[str, float]]:
    """Train a :class:`Recovery` on shadow answer pairs; report its quality on a held-out fifth.

    The detector learns clean rows (label 0) against perturbed rows (label 1); the recovery network
    learns perturbed → clean with soft cross-entropy (ModelGuard's recovery network uses the same loss).

    Args:
        clean: the shadow's own probability rows ``(N, K)``.
        perturbed: the same rows after the simulated defense ``(N, K)``.
        hidden, epochs, batch_size, lr: the two networks' width and Adam training.
        threshold: detector probability at or above which a row counts as perturbed.
        generator: batch order and the held-out split.

    Returns:
        The trained model (eval mode) and held-out figures: ``detector_acc``, ``l1_before`` and
        ``l1_after`` (mean ℓ1 to the clean row of the perturbed and the recovered rows),
        ``top1_before`` and ``top1_after`` (agreement of their top-1 with the clean top-1).
    """
    n, k = clean.shape
    if n < 10 or perturbed.shape != clean.shape:
        raise ConfigError(
            f"need at least 10 answer pairs of equal shape, got {tuple(clean.shape)} and {tuple(perturbed.shape)}"
        )
    model = Recovery(k, hidden, threshold)
    perm = torch.randperm(n, generator=generator)
    test, train = perm[: n // 5], perm[n // 5 :]
    rows = torch.cat([clean[train], perturbed[train]])
    is_perturbed = torch.cat([torch.zeros(train.numel()), torch.ones(train.numel())])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(train.numel(), generator=generator)
        for i in range(0, train.numel(), batch_size):
            idx = order[i : i + batch_size]
            both = torch.cat([idx, idx + train.numel()])
            detect_loss = F.binary_cross_entropy_with_logits(
                model.detector(centered_log_probs(rows[both])).squeeze(1), is_perturbed[both]
            )
            recover_loss = soft_cross_entropy(
                model.recovery(centered_log_probs(perturbed[train[idx]])), clean[train[idx]]
            )
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(detect_loss + recover_loss)
            opt.step()
    model.eval()
    with torch.no_grad():
        c, p = clean[test], perturbed[test]
        hits = torch.cat([model.detect(c) < threshold, model.detect(p) >= threshold]).float().mean()
        r = model.recover(p)
        quality = {
            "detector_acc": float(hits),
            "l1_before": float((p - c).abs().sum(1).mean()),
            "l1_after": float((r - c).abs().sum(1).mean()),
            "top1_before": float((p.argmax(1) == c.argmax(1)).float().mean()),
            "top1_after": float((r.argmax(1) == c.argmax(1)).float().mean()),
        }
    return model, quality


class DDAE(Attack):
    """D-DAE (Chen et al., IEEE S&P 2023) on a Knockoff-random transfer set.

    1. **Queries.** ``n = min(budget, len(pool))`` pool images are drawn uniformly (seeded) and
       queried once each: the budget is spent here and nowhere else.
    2. **Shadow.** A model of the clone's architecture with fresh weights (the attacker's shadow
       victim) is trained on those images against the victim's top-1 labels (robust to most
       perturbations, which keep the top-1), ``shadow_epochs`` epochs.
    3. **Simulated defense.** ``perturb_factory(shadow)`` defends the shadow with the victim's
       defense algorithm and parameters. On every pool image and ``pair_copies − 1`` jittered copies
       of it (shifts of up to 2 pixels; no query: the shadow is the attacker's), the shadow's clean
       rows and its defended rows form the training pairs (with ``symmetrise``, each pair's classes
       permuted at random).
    4. **Detector and recovery** (:func:`fit_recovery`), then every victim answer the detector flags
       is replaced by its recovery.
    5. ``refine_rounds`` times: the shadow is retrained on the recovered answers (soft
       cross-entropy), which brings its clean rows closer to the victim's, and steps 3–4 repeat.
    6. The clone trains on the recovered answers like Knockoff (soft cross-entropy, Adam).

    Deviations from the paper: one shadow model of the clone's architecture (the paper trains
    several shadows, on data the attacker labels itself, and a meta-classifier that also names
    *which* defense is deployed; here the defense is known, so detection is "perturbed or not");
    the recovery network is an MLP on answer rows trained with soft cross-entropy (the paper uses a
    generative model); the shadow learns from the victim's own top-1 labels on the transfer set
    rather than from a separately labelled data set.

    Args:
        oracle: soft oracle (the rows the defense perturbed).
        budget: queries (one per transfer-set image).
        seed: seeds the draws, the shadow, the jitter, the networks and the batch order.
        perturb_factory: the defense's algorithm (required; see :data:`PerturbFactory`).
        shadow_epochs: shadow training epochs on the transfer set.
        refine_rounds: shadow retrainings on recovered answers (0: none).
        pair_copies: views of each pool image in the shadow pairs (the image and jittered copies).
        recovery_hidden: width of the detector and recovery networks.
        recovery_epochs: their training epochs.
        detect_threshold: detector probability at or above which an answer is recovered.
        symmetrise: permute the classes of every shadow pair at random (the same permutation for
            its clean and its perturbed row), so the detector and the recovery learn no preference
            for particular classes: a defense's choices that depend on weights the attacker cannot
            know (MAD's and GRAD²'s surrogate pick the class that receives the moved mass) differ
            between the shadow and the victim.
        query_batch_size: rows per oracle call.
        epochs, batch_size, optimizer, lr: clone (and shadow) training, as Knockoff's.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> noisy = lambda m: (lambda x: (m(x).softmax(1) + 0.1).div(1 + 0.1 * 10))
        >>> attack = DDAE(oracle, budget=64, perturb_factory=noisy, shadow_epochs=1, recovery_epochs=1, epochs=1)
        >>> attack.run(create_model("lenet5-half"), torch.rand(80, 1, 28, 28)).queries_used
        64
    """

    name = "ddae"
    output_modes = (OutputMode.SOFT,)
    pool_kind = PoolKind.NATURAL
    default_pool = "patches"

    perturb_factory: PerturbFactory | None = hp(default=None)
    shadow_epochs: int = hp(default=30, ge=1)
    refine_rounds: int = hp(default=1, ge=0)
    pair_copies: int = hp(default=4, ge=1)
    recovery_hidden: int = hp(default=64, ge=1)
    recovery_epochs: int = hp(default=30, ge=1)
    detect_threshold: float = hp(default=0.5, gt=0, lt=1)
    symmetrise: bool = hp(default=True)
    query_batch_size: int = hp(default=64, ge=1)
    epochs: int = hp(default=30, ge=1)
    batch_size: int = hp(default=64, ge=2, why="BatchNorm needs two samples")
    optimizer: OptimizerName = hp(default="adam")
    lr: float = hp(default=1e-3, gt=0)

    def _validate(self) -> None:
        if self.perturb_factory is None or not callable(self.perturb_factory):
            raise ConfigError(
                "ddae needs perturb_factory: the defense's algorithm as a function shadow model -> "
                "(images -> defended probability rows); "
                "fortress.bench.shadow.perturb_factory(name, **params) builds one"
            )

    def _pool_minimum(self) -> tuple[int, str]:
        return 10, "10 (the shadow pairs need a held-out part)"

    def _train(self, model: nn.Module, x: Tensor, targets: Tensor, epochs: int, rng: torch.Generator) -> None:
        train_clone(
            model,
            x,
            targets,
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            generator=rng,
        )

    def _pairs(self, shadow: nn.Module, images: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """The shadow's clean and defended rows on ``pair_copies`` views of ``images`` (no query)."""
        assert self.perturb_factory is not None  # checked by _validate
        views = jittered_copies(images, self.pair_copies, max_shift=2, noise_std=0.0, generator=rng)
        shadow.eval()
        device = next(shadow.parameters()).device
        defended = self.perturb_factory(shadow)
        chunks = [views[i : i + 1024] for i in range(0, views.shape[0], 1024)]
        with torch.no_grad():
            clean = F.softmax(predict_logits(shadow, views.to(device)), dim=1).cpu()
            perturbed = torch.cat([defended(c.to(device)).detach().float().cpu() for c in chunks])
        if self.symmetrise:  # one random class permutation per pair, the same for its two rows
            perm = torch.rand(clean.shape, generator=rng).argsort(dim=1)
            clean, perturbed = clean.gather(1, perm), perturbed.gather(1, perm)
        return clean, perturbed

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Extras: ``transfer_set_size``, ``flagged`` (share of victim answers recovered, per
        round), ``recovery`` (held-out quality of each round's detector and recovery on shadow
        pairs, see :func:`fit_recovery`), ``train_loss``."""
        pool, rng, device = run.pool, run.rng, run.device
        n = min(self.budget, pool.shape[0])
        images = pool[torch.randperm(pool.shape[0], generator=rng)[:n]]
        answers = run.query_batches(images, self.query_batch_size).cpu()

        shadow = reinitialised_copy(run.clone, rng).to(device)
        targets = top1_rows(answers)
        flagged: list[float] = []
        quality: list[dict[str, float]] = []
        for _ in range(self.refine_rounds + 1):
            self._train(shadow, images, targets, self.shadow_epochs, rng)
            clean, perturbed = self._pairs(shadow, pool, rng)
            recovery, q = fit_recovery(
                clean,
                perturbed,
                hidden=self.recovery_hidden,
                epochs=self.recovery_epochs,
                batch_size=256,
                lr=1e-3,
                threshold=self.detect_threshold,
                generator=rng,
            )
            with torch.no_grad():
                targets = recovery(answers)
                flagged.append(float((recovery.detect(answers) >= self.detect_threshold).float().mean()))
            quality.append(q)
            log.info("D-DAE: %.1f%% of answers flagged; shadow pairs %s", 100 * flagged[-1], q)

        losses = train_transfer_set(self, run.clone, images, targets, generator=rng)
        return {"transfer_set_size": n, "flagged": flagged, "recovery": quality, "train_loss": losses}
