"""Architecture stealing by SVD of the output matrix (Carlini et al., ICML 2024, Algorithm 1).

The logits of a classifier are ``W·g(x) + b`` with ``W`` of shape ``(C, h)``: every logit vector
lies in an affine subspace of dimension at most ``h``, the width of the last hidden layer. Stacking
``n`` answers and reading where the singular values drop reveals ``h`` (the DNF paper, §5.4
"Defense against Model Architecture Stealing", runs this attack with 300 queries against a
200-class ViT-L and reports that DNF's exits hide the width).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.attacks.base import Attack, AttackRun, PoolKind
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError
from fortress.oracle import OutputMode

__all__ = ["ArchSteal", "QuerySource", "estimate_hidden_width"]

log = logging.getLogger(__name__)

#: Where the queried images come from: attacker pool rows, or uniform noise in [0, 1].
QuerySource = Literal["pool", "noise"]

#: Extra queries on top of ``4 × num_classes`` in the default ``num_queries``.
_EXTRA_QUERIES = 16


def estimate_hidden_width(singular_values: Tensor, max_recoverable: int) -> tuple[int, list[float]]:
    """The largest multiplicative gap of a spectrum (Carlini et al. 2024, Algorithm 1).

    With singular values ``s_1 ≥ s_2 ≥ …`` (1-indexed) and ``K = max_recoverable`` (the rank ceiling
    of the centred output matrix), the gaps are ``gap_i = log s_i − log s_{i+1}`` for
    ``i = 1 … K − 1`` and the estimate is ``argmax_i gap_i`` (the number of singular values before
    the largest drop). The gap ``s_K → s_{K+1}`` is left out on purpose: ``s_{K+1}`` onwards are zero
    by construction of the centring (float64 round-off, ~1e-16), while a true low rank only
    drops to the float32 precision of the oracle's answers (~1e-7), so that structural gap would
    always win. Zeros are guarded by flooring every value at ``s_1 · 1e-300`` before the log.

    Args:
        singular_values: descending singular values (any float dtype).
        max_recoverable: ``K`` above; at least 2.

    Returns:
        ``(estimate, log_gaps)``: the estimate in ``[1, K − 1]`` and the ``K − 1`` gaps (nats).
        An all-zero spectrum (constant answers) gives ``(0, [0.0, …])``.

    Example:
        >>> estimate_hidden_width(torch.tensor([5.0, 4.0, 3.0, 1e-6, 1e-7, 0.0]), 5)[0]
        3
    """
    if max_recoverable < 2:
        raise ConfigError(f"max_recoverable must be >= 2 to have a gap, got {max_recoverable}")
    s = singular_values.detach().to(torch.float64)
    k = min(int(max_recoverable), s.numel())
    if k < 2:
        raise ConfigError(f"need at least 2 singular values inside the rank ceiling, got {k}")
    top = float(s[0]) if s.numel() else 0.0
    if not top > 0:
        return 0, [0.0] * (k - 1)
    logs = torch.log(s[:k].clamp_min(top * 1e-300))
    gaps = logs[:-1] - logs[1:]
    return int(gaps.argmax()) + 1, [float(g) for g in gaps]


class ArchSteal(Attack):
    """Hidden-width stealing from soft outputs (Carlini et al., ICML 2024; DNF paper §5.4).

    The attack queries ``num_queries`` images, turns each probability row into log-probabilities
    (``log(max(p, eps))``, float64), and builds the ``n × C`` matrix ``Q``:

    * **row centring** (``center_rows``) subtracts each row's mean over classes. Log-softmax is the
      logits minus a per-query constant, which adds the all-ones direction (rank +1); centring
      removes it exactly. Afterwards every row is orthogonal to the ones vector, so
      ``rank(Q) ≤ C − 1``.
    * **column centring** (``center_columns``) subtracts each class's mean over the queries. A
      classifier bias ``b`` adds the same vector to every row (rank +1: ``h + 1``); centring
      removes it, so the rank becomes ``h`` again (and ``rank(Q) ≤ n − 1``).

    The singular values (``torch.linalg.svdvals`` in float64) then drop sharply after index ``h``,
    and :func:`estimate_hidden_width` returns the index of the largest log-gap.

    **What it can reveal.** ``max_recoverable = min(C − center_rows, n − center_columns)`` is the
    rank ceiling (``C − 1`` with row centring and the default ``n > C``). The estimate lies in
    ``[1, max_recoverable − 1]``, and it equals the true width only when
    ``h < max_recoverable`` — i.e. only for a bottleneck narrower than the number of outputs. For
    the usual vision classifier (``h ≥ C``: ResNet-18 has 512 features for 200 classes) the
    spectrum is full rank and its largest gap says nothing about ``h``.

    **Saturated answers are dropped.** A confident answer's small probabilities sit at or near the
    oracle's floor (``tensors.PROB_EPS``) or lose most of their digits to float32 rounding, so their
    log-probabilities are no longer an affine image of the features and a handful of such rows
    fills the spectrum. Rows whose smallest probability is below ``min_prob`` are left out of the
    SVD (they are still charged). Measured on a 6-wide bottleneck LeNet with one dead unit (true
    rank 5), 200 queries of real digits: with every row the estimate was 7 (wrong); only 26 rows
    passed ``min_prob=1e-6``. Uniform-noise queries are rarely saturated.

    This attack steals architecture, not function: ``clone`` is not trained and is returned
    unchanged (only set to eval mode at the end of the run); with an ``eval_set`` its (untrained)
    accuracy is scored once, for the record.

    Args:
        oracle: soft-label oracle (log-probabilities are needed; hard and top-k are refused).
        budget: queries this attack may spend.
        seed: seeds the noise images or the pool sample.
        num_queries: queries to spend (``None``: ``min(budget, 4·C + 16)``; comfortably more than
            the ``C`` rows needed to reach the rank ceiling; the DNF paper uses 300 for ``C = 200``).
        query_source: ``"noise"`` (uniform images in [0, 1], no data needed) or ``"pool"``
            (rows of the attacker's pool, sampled without replacement).
        center_rows: subtract each answer's mean log-probability (removes the softmax constant).
        center_columns: subtract each class's mean over the queries (removes the classifier bias).
        eps: floor applied to probabilities before the log.
        min_prob: rows whose smallest probability is below this are dropped before the SVD
            (``None``: keep every row).
        query_batch_size: images per oracle call.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> result = ArchSteal(oracle, budget=100).run(create_model("lenet5"))
        >>> result.queries_used, result.extras["max_recoverable"]
        (56, 9)
    """

    name = "arch-steal"
    output_modes = (OutputMode.SOFT,)
    pool_kind = PoolKind.NATURAL  # only with query_source="pool"

    num_queries: int | None = hp(default=None, ge=1)
    query_source: QuerySource = hp(default="noise")
    center_rows: bool = hp(default=True)
    center_columns: bool = hp(default=True)
    eps: float = hp(default=1e-8, gt=0)
    min_prob: float | None = hp(default=1e-6, ge=0)
    query_batch_size: int = hp(default=256, ge=1)

    def _validate(self) -> None:
        k = int(self.oracle.num_classes)
        if self.num_queries is None:
            self.num_queries = min(self.budget, 4 * k + _EXTRA_QUERIES)
        n = self.num_queries
        if n > self.budget:
            raise ConfigError(f"num_queries={n} exceeds the budget of {self.budget} queries")
        if self.min_prob is not None and not self.min_prob < 1 / k:
            raise ConfigError(f"min_prob must be in [0, 1/num_classes) = [0, {1 / k:.3g}) or None, got {self.min_prob}")
        ceiling = min(k - int(self.center_rows), n - int(self.center_columns))
        if ceiling < 2:
            raise ConfigError(
                f"num_queries={n} with {k} classes leaves a rank ceiling of {ceiling}; "
                "at least 2 is needed to locate a gap (query more, or use an oracle with more classes)"
            )

    @property
    def _n(self) -> int:
        assert self.num_queries is not None  # derived in _validate
        return self.num_queries

    def uses_pool(self) -> bool:
        return self.query_source == "pool"

    def _pool_minimum(self) -> tuple[int, str]:
        return self._n, f"num_queries={self._n}"

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Query, centre the log-probabilities, and estimate the hidden width from the spectrum.

        The clone is returned unchanged (this attack does not train one); with an eval set its
        (untrained) accuracy is scored once, for the record. The pool (``query_source="pool"``)
        holds attacker images ``(N, C, H, W)`` in [0, 1], ``N >= num_queries``.

        Extras of the result: ``hidden_width_estimate`` (int; ``None`` when fewer than 3 answers are
        unsaturated), ``rows_used`` (answers kept after the ``min_prob`` filter), ``singular_values``
        (all ``min(rows_used, C)``, descending), ``log_gaps`` (the ``max_recoverable − 1`` candidate gaps, nats),
        ``num_queries``, ``max_recoverable`` (rank ceiling; the estimate is trustworthy only for a true
        width below it), ``query_source``, ``center_rows``, ``center_columns``, ``label_hist``.
        """
        shape = tuple(self.oracle.input_shape)
        if self.query_source == "noise":
            images = torch.rand((self._n, *shape), generator=run.rng)
        else:
            images = run.pool[torch.randperm(run.pool.shape[0], generator=run.rng)[: self._n]]
        probs = run.query_batches(images, self.query_batch_size).to(torch.float64)
        if self.min_prob is not None:
            probs = probs[probs.amin(dim=1) >= self.min_prob]
        rows_used = int(probs.shape[0])
        num_classes = int(self.oracle.num_classes)
        ceiling = min(num_classes - int(self.center_rows), rows_used - int(self.center_columns))
        facts = {
            "num_queries": self._n,
            "rows_used": rows_used,
            "query_source": self.query_source,
            "center_rows": self.center_rows,
            "center_columns": self.center_columns,
        }
        if ceiling < 2:
            log.warning(
                "arch-steal: only %d of %d answers are unsaturated (min_prob=%s); no width can be estimated",
                rows_used,
                self._n,
                self.min_prob,
            )
            return {
                **facts,
                "hidden_width_estimate": None,
                "singular_values": [],
                "log_gaps": [],
                "max_recoverable": max(ceiling, 0),
            }
        q = torch.log(probs.clamp_min(self.eps))
        if self.center_rows:
            q = q - q.mean(dim=1, keepdim=True)
        if self.center_columns:
            q = q - q.mean(dim=0, keepdim=True)
        s = torch.linalg.svdvals(q)
        estimate, gaps = estimate_hidden_width(s, ceiling)
        log.info("arch-steal: %d queries, hidden width estimate %d (rank ceiling %d)", self._n, estimate, ceiling)
        return {
            **facts,
            "hidden_width_estimate": estimate,
            "singular_values": [float(v) for v in s],
            "log_gaps": gaps,
            "max_recoverable": ceiling,
        }
