"""``dadd``: account-level distribution discrepancy of a key's queries in the victim's feature space.

After D-ADD (Account-aware Distribution Discrepancy, AAAI 2025), built from its description: a
benign account's queries, seen per predicted class in the victim's feature space, are distributed
like the training data of that class; an extraction account's are not, even when each query on its
own looks in-distribution (natural images from a related domain exit DNF like ID data). Per key we
keep, for every predicted class ``c``, sufficient statistics of the whitened features
``z = W (f(x) - μ_c)`` (``μ_c``: the class's ID mean; ``W``: the inverse square root of the pooled
within-class ID covariance, shrunk): the count ``n_c``, the sum ``Σ z`` and the sum ``Σ ‖z‖²``. The
discrepancy after ``n`` queries is

    D = Σ_c ‖z‖²-sum / n − m_ref  +  Σ_c (n_c / n) · (‖Σ z‖² − Σ ‖z‖²) / (n_c (n_c − 1))

the first term the excess mean squared Mahalanobis distance to the predicted class's ID mean over
the ID reference ``m_ref`` (queries far from their class), the second an unbiased estimate of each
class's squared mean shift (queries consistently off in one direction). D does not depend on the
key's class mix, so a user who asks about one class only looks like any other. The threshold ``h``
is the largest over benign scenarios of the ``1 − alpha`` quantile of D's largest value over ``horizon``
queries of simulated benign keys replaying *held-out* ID images under realistic shifts and class mixes
(:func:`calibrate_dadd`); D is checked
every ``check_every`` queries once ``min_queries`` are in, as in the calibration.

Features (``feature`` of the calibration): ``"penultimate"`` — the victim's input to its last
linear layer (one extra pass of the backbone per batch); ``"logits"`` — the answer's log-probability
rows, centred (free: no model pass).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.monitor.base import Monitor, Verdict
from fortress.monitor.benign import STREAM_MIXES, benign_streams

__all__ = ["DADD", "DADDCalibration", "DADDReference", "calibrate_dadd", "fit_reference", "log_prob_features"]

FeatureKind = Literal["penultimate", "logits"]
#: Probability floor before the log of ``"logits"`` features.
PROB_FLOOR = 1e-6


def log_prob_features(probs: Tensor) -> Tensor:
    """Centred log-probability rows ``(B, K)`` (the ``"logits"`` feature; logits up to a constant)."""
    lp = probs.clamp_min(PROB_FLOOR).log()
    return lp - lp.mean(dim=1, keepdim=True)


@dataclass(frozen=True)
class DADDReference:
    """The ID reference of the feature space: class means and the whitening map.

    Attributes:
        feature: which features (module docstring).
        means: ``(K, F)`` ID feature mean per class.
        whiten: ``(F, F)`` map ``W`` with ``W Σ Wᵀ ≈ I`` (``Σ``: pooled within-class covariance, shrunk).
    """

    feature: FeatureKind
    means: Tensor
    whiten: Tensor

    def z(self, feats: Tensor, cls: Tensor) -> Tensor:
        """Whitened deviations ``(B, F)`` of features ``(B, F)`` from their class means (``cls``: ``(B,)``)."""
        return (feats - self.means[cls]) @ self.whiten.T


def fit_reference(
    feats: Tensor, labels: Tensor, num_classes: int, *, feature: FeatureKind, shrink: float = 0.1
) -> DADDReference:
    """Class means and the whitening map from ID features ``(N, F)`` and their classes ``(N,)``.

    Args:
        feats: ID training features.
        labels: their classes (the victim's predictions: the monitor sees predictions, never labels).
        num_classes: ``K``.
        feature: what the features are.
        shrink: weight of the identity (scaled to the mean variance) mixed into the covariance.

    A class the victim predicts for fewer than 2 ID rows takes the overall mean (queries predicted
    as that class are then judged against the whole ID cloud).

    Raises:
        ConfigError: fewer than 2 rows, or a bad ``shrink``.
    """
    if not 0 <= shrink < 1:
        raise ConfigError(f"shrink must be in [0, 1), got {shrink}")
    if feats.shape[0] < 2 or labels.shape != (feats.shape[0],):
        raise ConfigError(f"the D-ADD reference needs >= 2 feature rows with one class each, got {tuple(feats.shape)}")
    f = feats.double()
    means = f.mean(dim=0).repeat(num_classes, 1)
    for c in range(num_classes):
        sel = labels == c
        if int(sel.sum()) >= 2:
            means[c] = f[sel].mean(dim=0)
    dev = f - means[labels]
    cov = dev.T @ dev / max(1, f.shape[0] - num_classes)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    whiten = (evecs / evals.clamp_min(1e-12).sqrt()).T
    return DADDReference(feature, means.float(), whiten.float())


@dataclass(frozen=True)
class DADDCalibration:
    """What ``dadd`` needs: the reference, ``m_ref`` and the calibrated threshold (saved as JSON).

    Attributes:
        reference: the feature space's ID reference.
        m_ref: mean squared whitened distance of held-out benign queries to their class mean.
        threshold: ``h``, the ``1 − alpha`` quantile of benign keys' largest ``D`` over ``horizon``.
        alpha: target share of benign keys flagged within ``horizon`` queries.
        horizon: queries per benign key the rate refers to.
        min_queries: queries before ``D`` is first checked.
        check_every: ``D`` is checked every this many queries.
        streams: simulated benign keys per scenario.
        seed: seed of the simulation.
        per_scenario: each scenario's own threshold (``"shift/mix"`` → quantile); ``h`` is their largest.
    """

    reference: DADDReference
    m_ref: float
    threshold: float
    alpha: float
    horizon: int
    min_queries: int
    check_every: int
    streams: int
    seed: int
    per_scenario: dict[str, float] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write the calibration as JSON; return the path."""
        ref = self.reference
        data = {k: v for k, v in asdict(self).items() if k != "reference"}
        data["reference"] = {"feature": ref.feature, "means": ref.means.tolist(), "whiten": ref.whiten.tolist()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"monitor": "dadd", **data}))
        return path

    @classmethod
    def load(cls, path: Path) -> DADDCalibration:
        """Read a calibration written by :meth:`save`.

        Raises:
            ArtifactError: missing, unreadable or not a ``dadd`` calibration.
        """
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("monitor", None) != "dadd":
                raise ValueError("not a dadd calibration")
            r = data.pop("reference")
            if r["feature"] not in ("penultimate", "logits"):
                raise ValueError(f"unknown feature {r['feature']!r}")
            ref = DADDReference(r["feature"], torch.tensor(r["means"]), torch.tensor(r["whiten"]))
            return cls(reference=ref, **data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"cannot read D-ADD calibration {path}: {exc}") from exc


def _path_stats(z: Tensor, cls: Tensor, num_classes: int, state: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``D`` after each query of a stream ``z (T, F)``, ``cls (T,)``, starting from ``state`` (n_c, Σz, Σ‖z‖²).

    Returns ``(T, 3)``: per query, the summed ‖z‖², the class-weighted mean-shift term and ``n``;
    the caller subtracts ``m_ref``.
    """
    n0, s0, q0 = state
    onehot = torch.nn.functional.one_hot(cls, num_classes).to(z.dtype)  # (T, K)
    n_c = n0 + onehot.cumsum(0)  # (T, K)
    s_c = s0 + (onehot[:, :, None] * z[:, None, :]).cumsum(0)  # (T, K, F)
    q_c = q0 + (onehot * (z * z).sum(1, keepdim=True)).cumsum(0)  # (T, K)
    n = n_c.sum(1)
    pair = (s_c.pow(2).sum(2) - q_c) / (n_c * (n_c - 1)).clamp_min(1)
    shift = (n_c * pair * (n_c >= 2)).sum(1) / n
    return torch.stack([q_c.sum(1) / n, shift, n], dim=1)


@dataclass
class _KeyState:
    n_c: Tensor
    s_c: Tensor
    q_c: Tensor
    score: float = 0.0
    flagged_at: int | None = None

    @property
    def n(self) -> int:
        return int(self.n_c.sum())


class DADD(Monitor):
    """Flag a key whose queries' per-class feature distribution departs from the ID reference (module docstring).

    Args:
        calibration: from :func:`calibrate_dadd`.
        features: images ``(B, C, H, W)`` → features ``(B, F)`` for ``"penultimate"`` calibrations
            (e.g. ``victim.penultimate``, or a :class:`~fortress.monitor.tap.PenultimateTap`, which
            reuses the answer's own pass); ``None`` for ``"logits"``, computed from the answers.
        threshold: override the calibrated ``h``.

    Raises:
        ConfigError: ``"penultimate"`` features without a feature function, or a bad threshold.

    Example:
        >>> ref = DADDReference("logits", torch.zeros(3, 3), torch.eye(3))
        >>> cal = DADDCalibration(ref, 2.0, 1.0, 0.01, 1000, 20, 10, 0, 0)
        >>> mon = DADD(cal)
        >>> mon.observe("k", torch.rand(40, 1, 8, 8), torch.tensor([[0.98, 0.01, 0.01]]).repeat(40, 1), None).flagged
        True
    """

    name: ClassVar[str] = "dadd"

    def __init__(
        self,
        calibration: DADDCalibration,
        *,
        features: Callable[[Tensor], Tensor] | None = None,
        threshold: float | None = None,
    ) -> None:
        if calibration.reference.feature == "penultimate" and features is None:
            raise ConfigError("a 'penultimate' D-ADD calibration needs the victim's feature function")
        if threshold is not None and not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold}")
        self.calibration = calibration
        self.features = features
        self.threshold = calibration.threshold if threshold is None else float(threshold)
        self._keys: dict[str, _KeyState] = {}
        self._last: tuple[Tensor, Tensor] | None = None

    def _new(self) -> _KeyState:
        k, f = self.calibration.reference.means.shape
        return _KeyState(torch.zeros(k), torch.zeros(k, f), torch.zeros(k))

    def featurize(self, images: Tensor, probs: Tensor, exits: Tensor | None = None) -> Tensor:
        """The batch's features ``(B, F)`` in the calibration's feature space.

        The last batch's features are kept, so the population detector reads them without a second pass.
        """
        if self.calibration.reference.feature == "logits":
            return log_prob_features(probs)
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        assert self.features is not None  # checked in __init__
        tap = getattr(self.features, "features", None)  # a PenultimateTap reuses the answer's pass
        with torch.inference_mode():
            feats = (tap(images, probs, exits) if callable(tap) else self.features(images)).float()
        self._last = (images, feats)
        return feats

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        st = self._keys.setdefault(key_id, self._new())
        ref, cal = self.calibration.reference, self.calibration
        if probs.dim() != 2 or probs.shape[1] != ref.means.shape[0]:
            raise InvalidInput(f"dadd expects (B, {ref.means.shape[0]}) probability rows, got {tuple(probs.shape)}")
        if probs.shape[0] == 0:
            return self.verdict(key_id)
        cls = probs.argmax(dim=1)
        z = ref.z(self.featurize(images, probs, exits).cpu(), cls.cpu())
        path = _path_stats(z, cls.cpu(), ref.means.shape[0], (st.n_c, st.s_c, st.q_c))
        d = path[:, 0] - cal.m_ref + path[:, 1]
        n = path[:, 2]
        if st.flagged_at is None:
            checked = (n >= cal.min_queries) & (n % cal.check_every == 0) & (d > self.threshold)
            hit = torch.nonzero(checked)
            if hit.numel():
                st.flagged_at = int(n[int(hit[0])])
        onehot = torch.nn.functional.one_hot(cls.cpu(), ref.means.shape[0]).float()
        st.n_c = st.n_c + onehot.sum(0)
        st.s_c = st.s_c + onehot.T @ z
        st.q_c = st.q_c + onehot.T @ (z * z).sum(1)
        st.score = float(d[-1])
        return self.verdict(key_id)

    def verdict(self, key_id: str) -> Verdict:
        st = self._keys.get(key_id)
        if st is None:
            return Verdict(key_id, False, 0, None, 0.0, self.threshold)
        return Verdict(key_id, st.flagged_at is not None, st.n, st.flagged_at, st.score, self.threshold)

    def sufficient(self, key_id: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """The key's statistics ``(n_c, Σz, Σ‖z‖²)`` (what the population detector pools), or ``None``."""
        st = self._keys.get(key_id)
        return None if st is None else (st.n_c, st.s_c, st.q_c)

    def state(self, key_id: str) -> dict[str, Any] | None:
        st = self._keys.get(key_id)
        if st is None:
            return None
        return {
            "n_c": st.n_c.tolist(),
            "s_c": st.s_c.tolist(),
            "q_c": st.q_c.tolist(),
            "score": st.score,
            "flagged_at": st.flagged_at,
        }

    def restore(self, key_id: str, state: dict[str, Any]) -> None:
        fa = state.get("flagged_at")
        self._keys[key_id] = _KeyState(
            torch.tensor(state["n_c"]),
            torch.tensor(state["s_c"]),
            torch.tensor(state["q_c"]),
            float(state["score"]),
            None if fa is None else int(fa),
        )

    def reset(self, key_id: str) -> None:
        self._keys.pop(key_id, None)


def _zero(z: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    f = z.shape[-1]
    return (
        torch.zeros(num_classes, dtype=z.dtype),
        torch.zeros(num_classes, f, dtype=z.dtype),
        torch.zeros(num_classes, dtype=z.dtype),
    )


def calibrate_dadd(
    reference: DADDReference,
    banks: Mapping[str, tuple[Tensor, Tensor]],
    *,
    mixes: Sequence[str] = STREAM_MIXES,
    alpha: float = 0.01,
    horizon: int = 1000,
    streams: int = 200,
    min_queries: int = 100,
    check_every: int = 10,
    seed: int = 0,
    variants: int = 1,
) -> DADDCalibration:
    """Pick ``dadd``'s threshold for a target false-positive rate in every benign scenario.

    A scenario is a bank (features of held-out ID images under one realistic shift; never the
    reference's images) and a class mix (:func:`~fortress.monitor.benign.benign_streams`). Each of
    ``streams`` simulated keys per scenario replays ``horizon`` rows of it; the scenario's threshold
    is the ``1 − alpha`` quantile of its keys' largest checked ``D``, and ``h`` is the largest over
    the scenarios (so each scenario's rate, not only their average, is held to ``alpha``).
    ``m_ref`` is the mean over the unshifted (``"replay"``) bank when there is one, else over all.

    Args:
        reference: from :func:`fit_reference` on the defender's training features.
        banks: per shift name, ``(N, F)`` features and ``(N,)`` the victim's predicted classes.
        mixes: class mixes simulated for every bank.
        alpha: share of benign keys allowed to be flagged within ``horizon`` queries.
        horizon: queries per simulated key.
        streams: simulated keys per scenario (``alpha * streams`` of them end above its threshold).
        min_queries: queries before the first check.
        check_every: queries between checks.
        seed: simulation seed.
        variants: each bank holds this many shifted copies of the same images, stacked
            (:func:`~fortress.monitor.benign.benign_streams`).

    Raises:
        ConfigError: bad settings or an empty bank.
    """
    if not 0 < alpha < 1 or horizon < min_queries or min_queries < 2 or check_every < 1 or streams < 10 or not banks:
        raise ConfigError(
            f"need 0 < alpha < 1, 2 <= min_queries <= horizon, check_every >= 1, streams >= 10 and a bank; got "
            f"alpha={alpha}, min_queries={min_queries}, horizon={horizon}, check_every={check_every}, "
            f"streams={streams}, {len(banks)} banks"
        )
    k = reference.means.shape[0]
    zs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (feats, cls) in banks.items():
        if feats.shape[0] < 2 or cls.shape != (feats.shape[0],):
            raise ConfigError(f"bank {name!r} needs >= 2 rows with one class each, got {tuple(feats.shape)}")
        zs[name] = (reference.z(feats.float(), cls), cls)
    base = [zs["replay"][0]] if "replay" in zs else [z for z, _ in zs.values()]
    z_ref = torch.cat(base)
    m_ref = float((z_ref * z_ref).sum(1).mean())
    gen = torch.Generator().manual_seed(seed)
    checks = torch.arange(1, horizon + 1)
    checked = (checks >= min_queries) & (checks % check_every == 0)
    per: dict[str, float] = {}
    for name, (z_all, cls_all) in zs.items():
        for mix in mixes:
            idx = benign_streams(cls_all, streams, horizon, mix, gen, num_classes=k, variants=variants)
            maxima = []
            for row in idx:
                p = _path_stats(z_all[row], cls_all[row], k, _zero(z_all, k))
                maxima.append(float((p[:, 0] - m_ref + p[:, 1])[checked].max()))
            per[f"{name}/{mix}"] = float(torch.tensor(maxima).quantile(1 - alpha))
    h = max(per.values())
    return DADDCalibration(reference, m_ref, h, alpha, horizon, min_queries, check_every, streams, seed, per)
