"""Drift of the whole population of keys created in a time window: the Sybil case.

Per-key detectors need evidence per key; an attacker who spreads the budget over many fresh keys
gives each too little to be judged. :class:`PopulationDrift` pools, over all keys created in one
window (``window_s`` seconds of creation time), the same sufficient statistics ``dadd`` keeps per
key (per predicted class: ``n_c``, ``Σ z``, ``Σ ‖z‖²`` of whitened features) plus the exit counts,
and tests the pooled stream:

* **features**: the pooled D-ADD discrepancy ``D`` (:mod:`fortress.monitor.dadd`) above the
  calibrated ``h`` — the threshold that holds each benign scenario's rate for a single key of
  ``horizon`` queries; a pool of benign keys is a benign stream with the keys' mix of scenarios;
* **exits**: the pooled share of queries leaving before the last exit, whose one-sided lower
  confidence bound (Wilson, ``z``) exceeds the ID share's upper bound plus ``exit_margin``.

A window flags once it holds at least ``min_queries`` pooled queries and either test fires; the
response then applies to the window's **contributing** keys: those whose own mean excess squared
distance (or early-exit share) lies ``z`` standard errors above the benign reference — the keys
that pushed the pool off, not every key created in the window. A contributing key keeps the flag
(sticky, like a per-key flag); keys of the window that did not contribute are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fortress.errors import ConfigError
from fortress.monitor.dadd import DADDCalibration

__all__ = ["PopulationDrift", "PopulationFlag"]


@dataclass(frozen=True)
class PopulationFlag:
    """One window's verdict when it flagged.

    Attributes:
        window: index of the creation-time window (``floor(created_at / window_s)``).
        keys: keys created in the window that had queries.
        contributing: the keys the response applies to.
        queries: pooled queries of the window when it flagged.
        score: pooled ``D`` at the flag.
        early_share: pooled share of queries leaving before the last exit.
        by: ``"features"``, ``"exits"`` or ``"features+exits"``.
    """

    window: int
    keys: tuple[str, ...]
    contributing: tuple[str, ...]
    queries: int
    score: float
    early_share: float
    by: str


@dataclass
class _Stats:
    n_c: Tensor
    s_c: Tensor
    q_c: Tensor
    early: int = 0
    window: int = 0

    @property
    def n(self) -> int:
        return int(self.n_c.sum())


@dataclass
class _Window:
    keys: set[str] = field(default_factory=set)
    flag: PopulationFlag | None = None


def _wilson_lower(k: int, n: int, z: float) -> float:
    if n == 0:
        return 0.0
    p = k / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / den


class PopulationDrift:
    """Pooled drift test over the keys created in each window (module docstring).

    Args:
        calibration: ``dadd``'s calibration (reference, ``m_ref``, ``h``).
        id_early_share: share of held-out ID queries that leave before the last exit (e.g. from
            ``exit-sprt``'s calibration counts; ``None``: features only).
        num_exits: the defense's exits (needed with ``id_early_share``).
        window_s: width of a creation-time window, seconds.
        min_queries: pooled queries before a window is tested.
        z: one-sided normal quantile of the bounds (3.09: 0.1 %).
        exit_margin: slack added to the ID early-exit share.
        energy_sd: standard deviation of one benign query's squared whitened distance (the per-key
            contribution test's unit; ``None``: ``sqrt(2 · F)``, the Gaussian value).

    Example:
        >>> from fortress.monitor.dadd import DADDReference
        >>> ref = DADDReference("logits", torch.zeros(2, 2), torch.eye(2))
        >>> cal = DADDCalibration(ref, 2.0, 1.0, 0.01, 1000, 20, 10, 0, 0)
        >>> pop = PopulationDrift(cal, window_s=60.0, min_queries=20)
        >>> far = torch.full((10, 2), 3.0)
        >>> [pop.add(f"k{i}", 5.0, far, torch.zeros(10, dtype=torch.long), None) for i in range(3)][-1].contributing
        ('k0', 'k1', 'k2')
    """

    def __init__(
        self,
        calibration: DADDCalibration,
        *,
        id_early_share: float | None = None,
        num_exits: int | None = None,
        window_s: float = 3600.0,
        min_queries: int = 500,
        z: float = 3.09,
        exit_margin: float = 0.02,
        energy_sd: float | None = None,
    ) -> None:
        if not window_s > 0 or min_queries < 2 or not z > 0 or exit_margin < 0:
            raise ConfigError(
                f"need window_s > 0, min_queries >= 2, z > 0, exit_margin >= 0; got {window_s}, {min_queries}, "
                f"{z}, {exit_margin}"
            )
        if id_early_share is not None and not 0 <= id_early_share <= 1:
            raise ConfigError(f"id_early_share must be a share in [0, 1], got {id_early_share}")
        if (id_early_share is None) != (num_exits is None) or (num_exits is not None and num_exits < 2):
            raise ConfigError(
                f"the exit test needs both id_early_share and num_exits >= 2, got {id_early_share}, {num_exits}"
            )
        self.num_exits = num_exits
        self.calibration = calibration
        self.id_early_share = id_early_share
        self.window_s = window_s
        self.min_queries = min_queries
        self.z = z
        self.exit_margin = exit_margin
        f = calibration.reference.means.shape[1]
        self.energy_sd = math.sqrt(2 * f) if energy_sd is None else energy_sd
        self._keys: dict[str, _Stats] = {}
        self._windows: dict[int, _Window] = {}

    def _new(self, window: int) -> _Stats:
        k, f = self.calibration.reference.means.shape
        return _Stats(torch.zeros(k), torch.zeros(k, f), torch.zeros(k), 0, window)

    def add(
        self, key_id: str, created_at: float, feats: Tensor, cls: Tensor, exits: Tensor | None
    ) -> PopulationFlag | None:
        """Add one answered batch of ``key_id`` (created at ``created_at``, epoch seconds); return its window's flag.

        Args:
            key_id: the key.
            created_at: when the key was created (places it in a window).
            feats: ``(B, F)`` the batch's features in the calibration's feature space.
            cls: ``(B,)`` the predicted classes.
            exits: ``(B,)`` exits (``None``: no exit test).

        Returns:
            The window's :class:`PopulationFlag` once it has flagged (the same object on later
            batches; later contributors are added to it), else ``None``.
        """
        window = int(created_at // self.window_s)
        st = self._keys.setdefault(key_id, self._new(window))
        ref = self.calibration.reference
        k = ref.means.shape[0]
        z = ref.z(feats.float().cpu(), cls.cpu())
        onehot = torch.nn.functional.one_hot(cls.cpu(), k).float()
        st.n_c = st.n_c + onehot.sum(0)
        st.s_c = st.s_c + onehot.T @ z
        st.q_c = st.q_c + onehot.T @ (z * z).sum(1)
        if exits is not None and self.num_exits is not None:
            st.early += int((exits < self.num_exits - 1).sum())
        win = self._windows.setdefault(st.window, _Window())
        win.keys.add(key_id)
        return self._test(st.window, win)

    def _pooled(self, keys: set[str]) -> tuple[int, float, int]:
        stats = [self._keys[k] for k in keys]
        n_c = torch.stack([s.n_c for s in stats]).sum(0)
        s_c = torch.stack([s.s_c for s in stats]).sum(0)
        q_c = torch.stack([s.q_c for s in stats]).sum(0)
        n = int(n_c.sum())
        if n == 0:
            return 0, 0.0, 0
        pair = (s_c.pow(2).sum(1) - q_c) / (n_c * (n_c - 1)).clamp_min(1)
        d = float(q_c.sum() / n - self.calibration.m_ref + (n_c * pair * (n_c >= 2)).sum() / n)
        return n, d, sum(s.early for s in stats)

    def _contributes(self, st: _Stats, by_features: bool, by_exits: bool) -> bool:
        n = st.n
        if n == 0:
            return False
        excess = float(st.q_c.sum()) / n - self.calibration.m_ref
        if by_features and excess > self.z * self.energy_sd / math.sqrt(n):
            return True
        if by_exits and self.id_early_share is not None:
            return _wilson_lower(st.early, n, self.z) > self.id_early_share + self.exit_margin
        return False

    def _test(self, window: int, win: _Window) -> PopulationFlag | None:
        n, d, early = self._pooled(win.keys)
        if win.flag is None:
            if n < self.min_queries:
                return None
            by_f = d > self.calibration.threshold
            by_e = self.id_early_share is not None and (
                _wilson_lower(early, n, self.z) > self.id_early_share + self.exit_margin
            )
            if not (by_f or by_e):
                return None
            by = "+".join(w for w, on in (("features", by_f), ("exits", by_e)) if on)
            win.flag = PopulationFlag(window, (), (), n, d, early / n, by)
        flag = win.flag
        by_f, by_e = "features" in flag.by, "exits" in flag.by
        contributing = set(flag.contributing) | {k for k in win.keys if self._contributes(self._keys[k], by_f, by_e)}
        win.flag = PopulationFlag(
            window,
            tuple(sorted(win.keys)),
            tuple(sorted(contributing)),
            flag.queries,
            flag.score,
            flag.early_share,
            flag.by,
        )
        return win.flag

    def queries(self, key_id: str) -> int:
        """Queries of ``key_id`` the detector has seen."""
        st = self._keys.get(key_id)
        return 0 if st is None else st.n

    def flagged(self, key_id: str) -> bool:
        """The key contributed to a flagged window (the response applies to it)."""
        st = self._keys.get(key_id)
        if st is None:
            return False
        win = self._windows.get(st.window)
        return win is not None and win.flag is not None and key_id in win.flag.contributing
