"""``prada``: PRADA (Juuti et al., EuroS&P 2019), the baseline detector of extraction traffic.

Per key and per predicted class ``c``, PRADA keeps a growing set ``G_c`` of earlier queries. For each
new query ``x`` with predicted class ``c`` it records ``d``, the smallest ℓ2 distance (raw inputs)
from ``x`` to ``G_c``; if ``d > T_c`` the query joins ``G_c`` and ``T_c`` rises to
``max(T_c, mean - std)`` of the distances of the queries in ``G_c``. Natural queries give roughly
normally distributed distances; synthetic or crafted queries do not. Every ``check_every`` queries
the distances of the classes with at least ``min_class_distances`` of them are pooled, values
beyond ``clip_sigma`` standard deviations dropped, and once more than ``min_pool`` remain the
Shapiro–Wilk statistic ``W`` is computed (``scipy.stats.shapiro``); ``W < delta`` flags the key.

The distances of a whole batch to the stored sets and to each other are two ``torch.cdist``
calls; only the bookkeeping of which query joins which set is sequential (a query's distance
depends on whether the queries before it joined), as PRADA's definition requires. The growing
sets hold raw images, so they grow with the distinct queries of a key and are not persisted: across a
server restart a key keeps its query count, last ``W`` and its flag (a flagged key stays flagged),
while the evidence of an unflagged key starts over.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.stats import shapiro  # type: ignore[import-untyped]
from torch import Tensor

from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.monitor.base import Monitor, Verdict

__all__ = ["Prada", "shapiro_w"]


def shapiro_w(distances: np.ndarray, *, clip_sigma: float = 3.0, min_pool: int = 100) -> float | None:
    """PRADA's test statistic: Shapiro–Wilk W of the distances within ``clip_sigma`` σ (``None``: too few)."""
    d = distances[np.abs(distances - distances.mean()) <= clip_sigma * distances.std()] if distances.size else distances
    if d.size <= min_pool:
        return None
    if float(d.std()) == 0.0:  # identical distances: as far from normal as it gets
        return 0.0
    with warnings.catch_warnings():  # only W is used; scipy's warning is about the p-value beyond N = 5000
        warnings.simplefilter("ignore", UserWarning)
        return float(shapiro(d).statistic)


@dataclass
class _PradaState:
    dim: int
    num_classes: int
    g: Tensor = field(init=False)  # growing sets, all classes in one buffer (rows: size)
    g_class: Tensor = field(init=False)
    size: int = 0
    thresholds: np.ndarray = field(init=False)  # T_c
    g_dist: list[list[float]] = field(init=False)  # distances of the queries that joined G_c
    dist: list[float] = field(default_factory=list)  # every recorded distance
    dist_class: list[int] = field(default_factory=list)
    n: int = 0
    flagged_at: int | None = None
    w: float = 1.0

    def __post_init__(self) -> None:
        self.g = torch.empty(64, self.dim)
        self.g_class = torch.empty(64, dtype=torch.long)
        self.thresholds = np.zeros(self.num_classes)
        self.g_dist = [[] for _ in range(self.num_classes)]

    def append(self, rows: Tensor, classes: Tensor) -> None:
        need = self.size + rows.shape[0]
        if need > self.g.shape[0]:  # grow by doubling: amortised O(1) per stored query
            cap = max(need, 2 * self.g.shape[0])
            self.g = torch.cat([self.g[: self.size], torch.empty(cap - self.size, self.dim)])
            self.g_class = torch.cat([self.g_class[: self.size], torch.empty(cap - self.size, dtype=torch.long)])
        self.g[self.size : need] = rows
        self.g_class[self.size : need] = classes
        self.size = need


class Prada(Monitor):
    """PRADA's per-key distance-normality detector (module docstring).

    Args:
        delta: flag when the Shapiro–Wilk ``W`` falls below it (reference example: 0.9).
        check_every: queries between tests.
        min_class_distances: a class's distances enter the test once it has this many.
        min_pool: the test runs once more than this many distances remain after clipping.
        clip_sigma: distances further than this many σ from the mean are dropped before testing.

    Example:
        >>> mon = Prada()
        >>> v = mon.observe("k", torch.rand(20, 1, 28, 28), torch.softmax(torch.randn(20, 10), 1), None)
        >>> v.queries, v.flagged
        (20, False)
    """

    name: ClassVar[str] = "prada"

    def __init__(
        self,
        *,
        delta: float = 0.9,
        check_every: int = 10,
        min_class_distances: int = 10,
        min_pool: int = 100,
        clip_sigma: float = 3.0,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"delta must lie in (0, 1), got {delta}")
        for label, v in (
            ("check_every", check_every),
            ("min_class_distances", min_class_distances),
            ("min_pool", min_pool),
        ):
            if v < 1:
                raise ConfigError(f"{label} must be >= 1, got {v}")
        if not clip_sigma > 0:
            raise ConfigError(f"clip_sigma must be > 0, got {clip_sigma}")
        self.delta = delta
        self.check_every = check_every
        self.min_class_distances = min_class_distances
        self.min_pool = min_pool
        self.clip_sigma = clip_sigma
        self._keys: dict[str, _PradaState] = {}

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        if images.dim() != 4 or probs.dim() != 2 or images.shape[0] != probs.shape[0]:
            raise InvalidInput(
                f"images (B, C, H, W) and probs (B, K) must agree, got {tuple(images.shape)} and {tuple(probs.shape)}"
            )
        b = int(images.shape[0])
        x = images.detach().reshape(b, -1).to(torch.float32)
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _PradaState(int(x.shape[1]), int(probs.shape[1]))
        if b == 0:
            return self.verdict(key_id)
        labels = probs.argmax(dim=1)
        # distances to the stored sets (other classes masked out) and within the batch, all at once
        if st.size:
            d_old = torch.cdist(x, st.g[: st.size])
            d_old = d_old.masked_fill(labels.view(-1, 1) != st.g_class[: st.size].view(1, -1), float("inf"))
            near_old = d_old.amin(dim=1).numpy().astype(np.float64)
        else:
            near_old = np.full(b, np.inf)
        d_in = torch.cdist(x, x).numpy().astype(np.float64)
        lab = labels.numpy()
        same = lab[:, None] == lab[None, :]
        joined = np.zeros(b, dtype=bool)
        n_classes = np.bincount(np.asarray(st.dist_class, dtype=np.int64), minlength=st.thresholds.size)
        for i in range(b):  # sequential by definition: whether query i joins depends on the ones before it
            c = int(lab[i])
            earlier = joined[:i] & same[i, :i]
            d = min(near_old[i], float(d_in[i, :i][earlier].min())) if earlier.any() else near_old[i]
            st.n += 1
            if np.isinf(d):  # first query of its class: starts the set, no distance yet
                joined[i] = True
            else:
                st.dist.append(d)
                st.dist_class.append(c)
                n_classes[c] += 1
                if d > st.thresholds[c]:
                    joined[i] = True
                    gd = st.g_dist[c]
                    gd.append(d)
                    st.thresholds[c] = max(st.thresholds[c], float(np.mean(gd) - np.std(gd)))
            if st.flagged_at is None and st.n % self.check_every == 0:
                self._test(st, n_classes)
        keep = torch.from_numpy(np.nonzero(joined)[0])
        st.append(x[keep], labels[keep])
        return self.verdict(key_id)

    def _test(self, st: _PradaState, n_classes: np.ndarray) -> None:
        ok = n_classes >= self.min_class_distances
        if not ok.any():
            return
        dist = np.asarray(st.dist)
        pool = dist[ok[np.asarray(st.dist_class)]]
        w = shapiro_w(pool, clip_sigma=self.clip_sigma, min_pool=self.min_pool)
        if w is None:
            return
        st.w = w
        if w < self.delta:
            st.flagged_at = st.n

    def verdict(self, key_id: str) -> Verdict:
        st = self._keys.get(key_id)
        if st is None:
            return Verdict(key_id, False, 0, None, 1.0, self.delta)
        return Verdict(key_id, st.flagged_at is not None, st.n, st.flagged_at, st.w, self.delta)

    def state(self, key_id: str) -> dict[str, Any] | None:
        """The key's query count, last ``W`` and flag (its image sets are not persisted: module docstring)."""
        st = self._keys.get(key_id)
        if st is None:
            return None
        return {"dim": st.dim, "num_classes": st.num_classes, "n": st.n, "w": st.w, "flagged_at": st.flagged_at}

    def restore(self, key_id: str, state: dict[str, Any]) -> None:
        try:
            st = _PradaState(int(state["dim"]), int(state["num_classes"]))
            st.n, st.w = int(state["n"]), float(state["w"])
            st.flagged_at = None if state["flagged_at"] is None else int(state["flagged_at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"corrupt PRADA state for key {key_id!r}: {exc!r}") from None
        self._keys[key_id] = st

    def reset(self, key_id: str) -> None:
        self._keys.pop(key_id, None)
