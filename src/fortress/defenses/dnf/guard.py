"""The utility guard of the DNF recipe: thresholds raised until early exits cost at most a budget of
held-out ID accuracy (beyond the paper, whose App. H searches thresholds under a utility constraint)."""

from __future__ import annotations

import torch
from torch import Tensor

from fortress.defenses.dnf.defense import DNF
from fortress.defenses.dnf.provenance import GuardResult
from fortress.errors import ConfigError
from fortress.tensors import check_labels

__all__ = ["guard_utility"]


@torch.no_grad()
def guard_utility(
    dnf: DNF, x_val: Tensor, y_val: Tensor, *, max_harm: int = 0, max_utility_drop: float = 0.0
) -> GuardResult:
    """Raise ``dnf``'s thresholds so early exits cost at most a budget of utility on held-out ID data.

    Goes beyond the paper (whose App. H searches thresholds under a utility constraint).

    * ``max_utility_drop == 0`` (zero tolerance): head by head, in depth order, the rows of
      ``(x_val, y_val)`` that would leave at head ``j`` are checked against the final exit; while
      more than ``max_harm`` of them are answered wrongly by the head but rightly by the final exit,
      head ``j``'s threshold is raised just above the confidence of the most confident such row.
    * ``max_utility_drop > 0`` (a budget, in points of accuracy; paper Table 4 compares defenses
      at most 0.5 points below the undefended model): early answers are accepted as long as the
      defended accuracy on ``(x_val, y_val)`` is at least the victim's minus the budget. While it is
      not, one head's threshold is raised just above its most confident row that it answers wrongly
      and the final exit rightly; of the heads, the one whose raise wins the most accuracy per
      validation row it sends deeper (ties: the deeper head, so exit 0 keeps its reach on attack
      queries) is raised. Early answers thus go first where they are least often right.

    Thresholds only ever go up.

    Args:
        dnf: the trained DNF (its thresholds are replaced).
        x_val: held-out ID images ``(N, C, H, W)`` in [0, 1].
        y_val: their labels ``(N,)``.
        max_harm: (zero budget only) rows a head may still answer wrongly that the final exit answers rightly.
        max_utility_drop: the budget, in points of ID validation accuracy (0.5 = half a point).

    Returns:
        The thresholds before and after (the new ones are also set on ``dnf``), and with a budget
        the victim's and the defended validation accuracy.

    Raises:
        InvalidInput: ``y_val`` breaks the label contract (:func:`~fortress.tensors.check_labels`).
        ConfigError: a negative budget, or a budget together with ``max_harm``.
    """
    if not 0.0 <= max_utility_drop <= 100.0:
        raise ConfigError(f"max_utility_drop (points of ID accuracy) must be in [0, 100], got {max_utility_drop}")
    if max_utility_drop > 0 and max_harm:
        raise ConfigError(f"give either max_harm ({max_harm}) or max_utility_drop ({max_utility_drop}), not both")
    y_val = check_labels(y_val, len(x_val), dnf.num_classes, name="y_val")
    before = tuple(dnf.thresholds)
    logits = dnf.net.forward_all(x_val.to(dnf.device)).logits.to(y_val.device)  # (E, N, K), on the labels' device
    conf = torch.softmax(logits, dim=2).amax(dim=2)  # (E, N)
    pred = logits.argmax(dim=2)
    if max_utility_drop > 0:
        return _budget_guard(dnf, conf, pred, y_val, x_val, max_utility_drop)
    final_ok = pred[-1] == y_val
    thr = list(before)
    pending = torch.ones(x_val.shape[0], dtype=torch.bool)
    for j in range(len(thr)):
        harmful = pending & (pred[j] != y_val) & final_ok
        while True:
            leaves = pending & (conf[j] >= thr[j])
            bad = harmful & leaves
            if int(bad.sum()) <= max_harm:
                break
            worst = torch.sort(conf[j][bad], descending=True).values[max_harm]
            thr[j] = float(torch.nextafter(worst, torch.tensor(2.0)))
        pending &= ~(conf[j] >= thr[j])
    dnf.set_thresholds(thr)
    return GuardResult(before, tuple(dnf.thresholds), max_harm)


def _first_exits(conf: Tensor, thr: Tensor) -> Tensor:
    """Exit per row: the first head whose confidence reaches its threshold, else the final exit."""
    heads = conf.shape[0] - 1
    passed = conf[:-1] >= thr.view(-1, 1)
    idx = torch.arange(heads).view(-1, 1).expand_as(passed)
    return torch.where(passed, idx, torch.full_like(idx, heads)).amin(dim=0)


def _budget_guard(dnf: DNF, conf: Tensor, pred: Tensor, y: Tensor, x_val: Tensor, budget: float) -> GuardResult:
    """The guard under a utility budget (see :func:`guard_utility`)."""
    before = tuple(dnf.thresholds)
    right = pred == y.view(1, -1)  # (E, N)
    rows = torch.arange(y.shape[0])
    victim_acc = float((dnf.victim(x_val.to(dnf.device)).argmax(1).to(y.device) == y).float().mean())
    target = victim_acc - budget / 100.0
    thr = torch.tensor(before, dtype=torch.float32)
    ex = _first_exits(conf, thr)
    acc = float(right[ex, rows].float().mean())
    while acc < target - 1e-9:
        best: tuple[float, int, Tensor, Tensor, float] | None = None
        for j in range(thr.numel()):
            bad = (ex == j) & ~right[j] & right[-1]
            if not bool(bad.any()):
                continue
            moved = thr.clone()
            moved[j] = torch.nextafter(conf[j][bad].max(), torch.tensor(2.0))
            ex_m = _first_exits(conf, moved)
            acc_m = float(right[ex_m, rows].float().mean())
            score = (acc_m - acc) / max(1, int((ex_m != ex).sum()))
            if best is None or (score, j) >= (best[0], best[1]):
                best = (score, j, moved, ex_m, acc_m)
        if best is None:  # every early answer that is wrong is wrong at the final exit too
            break
        _, _, thr, ex, acc = best
    dnf.set_thresholds(thr.tolist())
    return GuardResult(before, tuple(dnf.thresholds), 0, budget, victim_acc, acc)
