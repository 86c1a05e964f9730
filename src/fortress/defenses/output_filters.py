"""Passive output filters: label only, rounded probabilities, top-k (Orekondy et al., 2019/2020).

The simplest baselines of the extraction literature reveal less of each answer without any model
of the attacker: the prediction-poisoning framework exposes them as the ``topk`` and ``rounding``
options of every black box, with top-1 at zero decimals being the hard label (defense fact sheet
§7). Each filter here works on the victim's softmax ``y`` row by row with batched tensor ops and
returns a probability row (finite, ≥ 0, summing to 1) together with the ℓ1 distance to ``y`` and
whether top-1 moved.

Rows may contain exact zeros: that is the information a filter withholds. The oracle floors every
soft answer at :data:`fortress.tensors.PROB_EPS` before an attack sees it, so attacks that take
logs (DFME) stay finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone

__all__ = ["Rounding", "Top1", "TopK", "filtered_output"]

MAX_DECIMALS = 8


def filtered_output(y: Tensor, y_hat: Tensor) -> DefenseOutput:
    """Package a filtered batch: ℓ1 distance of each row to ``y`` and whether its top-1 changed."""
    return DefenseOutput(
        probs=y_hat,
        l1=(y_hat - y).abs().sum(dim=1),
        top1_changed=y_hat.argmax(dim=1) != y.argmax(dim=1),
    )


def _int_param(name: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass; True as a "k" is almost certainly a mistake
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


class _OutputFilter(Defense):
    """A deterministic function of the victim's softmax, applied row by row."""

    def _filter(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)
        return filtered_output(y, self._filter(y))


class Top1(_OutputFilter):
    """Label only: the one-hot row of the victim's top-1 class (Orekondy et al., 2019, "top-1").

    ℓ1 added per query is ``2·(1 − max_k y_k)``; top-1 never changes (ties go to the lowest index,
    as ``argmax`` breaks them).

    Example:
        >>> from fortress.models import create_model
        >>> Top1(create_model("lenet5"))(torch.rand(2, 1, 28, 28)).max(dim=1).values
        tensor([1., 1.])
    """

    name = "top1"

    def __init__(self, victim: StagedBackbone) -> None:
        super().__init__(victim)

    def _filter(self, y: Tensor) -> Tensor:
        return torch.zeros_like(y).scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)


class Rounding(_OutputFilter):
    """Probabilities rounded to ``decimals`` places, then renormalised (Orekondy et al., 2019, "rounding").

    Rounding is half-to-even (``torch.round``). The rounded row is divided by its sum so it stays a
    probability row; a row whose entries all round to 0 (possible only when ``decimals`` is 0 and
    no class reaches 0.5) becomes the one-hot row of the victim's top-1, the closest answer the
    rounding grid allows. Ties created by rounding can move top-1; that is reported.

    Args:
        victim: the trained victim.
        decimals: decimal places kept, 0–8 (default 2).

    Example:
        >>> from fortress.models import create_model
        >>> p = Rounding(create_model("lenet5"), decimals=1)(torch.rand(2, 1, 28, 28))
        >>> bool(torch.allclose(p.sum(dim=1), torch.ones(2)))
        True
    """

    name = "rounding"

    def __init__(self, victim: StagedBackbone, *, decimals: int = 2) -> None:
        super().__init__(victim)
        self.decimals = _int_param("decimals", decimals, 0, MAX_DECIMALS)

    def _filter(self, y: Tensor) -> Tensor:
        # round in float64: 10^-d steps are not exact in float32 and would shift ties
        r = torch.round(y.double(), decimals=self.decimals)
        total = r.sum(dim=1, keepdim=True)
        empty = total <= 0
        onehot = torch.zeros_like(r).scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)
        out = torch.where(empty, onehot, r / torch.where(empty, torch.ones_like(total), total))
        return out.to(y.dtype)


class TopK(_OutputFilter):
    """Only the ``k`` largest probabilities, renormalised to sum 1 (Orekondy et al., 2019, "top-k").

    Ties at the k-th place are broken by ``torch.topk``; the top-1 class is always kept.

    Args:
        victim: the trained victim.
        k: classes kept, 1 ≤ k ≤ K (default 3: a middle setting; ``k = 1`` is the label only,
            as :class:`Top1`).

    Example:
        >>> from fortress.models import create_model
        >>> p = TopK(create_model("lenet5"), k=3)(torch.rand(2, 1, 28, 28))
        >>> (p > 0).sum(dim=1)
        tensor([3, 3])
    """

    name = "topk"

    def __init__(self, victim: StagedBackbone, *, k: int = 3) -> None:
        super().__init__(victim)
        self.k = _int_param("k", k, 1, victim.num_classes)

    def _filter(self, y: Tensor) -> Tensor:
        vals, idx = y.topk(self.k, dim=1)
        kept = torch.zeros_like(y).scatter_(1, idx, vals)
        return kept / kept.sum(dim=1, keepdim=True)
