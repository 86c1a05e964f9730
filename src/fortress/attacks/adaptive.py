"""Adaptive attacks on DNF: a DFME attacker who knows the defense (DNF paper §5.5, App. Table 9).

* **Adaptive Entropy Attack** (``variant="entropy"``): the attacker adds DNF's own entropy term to
  the clone's loss; its single-exit clone plays DNF's final exit, ``K = +1``, so the term lowers the
  clone's output entropy on the attack queries, which the attacker treats as in-distribution.
* **EE Adaptive Entropy Attack** (``variant="ee-entropy"``): the clone also gets exit heads after
  the same stages as the victim's; each query is routed through them with the victim's rule (Alg.
  2), the routed answer is fitted to the victim's, and DNF's ID entropy term ``α·K(i)·H`` is
  applied at every exit (high entropy at the heads, low at the final exit).

Beyond the paper, two cheap uses of the thresholds the attacker is assumed to know: a head only
answers when its top probability reaches its threshold, so **an answer whose top probability is
below the smallest threshold can only come from the final exit** — the victim's own classifier.
:class:`AdaptiveEntropy` can push the generator toward such answers (``push="late-exit"``) and
down-weight the other answers in the clone's loss (``suspect_weight``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fortress.attacks.base import AttackRun
from fortress.attacks.common import keep_requires_grad, safe_log
from fortress.attacks.dfme import DFME, _disagreement
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError
from fortress.exits.network import EarlyExitNet, select_exits
from fortress.functional import entropy
from fortress.models.staged import StagedBackbone
from fortress.oracle import OutputMode

__all__ = ["AdaptiveEntropy", "AdaptiveVariant", "EarlyExitClone", "QueryPush", "answer_margin"]

log = logging.getLogger(__name__)

#: Table 9's two attacks: DNF's entropy loss on a plain clone, or on an early-exit clone.
AdaptiveVariant = Literal["entropy", "ee-entropy"]
#: Generator push on the victim's answers: below every head's threshold, or simply confident.
QueryPush = Literal["late-exit", "confident"]

#: The paper's MNIST thresholds (App. D), the attacker's default guess.
MNIST_THRESHOLDS = (0.92, 0.94, 0.96)


def answer_margin(probs: Tensor) -> Tensor:
    """Per-row log-ratio of the two largest probabilities, ``log p(1) − log p(2)`` ``(B,)``.

    Unlike the top probability it keeps a slope when an answer is saturated (``p(1) → 1``), which
    the zeroth-order generator step needs. A row whose top probability reaches ``r`` has a margin
    of at least ``log(r / (1 − r))``.
    """
    top2 = safe_log(probs).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class EarlyExitClone(nn.Module):
    """A clone with exit heads after the victim's stages (the EE adaptive attack's clone).

    Unlike DNF, the whole network trains: backbone and heads. Calling it returns the *final*
    exit's logits (the clone the attacker keeps and is scored on); :meth:`routed` answers like DNF,
    from the first head whose top probability reaches its threshold (Alg. 2).

    Args:
        backbone: the clone, staged (trained in place).
        exit_after: stages with a head (``None``: every stage, DNF's default).
        thresholds: one per head.
        seed: seeds the heads' initial weights.

    Shape:
        ``(B, C, H, W)`` → final-exit logits ``(B, K)``; :meth:`all_exits` → ``(E, B, K)``.
    """

    def __init__(
        self,
        backbone: StagedBackbone,
        *,
        exit_after: Sequence[int] | None,
        thresholds: Sequence[float],
        seed: int | None = None,
    ) -> None:
        super().__init__()
        with keep_requires_grad(backbone):  # EarlyExitNet freezes the backbone; the attacker trains it
            # plain heads: the attacker copies the layout, not DNF's variational bottleneck
            self.net = EarlyExitNet(
                backbone, exit_after=exit_after, head_kind="plain", thresholds=thresholds, seed=seed
            )

    def train(self, mode: bool = True) -> EarlyExitClone:
        """Heads *and* backbone follow ``mode`` (EarlyExitNet keeps a frozen backbone in eval mode)."""
        super().train(mode)
        self.net.backbone.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Final-exit logits ``(B, K)``."""
        out: Tensor = self.net.backbone(x)
        return out

    def all_exits(self, x: Tensor) -> Tensor:
        """Logits of every exit ``(E, B, K)``, heads first."""
        return self.net.forward_all(x).logits

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Pick each row's exit from :meth:`all_exits` logits: ``(routed logits (B, K), exits (B,))``."""
        exits = select_exits(logits.detach(), self.net.thresholds)
        rows = torch.arange(logits.shape[1], device=logits.device)
        return logits[exits, rows], exits

    def routed(self, x: Tensor) -> Tensor:
        """Logits of each row's threshold-selected exit ``(B, K)`` (differentiable through that exit)."""
        return self.route(self.all_exits(x))[0]


class AdaptiveEntropy(DFME):
    """DFME with DNF's entropy loss, optionally on an early-exit clone (DNF paper §5.5, Table 9).

    Soft labels only (the zeroth-order generator step needs probabilities). Everything else is
    :class:`~fortress.attacks.dfme.DFME` with its defaults and query accounting, so with
    ``alpha=0``, ``push_weight=0`` and ``suspect_weight=1`` the ``"entropy"`` variant *is* DFME.

    What the attacker is assumed to know (nothing else: it never sees the exit a query took, the
    victim's weights or the defender's data):

    * DNF's loss (Eq. 6): the per-exit entropy term ``α_i·K(i)·H`` with ``K = +1`` at the final exit
      and ``−1`` before it, and ``α`` (paper 0.1) — both variants;
    * the exit layout (after which stages of the backbone the heads sit) and that the clone's
      backbone can be staged the same way — ``"ee-entropy"`` only;
    * the confidence thresholds (``thresholds``) — used to route the early-exit clone and by the
      two extensions below. The paper argues that different per-exit thresholds make them hard to
      guess (App. D); the default is the paper's published MNIST set.

    Clone loss per student batch: the DFME disagreement (per sample, weighted as below) between
    the clone's answer — its single output, or for ``"ee-entropy"`` the exit its own routing picks
    — and the victim's answer, plus ``alpha`` times DNF's ID entropy term (single exit: ``+H``; early
    exit clone: ``Σ_i K(i)·H(exit i)`` averaged over exits). The generator step compares the same
    routed answer with the victim's.

    Extensions (off by default, so the defaults reproduce the paper's attacks):

    * ``push="late-exit"`` with ``push_weight > 0`` adds ``w·max(0, m(x) − log(r/(1−r)))`` to the
      per-point objective the generator step descends (DFME's negative disagreement), ``m`` being
      :func:`answer_margin` of the victim's answer and ``r`` the smallest threshold: it pushes
      queries toward answers no head can have given. It is estimated from the same zeroth-order
      queries, so it costs no extra query.
      ``push="confident"`` instead penalises the entropy of the victim's answers (``w·H``). Against
      DNF that is the wrong direction: DNF trains its heads to answer out-of-distribution queries
      *confidently* (Eq. 7, ``J = +1`` before the final exit) so that they pass a threshold and
      leave early; it is kept for comparison;
    * ``suspect_weight < 1`` down-weights, in the clone's loss, the answers whose top probability
      reaches the smallest threshold (they may come from a head); 0 drops them.

    Args:
        oracle: soft-label oracle.
        budget: queries (DFME accounting: ``B·(g_iter·(m+1) + d_iter)`` per iteration).
        seed: seeds everything, the exit heads included.
        variant: ``"entropy"`` (Adaptive Entropy Attack) or ``"ee-entropy"`` (EE Adaptive Entropy Attack).
        alpha: weight of DNF's entropy term (paper α = 0.1).
        exit_after: stages of the clone that get a head (``None``: every stage, DNF's default).
        thresholds: the attacker's thresholds, smallest first exit (paper MNIST 0.92/0.94/0.96).
        push: generator push, see above.
        push_weight: weight of the push term (0: off, as in the paper).
        suspect_weight: clone-loss weight of answers at or above the smallest threshold (1: all equal).
        batch_size, grad_m, grad_epsilon, g_iter, d_iter, nz, ngf, loss, lr_s, student_optimizer,
            momentum_s, weight_decay_s, lr_g, lr_milestones, lr_gamma, diversity_weight,
            reuse_base_queries, tail_student_steps: as for :class:`~fortress.attacks.dfme.DFME`.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> attack = AdaptiveEntropy(oracle, budget=2 * 256 * 7, variant="ee-entropy")
        >>> attack.run(create_model("lenet5-half")).queries_used
        3584
    """

    name = "adaptive-entropy"
    output_modes = (OutputMode.SOFT,)

    variant: AdaptiveVariant = hp(default="entropy")
    alpha: float = hp(default=0.1, ge=0)
    exit_after: Sequence[int] | None = hp(default=None)
    thresholds: Sequence[float] = hp(default=MNIST_THRESHOLDS)
    push: QueryPush = hp(default="late-exit")
    push_weight: float = hp(default=0.0, ge=0)
    suspect_weight: float = hp(default=1.0, ge=0, le=1)

    def _validate(self) -> None:
        super()._validate()
        if not self.thresholds or any(not 0 < t < 1 for t in self.thresholds):
            raise ConfigError(f"thresholds must be one or more probabilities in (0, 1), got {self.thresholds}")
        # an answer with top probability below min(thresholds) cannot come from a head (Alg. 2)
        self._r_min = min(self.thresholds)
        self._margin_at_r = math.log(self._r_min / (1.0 - self._r_min))
        self._answers = 0
        self._below = 0
        self._clone_exits = torch.zeros(0, dtype=torch.int64)

    def answer_weights(self, probs: Tensor) -> Tensor:
        """Clone-loss weight per answer ``(B,)``: 1 below the smallest threshold, ``suspect_weight`` at or above it."""
        below = probs.amax(dim=1) < self._r_min
        return torch.where(below, 1.0, self.suspect_weight).to(probs.dtype)

    # -- hooks into DFME -------------------------------------------------------------------------
    def _clone_logits(self, clone: nn.Module, images: Tensor) -> Tensor:
        if isinstance(clone, EarlyExitClone):
            return clone.routed(images)
        return super()._clone_logits(clone, images)

    def _point_objective(self, clone_logits: Tensor, probs: Tensor) -> Tensor:
        value = super()._point_objective(clone_logits, probs)
        if self.push_weight == 0:
            return value
        if self.push == "late-exit":
            penalty = (answer_margin(probs) - self._margin_at_r).clamp_min(0.0)
        else:
            penalty = entropy(safe_log(probs))
        return value + self.push_weight * penalty  # the generator step descends this value

    def _student_loss(self, clone: nn.Module, images: Tensor, probs: Tensor) -> Tensor:
        if isinstance(clone, EarlyExitClone):
            logits = clone.all_exits(images)
            answer, exits = clone.route(logits)
            e = logits.shape[0]
            signs = torch.full((e,), -1.0, device=logits.device)
            signs[-1] = 1.0  # K(i): +1 at the final exit, -1 at the heads (Eq. 6)
            ent = (signs * entropy(logits.flatten(0, 1)).view(e, -1).mean(dim=1)).mean()
            self._clone_exits += torch.bincount(exits.cpu(), minlength=e)
        else:
            answer = clone(images)
            ent = entropy(answer).mean()  # the single exit is the final one: K = +1
        per_sample = _disagreement(answer, probs, self.loss)
        weights = self.answer_weights(probs)
        fit = (weights * per_sample).sum() / weights.sum().clamp_min(1e-12)
        self._answers += probs.shape[0]
        self._below += int((probs.amax(dim=1) < self._r_min).sum())
        return fit + self.alpha * ent if self.alpha > 0 else fit

    # -- the attack ------------------------------------------------------------------------------
    def _check_clone(self, clone: nn.Module) -> None:
        """The ``"ee-entropy"`` variant needs a staged clone with one threshold per head."""
        if self.variant != "ee-entropy":
            return
        if not isinstance(clone, StagedBackbone):
            raise ConfigError(
                f"the ee-entropy variant needs a staged clone (fortress.models.StagedBackbone) to attach "
                f"exit heads to, got {type(clone).__name__}"
            )
        stages = clone.num_stages if self.exit_after is None else len(self.exit_after)
        if len(self.thresholds) != stages:
            raise ConfigError(
                f"thresholds has {len(self.thresholds)} entries for {stages} exit heads "
                f"(exit_after={self.exit_after}); give one threshold per head"
            )

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Run the adaptive attack; ``clone`` must be a :class:`~fortress.models.StagedBackbone` for ``"ee-entropy"``.

        The clone is trained in place and returned; for ``"ee-entropy"`` its exit heads are
        auxiliary and scored checkpoints use its final exit. Extras, besides DFME's:
        ``answers_below_threshold`` (share of student-step answers whose top probability is below
        the smallest threshold, i.e. certainly from the victim's final exit) and, for
        ``"ee-entropy"``, ``clone_exit_hist`` (where the clone's own routing sent those queries).
        """
        self._answers = self._below = 0
        clone = run.clone
        if self.variant == "ee-entropy":
            assert isinstance(clone, StagedBackbone)  # checked by _check_clone
            ee = EarlyExitClone(clone, exit_after=self.exit_after, thresholds=self.thresholds, seed=self.seed)
            run.clone = ee.to(run.device)
            self._clone_exits = torch.zeros(len(self.thresholds) + 1, dtype=torch.int64)
        extras = super()._extract(run)
        run.clone = clone
        extras["answers_below_threshold"] = self._below / self._answers if self._answers else 0.0
        if self.variant == "ee-entropy":
            total = int(self._clone_exits.sum())
            extras["clone_exit_hist"] = [int(c) / total if total else 0.0 for c in self._clone_exits.tolist()]
        return extras
