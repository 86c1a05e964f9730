"""``step``: a key that keeps querying small steps away from its own earlier queries (JBDA's augmentation).

Jacobian-based augmentation (JBDA, Papernot et al. 2017; JBDA-TR, Juuti et al. 2019) grows its
transfer set by querying, round after round, each earlier query moved a small step (ℓ∞ radius λ,
0.1 in their papers) along the sign of a clone's input gradient: every synthetic query lies within
λ of one of the key's earlier queries, differs from it by more than a change of brightness or
contrast, and moves the answer. Its queries are the attacker's own ID images and small steps around
them, so they exit DNF like ID data and their features look like ID features: neither ``exit-sprt``
nor ``dadd`` sees them. This detector looks at pairs instead. A query is a *step* when one of the
key's earlier queries (among its ``neighbours`` nearest in ℓ2, on images average-pooled to at most
14×14 for speed) is

* near: ``tol < ℓ∞ ≤ radius`` (not a resend of the same image, not another image);
* not photometric: after the best fit of the difference by an affine function of the earlier
  image's pixels (a brightness / contrast change), more than ``min_residual`` of its energy is left;
* answered differently: the ℓ1 distance of the two answers exceeds ``min_change``.

A key is flagged once it has at least ``min_queries`` queries and its share of steps passes the
threshold ``h``. The threshold is calibrated (:func:`calibrate_step`) like ``dadd``'s: simulated
benign keys replay held-out ID images under every realistic shift and class mix of
:mod:`fortress.monitor.benign` (so one user resending a photo with other noise, brightness or
framing is part of the benign model); ``h`` is the largest over the scenarios of the ``1 − alpha``
quantile of the keys' largest share, and at least ``floor``. The calibration counts a step against
every earlier query of a simulated key, the monitor only against the ``neighbours`` nearest: the
monitor finds at most the steps the calibration counted, so its benign rate is at most the
calibrated one.

What it does not catch: an attacker who spaces its steps beyond ``radius``, hides them under a
photometric change, or spreads parents and children over different keys (the steps are per key).
A key's memory holds its last ``memory`` queries (images as float16, answers), so a parent older
than that is forgotten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.monitor.base import Monitor, Verdict
from fortress.monitor.benign import IMAGE_SHIFTS, STREAM_MIXES, benign_streams, owned_stream, shifted

__all__ = ["Step", "StepCalibration", "WindowSteps", "calibrate_step", "step_pairs"]


@dataclass(frozen=True)
class StepCalibration:
    """What ``step`` needs: the pair rule and the calibrated threshold (saved as JSON).

    Attributes:
        threshold: ``h``, the share of steps among a key's queries that flags it.
        radius: largest ℓ∞ distance (pixel units in [0, 1]) of a step to its earlier query.
        tol: smallest ℓ∞ distance of a step (below: a resend of the same image).
        min_residual: share of the difference's energy an affine brightness/contrast fit must leave.
        min_change: ℓ1 distance of the two answers a step must exceed.
        min_queries: queries of a key before its first check.
        alpha, horizon, streams, seed: the calibration's target rate, queries per simulated key,
            keys per scenario and seed.
        per_scenario: each scenario's ``1 − alpha`` quantile of the keys' largest share.
        floor: the smallest threshold used, whatever the calibration found.
        window_threshold: the share of *cross-key* steps (a step from another key's query) in the
            pooled stream of all keys created in one window that flags the window
            (:class:`WindowSteps`); ``None``: no cross-key test (a calibration from before it).
        window_per_scenario: each scenario's ``1 − alpha`` quantile of the simulated benign
            windows' largest cross-key share (:func:`calibrate_step`).
        window_keys: the keys per simulated benign window.
        window_floor: the smallest ``window_threshold`` used.
    """

    threshold: float
    radius: float = 0.25
    tol: float = 1e-3
    min_residual: float = 0.5
    min_change: float = 0.2
    min_queries: int = 50
    alpha: float = 0.01
    horizon: int = 1000
    streams: int = 100
    seed: int = 0
    per_scenario: dict[str, float] = field(default_factory=dict)
    floor: float = 0.1
    window_threshold: float | None = None
    window_per_scenario: dict[str, float] = field(default_factory=dict)
    window_keys: list[int] = field(default_factory=list)
    window_floor: float = 0.02

    def save(self, path: Path) -> Path:
        """Write the calibration as JSON; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"monitor": "step", **asdict(self)}, indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> StepCalibration:
        """Read a calibration written by :meth:`save`.

        Raises:
            ArtifactError: missing, unreadable or not a ``step`` calibration.
        """
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("monitor", None) != "step":
                raise ValueError("not a step calibration")
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"cannot read step calibration {path}: {exc}") from exc


def _affine_residual(new: Tensor, old: Tensor) -> Tensor:
    """Share of ``new - old``'s energy left after its least-squares fit by ``a * old + b``; rows ``(N, D)``."""
    d = new - old
    xm, dm = old.mean(1, keepdim=True), d.mean(1, keepdim=True)
    xc = old - xm
    slope = (xc * (d - dm)).sum(1, keepdim=True) / (xc * xc).sum(1, keepdim=True).clamp_min(1e-12)
    r = d - dm - slope * xc
    return r.pow(2).sum(1) / d.pow(2).sum(1).clamp_min(1e-12)


def step_pairs(new: Tensor, old: Tensor, p_new: Tensor, p_old: Tensor, cal: StepCalibration) -> Tensor:
    """Whether each row of ``new`` is a step from the same row of ``old`` (module docstring); ``(N,)`` bool.

    Shape:
        ``new``, ``old``: ``(N, D)`` flattened images in [0, 1]; ``p_new``, ``p_old``: ``(N, K)`` answers.
    """
    new, old = new.float(), old.float()
    linf = (new - old).abs().amax(1)
    ok = (linf > cal.tol) & (linf <= cal.radius) & ((p_new.float() - p_old.float()).abs().sum(1) > cal.min_change)
    if bool(ok.any()):  # the affine fit only for the pairs that pass the cheap tests (few, for benign traffic)
        ok[ok.clone()] = _affine_residual(new[ok], old[ok]) > cal.min_residual
    return ok


def _first_pass(n: int, count: int, hits: Tensor, threshold: float, min_queries: int) -> int | None:
    """The stream position at which the share of hits first passes ``threshold`` within a batch.

    ``n`` queries with ``count`` hits came before; ``hits`` ``(B,)`` bool marks the batch's rows.
    A position is tested from the ``min_queries``-th query on. ``None``: not within the batch.
    """
    cum = count + hits.cumsum(0)
    pos = n + torch.arange(1, hits.numel() + 1)
    hit = torch.nonzero((pos >= min_queries) & (cum > threshold * pos))
    return int(pos[int(hit[0])]) if hit.numel() else None


def _small(x: Tensor) -> Tensor:
    """Images ``(B, C, H, W)`` average-pooled to at most 14×14, flattened: the neighbour search's space."""
    h = x.shape[-1]
    k = max(1, h // 14)
    return (F.avg_pool2d(x, k) if k > 1 else x).flatten(1)


@dataclass
class _KeyState:
    n: int = 0
    steps: int = 0
    flagged_at: int | None = None
    # the key's last `memory` queries, a ring buffer (allocated at the key's first batch)
    images: Tensor | None = None  # (memory, D) float16
    small: Tensor | None = None  # (memory, d) float32, pooled
    probs: Tensor | None = None  # (memory, K)
    filled: int = 0
    pos: int = 0


class Step(Monitor):
    """Flag a key whose share of small-step queries passes the calibrated threshold (module docstring).

    Args:
        calibration: from :func:`calibrate_step`.
        neighbours: earlier queries (nearest in ℓ2 on pooled images) each query is compared with.
        memory: earlier queries kept per key.
        threshold: override the calibrated ``h``.

    Example:
        >>> cal = StepCalibration(threshold=0.1, min_queries=10)
        >>> x = torch.rand(20, 1, 8, 8)
        >>> probs = torch.eye(4)[torch.arange(40) // 20]  # each step moves its answer (class 0 -> 1)
        >>> mon = Step(cal)
        >>> steps = (x + 0.2 * torch.randn(x.shape).sign()).clamp(0, 1)  # every image a step of 0.2
        >>> mon.observe("k", torch.cat([x, steps]), probs, None).flagged
        True
    """

    name: ClassVar[str] = "step"

    def __init__(
        self,
        calibration: StepCalibration,
        *,
        neighbours: int = 8,
        memory: int = 4096,
        threshold: float | None = None,
    ) -> None:
        if neighbours < 1 or memory < 1:
            raise ConfigError(f"need neighbours >= 1 and memory >= 1, got {neighbours} and {memory}")
        self.calibration = calibration
        self.neighbours = neighbours
        self.memory = memory
        self.threshold = calibration.threshold if threshold is None else float(threshold)
        self._keys: dict[str, _KeyState] = {}
        #: which queries of the last observed batch were steps, ``(B,)`` bool
        self.last_steps = torch.zeros(0, dtype=torch.bool)
        #: for each step of the last batch, the memory slot of the earlier query it steps from
        #: (``-1``: no step, or a step from the batch's own rows), ``(B,)`` long
        self.last_parents = torch.zeros(0, dtype=torch.long)
        #: the memory slot each row of the last batch was stored in (``-1``: not kept), ``(B,)`` long
        self.last_slots = torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        if images.dim() != 4 or probs.dim() != 2 or probs.shape[0] != images.shape[0]:
            raise InvalidInput(
                f"step expects (B, C, H, W) images and (B, K) answers, got {tuple(images.shape)}, {tuple(probs.shape)}"
            )
        b = images.shape[0]
        if b == 0:
            self.last_steps = torch.zeros(0, dtype=torch.bool)
            self.last_parents = self.last_slots = torch.zeros(0, dtype=torch.long)
            return self.verdict(key_id)
        flat = images.detach().float().cpu().flatten(1)
        small = _small(images.detach().float().cpu())
        p = probs.detach().float().cpu()
        st = self._keys.setdefault(key_id, _KeyState())
        if (
            st.images is None
            or st.probs is None
            or st.images.shape[1] != flat.shape[1]
            or st.probs.shape[1] != p.shape[1]
        ):
            # a new key, or one restored with its counts only
            st.images = torch.zeros(self.memory, flat.shape[1], dtype=torch.float16)
            st.small = torch.zeros(self.memory, small.shape[1])
            st.probs = torch.zeros(self.memory, p.shape[1])
            st.filled = st.pos = 0
        assert st.small is not None and st.probs is not None
        m = st.filled
        # candidates: the key's memory, then the batch's own earlier rows (a strictly lower triangle)
        own = torch.cdist(small, small)
        own[torch.ones(b, b, dtype=torch.bool).triu()] = float("inf")
        dist = torch.cat([torch.cdist(small, st.small[:m]), own], dim=1)
        k = min(self.neighbours, m + b - 1)
        is_step = torch.zeros(b, dtype=torch.bool)
        parents = torch.full((b,), -1, dtype=torch.long)
        if k > 0:
            near, idx = dist.topk(k, dim=1, largest=False)
            rows = torch.arange(b).repeat_interleave(k)
            cand = idx.flatten()
            mem = cand < m
            old = torch.empty(cand.numel(), flat.shape[1])
            old_p = torch.empty(cand.numel(), p.shape[1])
            old[mem] = st.images[cand[mem]].float()
            old_p[mem] = st.probs[cand[mem]]
            old[~mem] = flat[cand[~mem] - m]
            old_p[~mem] = p[cand[~mem] - m]
            ok = step_pairs(flat[rows], old, p[rows], old_p, self.calibration) & torch.isfinite(near.flatten())
            okm = ok.view(b, k)
            is_step = okm.any(1)
            # the nearest earlier query each step qualifies against; a memory slot, or -1 for the batch's own rows
            first = idx.gather(1, okm.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
            parents = torch.where(is_step & (first < m), first, parents)
        self.last_steps = is_step
        self.last_parents = parents
        if st.flagged_at is None:
            st.flagged_at = _first_pass(st.n, st.steps, is_step, self.threshold, self.calibration.min_queries)
        st.n += b
        st.steps += int(is_step.sum())
        keep = min(b, self.memory)  # the batch's last rows replace the oldest in the ring
        at = (st.pos + torch.arange(keep)) % self.memory
        self.last_slots = torch.cat([torch.full((b - keep,), -1, dtype=torch.long), at])
        st.images[at] = flat[-keep:].half()
        st.small[at] = small[-keep:]
        st.probs[at] = p[-keep:]
        st.pos = (st.pos + keep) % self.memory
        st.filled = min(self.memory, st.filled + keep)
        return self.verdict(key_id)

    def verdict(self, key_id: str) -> Verdict:
        st = self._keys.get(key_id)
        if st is None:
            return Verdict(key_id, False, 0, None, 0.0, self.threshold)
        share = st.steps / st.n if st.n else 0.0
        return Verdict(key_id, st.flagged_at is not None, st.n, st.flagged_at, share, self.threshold)

    def state(self, key_id: str) -> dict[str, Any] | None:
        """Counts and flag only: the remembered images are not persisted (a restart forgets them)."""
        st = self._keys.get(key_id)
        return None if st is None else {"n": st.n, "steps": st.steps, "flagged_at": st.flagged_at}

    def restore(self, key_id: str, state: dict[str, Any]) -> None:
        fa = state.get("flagged_at")
        self._keys[key_id] = _KeyState(int(state["n"]), int(state["steps"]), None if fa is None else int(fa))

    def reset(self, key_id: str) -> None:
        self._keys.pop(key_id, None)


@torch.no_grad()
def calibrate_step(
    answer: Any,
    x_val: Tensor,
    *,
    shifts: Sequence[str] = IMAGE_SHIFTS,
    mixes: Sequence[str] = STREAM_MIXES,
    variants: int = 10,
    alpha: float = 0.01,
    horizon: int = 1000,
    streams: int = 100,
    min_queries: int = 50,
    floor: float = 0.1,
    seed: int = 0,
    chunk: int = 2048,
    max_images: int = 2000,
    window_keys: Sequence[int] = (10, 100),
    windows: int = 20,
    window_floor: float = 0.02,
    **rule: float,
) -> StepCalibration:
    """Pick ``step``'s threshold so that at most ``alpha`` of benign keys are flagged within ``horizon`` queries.

    For every shift a bank of ``variants`` shifted copies of each held-out image is answered by
    ``answer``; the step pairs of the bank are found once (copies of one image against each other;
    distinct images too, where their pooled ℓ2 distance allows an ℓ∞ distance within ``radius``);
    each simulated key replays ``horizon`` rows under each class mix
    (:func:`~fortress.monitor.benign.benign_streams`) and counts a step whenever an earlier row of the
    key forms a step pair with it.

    The window's cross-key threshold (:attr:`StepCalibration.window_threshold`, used by
    :class:`WindowSteps`) is calibrated on simulated benign windows: ``windows`` windows of each size
    in ``window_keys`` per scenario, each key a different user who owns its own images (the held-out
    images dealt out at random, none shared by two keys) and replays them under the scenario as a
    benign key does, the keys' queries interleaved at random. A query is a cross-key step when a
    step pair links it to an earlier query of another key of the window, which for distinct users
    takes two distinct images within ``radius`` of each other whose answers differ. The threshold
    is the largest over the scenarios of the ``1 − alpha`` quantile of the windows' largest
    cross-key share from the ``min_queries``-th pooled query on, and at least ``window_floor``.
    What this model leaves out: two users who send the *same* image (a widely shared photo) under
    different noise are a cross-key step pair when the answer moves.

    Args:
        answer: images ``(B, C, H, W)`` → answers ``(B, K)`` (the served defense's probability rows).
        x_val: ``(N, C, H, W)`` held-out ID images (never the training images); at most
            ``max_images`` of them (a seeded random subset) make the banks. Fewer images make a
            simulated key resend each image more often, which only adds benign steps: the
            threshold can only rise.
        window_keys: keys per simulated benign window (empty: no cross-key threshold).
        windows: simulated benign windows per scenario and window size.
        window_floor: the smallest cross-key threshold used.
        rule: overrides of the pair rule (``radius``, ``tol``, ``min_residual``, ``min_change``).

    Raises:
        ConfigError: bad settings.
    """
    if (
        not 0 < alpha < 1
        or horizon < min_queries
        or min_queries < 2
        or streams < 10
        or variants < 2
        or max_images < 2
        or windows < 1
        or any(k < 2 for k in window_keys)
        or not 0 <= window_floor < 1
    ):
        raise ConfigError(
            f"need 0 < alpha < 1, 2 <= min_queries <= horizon, streams >= 10, variants >= 2, max_images >= 2, "
            f"windows >= 1, window_keys >= 2, 0 <= window_floor < 1; got alpha={alpha}, min_queries={min_queries}, "
            f"horizon={horizon}, streams={streams}, variants={variants}, max_images={max_images}, windows={windows}, "
            f"window_keys={list(window_keys)}, window_floor={window_floor}"
        )
    bad = sorted(set(rule) - {"radius", "tol", "min_residual", "min_change"})
    if bad:
        raise ConfigError(f"unknown step rule options {bad}; valid: radius, tol, min_residual, min_change")
    proto = StepCalibration(threshold=0.0, min_queries=min_queries, **rule)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    if x_val.shape[0] > max_images:
        x_val = x_val[torch.randperm(x_val.shape[0], generator=gen)[:max_images]]
    n = x_val.shape[0]
    base_small = _small(x_val.float())
    # distinct images that could lie within radius of each other: pooling never widens ℓ∞, so a pair
    # whose pooled images are farther apart than radius (plus a margin for their shifted copies) is not one
    close = torch.cat(
        [
            torch.nonzero(torch.cdist(base_small[i : i + 512], base_small, p=float("inf")) <= proto.radius + 0.2)
            + torch.tensor([i, 0])
            for i in range(0, n, 512)
        ]
    )
    close = close[close[:, 0] != close[:, 1]]
    v = torch.arange(variants)
    va, vb = (g.flatten() for g in torch.meshgrid(v, v, indexing="ij"))
    same = torch.arange(n)
    # every (new, old) row pair to test: copies of one image, and copies of close distinct images
    new_rows = torch.cat([(va[None, :] * n + same[:, None]).flatten(), (va[None, :] * n + close[:, :1]).flatten()])
    old_rows = torch.cat([(vb[None, :] * n + same[:, None]).flatten(), (vb[None, :] * n + close[:, 1:]).flatten()])
    per: dict[str, float] = {}
    per_window: dict[str, float] = {}
    wgen = torch.Generator().manual_seed(seed + 1)  # its own stream: the per-key threshold is as without windows
    for shift in shifts:
        bank = torch.cat([shifted(x_val, shift, gen) for _ in range(variants)])  # row v * n + i
        probs = torch.cat([answer(bank[i : i + chunk]).float().cpu() for i in range(0, bank.shape[0], chunk)])
        labels = probs.argmax(1)
        flat = bank.flatten(1).float()
        found = []
        for i in range(0, new_rows.numel(), 8192):
            a, b = new_rows[i : i + 8192], old_rows[i : i + 8192]
            ok = step_pairs(flat[a], flat[b], probs[a], probs[b], proto)
            found.append(torch.stack([a[ok], b[ok]], 1))
        pairs = torch.cat(found)
        partners: dict[int, set[int]] = {}
        for a_row, b_row in pairs.tolist():
            partners.setdefault(a_row, set()).add(b_row)
        checks = torch.arange(1, horizon + 1)
        for mix in mixes:
            if window_keys:
                k = probs.shape[1]
                maxima_w = [
                    _benign_window_max(pairs, labels, n, variants, keys, horizon, min_queries, mix, wgen, k)
                    for keys in window_keys
                    for _ in range(windows)
                ]
                per_window[f"{shift}/{mix}"] = float(torch.tensor(maxima_w).quantile(1 - alpha))
            idx = benign_streams(labels, streams, horizon, mix, gen, num_classes=probs.shape[1], variants=variants)
            maxima = []
            for row in idx.tolist():
                seen: set[int] = set()
                steps = torch.zeros(horizon)
                for t, r in enumerate(row):
                    mine = partners.get(r)
                    if mine and not mine.isdisjoint(seen):
                        steps[t] = 1
                    seen.add(r)
                share = steps.cumsum(0) / checks
                maxima.append(float(share[min_queries - 1 :].max()))
            per[f"{shift}/{mix}"] = float(torch.tensor(maxima).quantile(1 - alpha))
    h = max(max(per.values()), floor)
    return StepCalibration(
        threshold=h,
        min_queries=min_queries,
        alpha=alpha,
        horizon=horizon,
        streams=streams,
        seed=seed,
        per_scenario=per,
        floor=floor,
        window_threshold=max(max(per_window.values()), window_floor) if per_window else None,
        window_per_scenario=per_window,
        window_keys=[int(k) for k in window_keys],
        window_floor=window_floor,
        **rule,
    )


def _benign_window_max(
    pairs: Tensor,
    labels: Tensor,
    n: int,
    variants: int,
    keys: int,
    horizon: int,
    min_queries: int,
    mix: str,
    gen: torch.Generator,
    num_classes: int,
) -> float:
    """One simulated benign window's largest cross-key step share (:func:`calibrate_step`).

    ``keys`` users each own a random share of the ``n`` held-out images (disjoint) and replay it for
    ``horizon`` queries under ``mix``; the queries are interleaved at random. ``pairs`` ``(P, 2)``
    are the bank's step pairs ``(new_row, old_row)``; a query is a cross-key step when one of its
    pairs' old rows was sent earlier by another key.
    """
    keys = min(keys, n)
    perm = torch.randperm(n, generator=gen)
    owner = torch.empty(n, dtype=torch.long)
    owner[perm] = torch.arange(n) % keys
    rows = torch.cat(
        [
            owned_stream(labels, perm[k::keys], horizon, mix, gen, num_classes=num_classes, variants=variants)
            for k in range(keys)
        ]
    )
    # a random interleaving that keeps each key's own order: the pooled position of each key's t-th
    # query is the rank of its t-th smallest random arrival time among all keys' arrival times
    times = torch.rand(keys, horizon, generator=gen).sort(1).values.flatten()
    seq = rows[times.argsort()]  # the pooled stream, as the bank's row ids
    t = torch.arange(seq.numel())
    size = variants * n
    first = torch.full((size,), seq.numel(), dtype=torch.long).scatter_reduce(0, seq, t, "amin")
    cross = pairs[owner[pairs[:, 0] % n] != owner[pairs[:, 1] % n]]
    earliest = torch.full((size,), seq.numel(), dtype=torch.long)
    if cross.numel():
        earliest = earliest.scatter_reduce(0, cross[:, 0], first[cross[:, 1]], "amin")
    share = (earliest[seq] < t).float().cumsum(0) / (t + 1)
    return float(share[min_queries - 1 :].max())


class WindowSteps:
    """``step`` over all keys created in one window, as one stream: JBDA spread over keys (the Sybil case).

    JBDA whose budget is split round-robin over many fresh keys sends a parent on one key and its
    step on another, so no key's own stream shows the steps. Here every window (keys created within
    the same ``window_s`` seconds) has one :class:`Step` fed all its keys' queries, and two tests:

    * all steps: the window's share of steps passes ``step``'s per-key threshold (a stream of
      keys that each step from their own queries);
    * cross-key steps: the share of the window's queries that step from *another* key's query
      passes :attr:`StepCalibration.window_threshold`, calibrated on simulated benign windows of
      distinct users (:func:`calibrate_step`). Benign users hold different images, so their
      queries are rarely steps of each other's; JBDA over many keys makes most of its steps so.

    Once a test flags the window, the keys whose own evidence passes the same test's threshold are
    *contributing*. A key's evidence is the steps it sent plus the steps other keys took from its
    queries (it sent the parent: JBDA's seed and its augmented images spread over accomplices), as a
    share of its queries; for the cross-key test only its steps from other keys' queries count
    with those credits. A benign key of the same window is neither: its queries are no steps, and
    no attacker steps from images it never saw. Steps between a key's own queries count once.

    Args:
        calibration: the ``step`` calibration (its thresholds, pair rule and ``min_queries``).
        window_s: window length in seconds.

    Example:
        >>> ws = WindowSteps(StepCalibration(threshold=0.1, min_queries=10))
        >>> x = torch.rand(20, 1, 8, 8)
        >>> p, q = torch.eye(4)[[0] * 20], torch.eye(4)[[1] * 20]
        >>> ws.add("a", 0.0, x, p), ws.add("b", 1.0, (x + 0.2 * torch.randn(x.shape).sign()).clamp(0, 1), q)
        ([], ['a', 'b'])
    """

    def __init__(self, calibration: StepCalibration, *, window_s: float = 3600.0) -> None:
        if not window_s > 0:
            raise ConfigError(f"window_s must be > 0, got {window_s}")
        self.calibration = calibration
        self.window_s = window_s
        self._windows: dict[int, Step] = {}
        # per window and key: [queries sent, steps sent or parented, cross-key steps sent or parented]
        self._tally: dict[int, dict[str, list[int]]] = {}
        self._owners: dict[int, list[str | None]] = {}
        # per window: [pooled cross-key steps, query at which the cross-key test flagged it (0: not yet)]
        self._cross: dict[int, list[int]] = {}
        self._evidence: dict[str, tuple[float, float]] = {}

    def add(self, key_id: str, created_at: float, images: Tensor, probs: Tensor) -> list[str]:
        """Add one answered batch of ``key_id``; return the window's contributing keys (empty: not flagged)."""
        w = int(created_at // self.window_s)
        det = self._windows.setdefault(w, Step(self.calibration))
        before = det.verdict(f"window-{w}").queries
        window = det.observe(f"window-{w}", images, probs, None)
        tally = self._tally.setdefault(w, {})
        owners = self._owners.setdefault(w, [None] * det.memory)
        mine = tally.setdefault(key_id, [0, 0, 0])
        mine[0] += int(images.shape[0])
        mine[1] += int(det.last_steps.sum())
        cross = torch.zeros(images.shape[0], dtype=torch.bool)
        for row in torch.nonzero(det.last_parents >= 0).flatten().tolist():  # credit the parents' senders
            owner = owners[int(det.last_parents[row])]
            if owner is not None and owner != key_id:
                cross[row] = True
                other = tally.setdefault(owner, [0, 0, 0])
                other[1] += 1
                other[2] += 1
        mine[2] += int(cross.sum())
        for slot in det.last_slots[det.last_slots >= 0].tolist():
            owners[slot] = key_id
        state = self._cross.setdefault(w, [0, 0])
        h = self.calibration.window_threshold
        if h is not None and not state[1]:
            state[1] = _first_pass(before, state[0], cross, h, self.calibration.min_queries) or 0
        state[0] += int(cross.sum())
        out: dict[str, tuple[float, float]] = {}
        if state[1]:
            assert h is not None
            out.update({k: (c / n, h) for k, (n, _, c) in tally.items() if n and c > h * n})
        if window.flagged:
            out.update({k: (s / n, det.threshold) for k, (n, s, _) in tally.items() if n and s > det.threshold * n})
        self._evidence.update(out)
        return list(out)

    def evidence(self, key_id: str) -> tuple[float, float]:
        """The share and threshold of the test that last found ``key_id`` contributing (``(0, 0)``: none did)."""
        return self._evidence.get(key_id, (0.0, 0.0))

    def flagged_at(self, created_at: float) -> int | None:
        """The pooled query at which the window holding keys created at ``created_at`` was flagged by
        either test (``None``: not flagged)."""
        w = int(created_at // self.window_s)
        det = self._windows.get(w)
        at = [] if det is None else [det.verdict(f"window-{w}").flagged_at, self._cross.get(w, [0, 0])[1] or None]
        return min((a for a in at if a is not None), default=None)

    def queries(self, key_id: str) -> int:
        """Queries of ``key_id`` seen across the windows."""
        return sum(t[key_id][0] for t in self._tally.values() if key_id in t)

    def share(self, key_id: str, *, cross: bool = False) -> float:
        """``key_id``'s evidence within its window (steps it sent or was the parent of; ``cross``: only
        those between it and another key) over its queries."""
        n = self.queries(key_id)
        col = 2 if cross else 1
        return sum(t[key_id][col] for t in self._tally.values() if key_id in t) / n if n else 0.0
