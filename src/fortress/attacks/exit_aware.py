"""A DNF-aware DFME: learn to spot exit-0 answers, drop them, and steer queries away from them.

DNF (Dynamic Neural Fortresses, ICLR 2025) answers out-of-distribution queries from its first exit
head, trained to mislead. The attacker here knows DNF's algorithm, its exit layout and thresholds
(not its weights) and learns its own detector of exit-0 answers from two kinds of examples it can
label without any help:

* answers to **calibration probes** (uniform noise: as far out of distribution as queries go, so
  DNF answers them from exit 0);
* answers whose **top probability is below the smallest threshold**: no head can have given them
  (a head answers only when its top probability reaches its threshold, Alg. 2), so they come from
  the final exit — the victim's own classifier.

The detector sees either the *shape* of an answer (``signal="confidence"``: the distribution of its
probability mass over the classes other than the top one — a scale-free signature of the exit's
last layer, blind to the confidence the two kinds of examples differ in by construction) or its
*response time* (``signal="timing"``: a DNF computing dynamically answers exit-0 queries sooner;
"model stealing attacks against multi-exit networks", 2023). Answers it flags get
``suspect_weight`` in the clone's loss (0: dropped), and with the confidence signal the generator
is pushed toward queries the detector does not flag.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from fortress.attacks.base import AttackRun
from fortress.attacks.common import safe_log
from fortress.attacks.dfme import DFME, _disagreement
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError
from fortress.oracle import OutputMode

__all__ = ["ExitAware", "ExitDetector", "ExitSignal", "answer_shape"]

log = logging.getLogger(__name__)

#: What the detector reads: the answer's shape, or the response time of the request that carried it.
ExitSignal = Literal["confidence", "timing"]

#: The paper's MNIST thresholds (App. D), the attacker's default knowledge.
MNIST_THRESHOLDS = (0.92, 0.94, 0.96)


def answer_shape(probs: Tensor) -> Tensor:
    """Scale-free features of answer rows: how the mass outside the top class is spread.

    With ``t`` the top class, ``r_j = p_j / (1 − p_t)`` (``j ≠ t``) is the softmax of the exit's
    non-top logits, whatever the top logit (the confidence) is. Features: ``log r`` sorted in
    decreasing order (``K − 1``) and ``log r`` in class order with 0 at ``t`` (``K``).

    Shape:
        ``(B, K)`` probability rows → ``(B, 2K − 1)``.

    Example:
        >>> answer_shape(torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2]])).round(decimals=3)
        tensor([[-0.6930, -0.6930,  0.0000, -0.6930, -0.6930],
                [-0.6930, -0.6930,  0.0000, -0.6930, -0.6930]])
    """
    lp = safe_log(probs)
    top = torch.nn.functional.one_hot(lp.argmax(dim=1), lp.shape[1]).bool()
    rest = lp.masked_fill(top, float("-inf"))
    log_r = rest - torch.logsumexp(rest, dim=1, keepdim=True)
    ordered = log_r.sort(dim=1, descending=True).values[:, :-1]
    return torch.cat([ordered, log_r.masked_fill(top, 0.0)], dim=1)


class ExitDetector:
    """A logistic regression (standardised inputs, balanced classes) that scores "exit 0" (class 1).

    Args:
        seed: seeds the solver.

    Example:
        >>> det = ExitDetector(seed=0)
        >>> det.fit(np.r_[np.zeros((20, 1)), np.ones((20, 1))], np.r_[np.zeros(20), np.ones(20)])
        1.0
        >>> det.score(np.array([[0.0], [1.0]])).round(1).tolist()
        [0.0, 1.0]
    """

    def __init__(self, seed: int = 0) -> None:
        self.model = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed)
        )
        self.ready = False

    def fit(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Fit on ``(N, D)`` features and 0/1 labels; returns the training accuracy."""
        self.model.fit(features, labels)
        self.ready = True
        return float(self.model.score(features, labels))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Probability of exit 0 for every row ``(N,)`` (0 before the first fit)."""
        if not self.ready:
            return np.zeros(features.shape[0])
        out: np.ndarray = self.model.predict_proba(features)[:, 1]
        return out


class ExitAware(DFME):
    """DFME with a learnt exit-0 detector (a DNF-aware attacker; compare DNF paper §5.5, Table 9).

    Before DFME starts, ``calib_queries`` uniform-noise images are queried (counted in the budget):
    their answers are the detector's exit-0 examples. During the run, every student-step answer whose
    top probability is below ``min(thresholds)`` is a final-exit example (the last ``max_examples``
    are kept). Once ``min_examples`` of them exist the detector is fitted, and refitted every
    ``refit_every`` iterations (``refit_every · d_iter`` student batches). Until then the attack is
    plain DFME: dropping every confident answer before the detector exists would stall the clone
    (and with it the generator) while DNF answers nearly everything from exit 0.

    Clone loss: DFME's per-sample disagreement, weighted 1 for answers below the smallest threshold
    and for answers the detector scores below 0.5, ``suspect_weight`` for the others. Generator
    (``signal="confidence"`` only): ``push_weight`` times the detector's exit-0 score of each
    zeroth-order point's answer is added to the objective the generator step descends, so queries
    move toward answers the detector does not flag; it costs no query.

    ``signal="timing"``: student batches are sent in oracle calls of ``timing_batch`` images, each
    timed with ``time.perf_counter`` (the attacker's own clock: over HTTP this is the response time)
    and its latency given to every row of the call; the calibration probes are timed the same way.
    The detector reads ``log`` latency. This leaks only against a DNF computing dynamically
    (``fortress serve --compute dynamic``); ``full`` and ``padded`` hide it (docs/serving.md).

    Everything else is :class:`~fortress.attacks.dfme.DFME` with its defaults and query accounting;
    iterations are what the budget pays for after the calibration probes.

    Args:
        oracle: soft-label oracle.
        budget: queries, calibration probes included.
        seed: seeds DFME, the probes and the detector.
        signal: ``"confidence"`` (answer shape) or ``"timing"`` (response time).
        thresholds: the thresholds the attacker assumes (paper MNIST 0.92/0.94/0.96); only the
            smallest matters.
        calib_queries: noise probes queried first (the exit-0 examples).
        min_examples: final-exit examples needed before the first fit.
        max_examples: final-exit examples kept (the most recent).
        refit_every: iterations between refits.
        suspect_weight: clone-loss weight of flagged answers (0: dropped).
        push_weight: generator push away from flagged answers (confidence signal only; 0: off).
        timing_batch: images per timed oracle call (timing signal).
        batch_size, grad_m, …, tail_student_steps: as for :class:`~fortress.attacks.dfme.DFME`.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> attack = ExitAware(oracle, budget=64 * 7 * 3 + 64, batch_size=64, calib_queries=64, ngf=4, nz=8)
        >>> attack.run(create_model("lenet5-half")).extras["calibration_queries"]
        64
    """

    name = "exit-aware"
    output_modes = (OutputMode.SOFT,)

    signal: ExitSignal = hp(default="confidence")
    thresholds: Sequence[float] = hp(default=MNIST_THRESHOLDS)
    calib_queries: int = hp(default=512, ge=2)
    min_examples: int = hp(default=64, ge=2)
    max_examples: int = hp(default=8192, ge=2)
    refit_every: int = hp(default=10, ge=1, unit="iterations")
    suspect_weight: float = hp(default=0.0, ge=0, le=1)
    push_weight: float = hp(default=1.0, ge=0)
    timing_batch: int = hp(default=1, ge=1)

    def _validate(self) -> None:
        if not self.thresholds or any(not 0 < t < 1 for t in self.thresholds):
            raise ConfigError(f"thresholds must be one or more probabilities in (0, 1), got {self.thresholds}")
        if self.min_examples > self.max_examples:
            raise ConfigError(f"min_examples ({self.min_examples}) must not exceed max_examples ({self.max_examples})")
        if self.budget < self.calib_queries + self.cost_per_iteration:
            raise ConfigError(
                f"budget {self.budget} is below calib_queries + one DFME iteration "
                f"({self.calib_queries} + {self.cost_per_iteration} queries)"
            )
        super()._validate()
        self._r_min = min(self.thresholds)
        self._reset()

    def _reset(self) -> None:
        """A fresh detector and example store (every run learns its own)."""
        self.detector = ExitDetector(seed=self.seed)
        self._positives = np.zeros((0, 1))
        self._negatives: list[np.ndarray] = []
        self._latency: Tensor | None = None
        self._train_acc: float | None = None
        self._stats = {"answers": 0, "below": 0, "flagged": 0, "refits": 0, "batches": 0}

    @property
    def iterations(self) -> int:
        """Full DFME iterations the budget pays for after the calibration probes."""
        return (self.budget - self.calib_queries) // self.cost_per_iteration

    # -- the detector ----------------------------------------------------------------------------
    def _features(self, probs: Tensor, latency: Tensor | None) -> np.ndarray:
        if self.signal == "timing":
            assert latency is not None  # every timed student answer carries its latency
            return latency.clamp_min(1e-9).log().reshape(-1, 1).cpu().double().numpy()
        return answer_shape(probs).cpu().double().numpy()

    def exit0_score(self, probs: Tensor, latency: Tensor | None = None) -> Tensor:
        """The attacker's belief that each answer came from exit 0 ``(B,)``: 0 below the smallest
        threshold, else the detector's score (1 before the first fit: any confident answer may be)."""
        below = probs.amax(dim=1) < self._r_min
        if self.detector.ready:
            score = torch.from_numpy(self.detector.score(self._features(probs, latency))).to(probs)
        else:
            score = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
        return torch.where(below, torch.zeros_like(score), score)

    def _timed_query(self, run: AttackRun, x: Tensor) -> tuple[Tensor, Tensor]:
        answers, latency = [], []
        for i in range(0, x.shape[0], self.timing_batch):
            xb = x[i : i + self.timing_batch]
            t0 = time.perf_counter()
            answers.append(run.query(xb, count=False))
            latency.append(torch.full((xb.shape[0],), time.perf_counter() - t0, dtype=torch.float64))
        return torch.cat(answers), torch.cat(latency)

    def _calibrate(self, run: AttackRun) -> None:
        """Query the noise probes; their answers (or latencies) are the exit-0 examples."""
        probes = torch.rand((self.calib_queries, *self.oracle.input_shape), generator=run.rng).to(run.device)
        if self.signal == "timing":
            answers, latency = self._timed_query(run, probes)
        else:
            answers, latency = run.query_batches(probes, self.batch_size), None
        self._positives = self._features(answers, latency)

    def _refit(self) -> None:
        negatives = np.concatenate(self._negatives)[-self.max_examples :] if self._negatives else np.zeros((0, 1))
        if negatives.shape[0] < self.min_examples:
            return
        self._negatives = [negatives]
        x = np.concatenate([self._positives, negatives])
        y = np.r_[np.ones(self._positives.shape[0]), np.zeros(negatives.shape[0])]
        self._train_acc = self.detector.fit(x, y)
        self._stats["refits"] += 1

    # -- hooks into DFME -------------------------------------------------------------------------
    def _student_query(self, run: AttackRun, x: Tensor) -> Tensor:
        if self.signal != "timing":
            return super()._student_query(run, x)
        answers, self._latency = self._timed_query(run, x)
        return answers

    def _point_objective(self, clone_logits: Tensor, probs: Tensor) -> Tensor:
        value = super()._point_objective(clone_logits, probs)
        if self.push_weight == 0 or self.signal != "confidence" or not self.detector.ready:
            return value
        return value + self.push_weight * self.exit0_score(probs)

    def _student_loss(self, clone: nn.Module, images: Tensor, probs: Tensor) -> Tensor:
        latency, self._latency = self._latency, None
        below = probs.amax(dim=1) < self._r_min
        if bool(below.any()):
            self._negatives.append(self._features(probs[below], None if latency is None else latency[below.cpu()]))
        self._stats["batches"] += 1
        if not self.detector.ready or self._stats["batches"] % (self.refit_every * self.d_iter) == 0:
            self._refit()
        # until the detector has examples of both kinds, every answer counts (plain DFME): dropping
        # all confident answers would stall the clone, and with it the generator, at the start
        flagged = self.exit0_score(probs, latency) >= 0.5 if self.detector.ready else torch.zeros_like(below)
        weights = torch.where(flagged, self.suspect_weight, 1.0).to(probs.dtype)
        self._stats["answers"] += probs.shape[0]
        self._stats["below"] += int(below.sum())
        self._stats["flagged"] += int(flagged.sum())
        per_sample = _disagreement(clone(images), probs, self.loss)
        return (weights * per_sample).sum() / weights.sum().clamp_min(1.0)

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Calibrate, then DFME with the learnt detector.

        Extras, besides DFME's: ``calibration_queries``, ``answers_below_threshold`` and
        ``answers_flagged`` (shares of the student-step answers), ``detector_refits`` and
        ``detector_train_acc`` (on its last fit; ``None`` if it never had enough examples).
        """
        self._reset()
        self._calibrate(run)
        extras = super()._extract(run)
        n = max(self._stats["answers"], 1)
        extras.update(
            {
                "calibration_queries": self.calib_queries,
                "answers_below_threshold": self._stats["below"] / n,
                "answers_flagged": self._stats["flagged"] / n,
                "detector_refits": self._stats["refits"],
                "detector_train_acc": self._train_acc,
                "signal": self.signal,
            }
        )
        return extras
