"""Knockoff Nets' adaptive sampling machinery: a two-level gradient bandit and a seeded k-means.

:class:`BanditPolicy` is the gradient-bandit policy over a coarse→fine hierarchy of pool actions
(Orekondy et al., CVPR 2019, §4.1.2); :func:`kmeans` gives pools without a taxonomy their actions.
Everything is batched: a step samples, and updates, many paths at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fortress.errors import ConfigError, InvalidInput

__all__ = ["BanditPolicy", "check_ids", "kmeans", "rank_within", "segment_softmax"]


def kmeans(x: Tensor, k: int, *, iters: int = 25, generator: torch.Generator | None = None) -> Tensor:
    """Cluster the rows of ``x`` into ``k`` groups (k-means++ seeding, then Lloyd iterations).

    Vectorised over rows: each seeding step and each Lloyd iteration is one distance matrix.
    An emptied cluster keeps its previous centre.

    Args:
        x: points ``(N, D)``.
        k: clusters (``1 <= k <= N``).
        iters: Lloyd iterations (stops early once the assignment no longer changes).
        generator: seeds the k-means++ draws.

    Returns:
        Cluster ids ``(N,)`` in ``[0, k)``.

    Example:
        >>> pts = torch.cat([torch.zeros(5, 2), torch.ones(5, 2) * 10])
        >>> lab = kmeans(pts, 2, generator=torch.Generator().manual_seed(0))
        >>> bool((lab[:5] == lab[0]).all() and (lab[5:] == lab[5]).all() and lab[0] != lab[5])
        True
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"k-means needs 1 <= k <= number of points ({n}), got k={k}")
    x = x.float()
    centers = x[torch.randint(n, (1,), generator=generator)]
    d2 = torch.cdist(x, centers).squeeze(1).square()
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        pick = torch.multinomial(weights, 1, generator=generator)
        centers = torch.cat([centers, x[pick]])
        d2 = torch.minimum(d2, (x - x[pick]).square().sum(1))
    labels = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def check_ids(ids: Tensor | None, n: int, what: str) -> Tensor | None:
    """Validate per-image integer ids (``(N,)``, non-negative) and renumber them ``0..G-1``."""
    if ids is None:
        return None
    if ids.dim() != 1 or ids.shape[0] != n:
        raise InvalidInput(f"{what} must have shape ({n},), one id per pool image, got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidInput(f"{what} must be an integer tensor, got dtype {ids.dtype}")
    inverse: Tensor = torch.unique(ids.long(), return_inverse=True)[1]
    return inverse


def segment_softmax(h: Tensor, parent: Tensor, available: Tensor, groups: int) -> Tensor:
    """Softmax of ``h`` within each parent's children, unavailable entries given probability 0."""
    masked = h.masked_fill(~available, float("-inf"))
    top = torch.full((groups,), float("-inf")).scatter_reduce(0, parent, masked, reduce="amax")
    e = torch.where(available, (masked - top[parent].nan_to_num(neginf=0.0)).exp(), torch.zeros_like(h))
    total = torch.zeros(groups).index_add_(0, parent, e)
    return e / total[parent].clamp_min(1e-30)


class BanditPolicy:
    """The gradient-bandit policy of the adaptive strategy over a two-level action tree.

    Level 1 holds ``G`` groups (one when the pool has none), level 2 the ``L`` leaf actions, each
    child of one group. Sampling walks root → group → leaf with a softmax over the preferences of
    the available children at each level (a leaf is available while it holds unqueried images).
    After rewards ``r`` for sampled paths, every level on the path moves by the gradient-bandit
    rule (Sutton & Barto §2.8; Orekondy et al. 2019, Eq. 3): ``H(a) += α (r − r̄)(1 − π(a))`` for
    the chosen child and ``H(a') −= α (r − r̄) π(a')`` for its siblings, averaged over the batch.
    """

    def __init__(self, parent: Tensor, groups: int, lr: float) -> None:
        self.parent = parent
        self.groups = groups
        self.lr = lr
        self.h_group = torch.zeros(groups)
        self.h_leaf = torch.zeros(parent.shape[0])

    def probs(self, available: Tensor) -> tuple[Tensor, Tensor]:
        """``(π(group), π(leaf | its group))`` restricted to ``available`` leaves."""
        g_avail = torch.zeros(self.groups, dtype=torch.bool).index_fill_(0, self.parent[available], True)
        p_group = torch.softmax(self.h_group.masked_fill(~g_avail, float("-inf")), 0)
        return p_group, segment_softmax(self.h_leaf, self.parent, available, self.groups)

    def sample(self, n: int, available: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``n`` paths; return their groups and leaves ``(n,)`` each."""
        p_group, p_leaf = self.probs(available)
        groups = torch.multinomial(p_group, n, replacement=True, generator=generator)
        table = torch.zeros(self.groups, self.parent.shape[0])
        table[self.parent, torch.arange(self.parent.shape[0])] = p_leaf
        leaves = torch.multinomial(table[groups], 1, generator=generator).squeeze(1)
        return groups, leaves

    def update(self, groups: Tensor, leaves: Tensor, advantage: Tensor, available: Tensor) -> None:
        """Apply the gradient-bandit step for paths ``(groups, leaves)`` with ``advantage = r − r̄``."""
        p_group, p_leaf = self.probs(available)
        step = self.lr / advantage.shape[0]
        by_group = torch.zeros(self.groups).index_add_(0, groups, advantage)
        by_leaf = torch.zeros(self.h_leaf.shape[0]).index_add_(0, leaves, advantage)
        self.h_group += step * (by_group - p_group * advantage.sum())
        self.h_leaf += step * (by_leaf - p_leaf * by_group[self.parent])

    def marginal(self, available: Tensor) -> Tensor:
        """``π(leaf) = π(group) π(leaf | group)`` over all leaves."""
        p_group, p_leaf = self.probs(available)
        return p_group[self.parent] * p_leaf


def rank_within(ids: Tensor, size: int) -> Tensor:
    """For each entry, how many earlier entries carry the same id (0 for the first)."""
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=size)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(ids.shape[0]) - first[ids[order]]
    return rank
