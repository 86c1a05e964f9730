"""``exit-sprt``: a CUSUM sequential probability-ratio test of a key's DNF exits against the ID profile.

Extraction traffic leaves DNF at early exits far more often than in-distribution (ID) traffic
(paper Table 12), so each query's exit is evidence. The test compares, query by query,

* H0: the key's exits are drawn from the ID exit distribution ``p0`` measured at protect time
  (held-out ID data, Jeffreys-smoothed so that an exit never seen in calibration is rare, not
  impossible), against
* H1: a share ``mix`` of the key's queries are off-distribution, ``p1 = (1 - mix) p0 + mix u``
  with ``u`` uniform over exits (no assumption about *which* early exit an attack takes),

with Page's CUSUM on the log-likelihood ratio: ``S_t = max(0, S_{t-1} + log p1(e_t) / p0(e_t))``,
flagging when ``S_t >= h``. A batch is one ``cumsum``/``cummin`` (the CUSUM recursion unrolled),
not a Python loop.

Calibration (:func:`calibrate_exit_sprt`) picks ``h`` so that an ID key is flagged within
``horizon`` queries with probability ``alpha``: it simulates many ID streams of ``horizon``
queries and takes the ``1 - alpha`` quantile of their largest CUSUM value. The streams are drawn
not from the point estimate of ``p0`` but from a conservative one: every exit whose evidence
counts *for* an attack (positive log-ratio) gets the upper end of its one-sided Jeffreys interval
(``confidence``, default 95 %). The CUSUM is monotone in those exits' frequencies, so the
false-positive rate stays at or below ``alpha`` whenever the true ID rates lie below their upper
bounds (probability ``>= confidence`` per exit), given independent queries. Beyond ``horizon``
the rate grows (any CUSUM eventually fires); calibrate for the longest benign key you expect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from scipy.stats import beta as beta_dist  # type: ignore[import-untyped]
from torch import Tensor

from fortress.defenses.base import Defense
from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.monitor.base import Monitor, Verdict
from fortress.monitor.profile import KeyProfile

__all__ = [
    "ExitCalibration",
    "ExitSPRT",
    "calibrate_exit_sprt",
    "calibrate_from_defense",
    "conservative_exit_probs",
    "cusum",
    "exit_llr",
    "light_views",
]

_SIM_CHUNK = 256  # streams simulated at once (bounds memory at horizon x 256 values)


def exit_llr(id_counts: Tensor, mix: float) -> Tensor:
    """Per-exit log-likelihood ratio ``log p1(e) / p0(e)`` (module docstring), float64 ``(E,)``."""
    c = id_counts.to(torch.float64)
    e = c.numel()
    p0 = (c + 0.5) / (c.sum() + 0.5 * e)  # Jeffreys smoothing: an unseen exit is rare, not impossible
    p1 = (1.0 - mix) * p0 + mix / e
    return p1.log() - p0.log()


def conservative_exit_probs(id_counts: Tensor, llr: Tensor, confidence: float) -> Tensor:
    """The exit distribution the calibration simulates (module docstring), float64 ``(E,)``.

    Exits with ``llr > 0`` get the upper end of their one-sided Jeffreys interval; the mass left
    goes to the others in proportion to their smoothed ID frequencies.
    """
    c = id_counts.to(torch.float64)
    n = float(c.sum())
    e = c.numel()
    p0 = (c + 0.5) / (n + 0.5 * e)
    up = torch.tensor(beta_dist.ppf(confidence, c.numpy() + 0.5, n - c.numpy() + 0.5), dtype=torch.float64)
    pos = llr > 0
    raised = torch.where(pos, up, torch.zeros_like(up))
    rest = (1.0 - raised.sum()).clamp_min(0.0)
    others = torch.where(pos, torch.zeros_like(p0), p0)
    p = raised + (rest * others / others.sum() if bool(others.sum() > 0) else 0.0)
    return p / p.sum()


def cusum(increments: Tensor, start: Tensor | float = 0.0) -> Tensor:
    """Page's CUSUM ``S_t = max(0, S_{t-1} + x_t)`` along the last dimension, without a loop.

    Unrolled: with ``C_t = S_0 + x_1 + ... + x_t``, ``S_t = C_t - min(0, min_{i<=t} C_i)``.

    Shape:
        ``increments (..., T)``, ``start`` scalar or ``(...)`` → ``(..., T)``.
    """
    s0 = torch.as_tensor(start, dtype=increments.dtype)
    c = increments.cumsum(dim=-1) + s0.unsqueeze(-1)
    return c - c.cummin(dim=-1).values.clamp(max=0.0)


@dataclass(frozen=True)
class ExitCalibration:
    """What ``exit-sprt`` needs from protect time (saved as JSON next to the model or anywhere).

    Attributes:
        num_exits: exits of the defense.
        id_counts: held-out ID queries per exit.
        threshold: CUSUM threshold ``h``.
        alpha: target share of ID keys flagged within ``horizon`` queries.
        horizon: queries per ID key the rate refers to.
        mix: off-distribution share of the alternative hypothesis.
        confidence: one-sided level of the per-exit upper bounds used in the simulation.
        simulations: simulated ID streams.
        seed: seed of the simulation.
        id_profile: the held-out data's :class:`KeyProfile` (for display next to a key's).
        per_scenario: with benign scenarios, each one's ``1 - alpha`` quantile (``"id"``: the
            held-out data as given); ``threshold`` is the largest (``None``: the held-out data only).
        benign_early_share: with benign scenarios, the largest share of queries leaving before the
            last exit among them (the held-out data included).
    """

    num_exits: int
    id_counts: tuple[int, ...]
    threshold: float
    alpha: float
    horizon: int
    mix: float
    confidence: float
    simulations: int
    seed: int
    id_profile: dict[str, Any] | None = None
    per_scenario: dict[str, float] | None = None
    benign_early_share: float | None = None

    @property
    def early_share(self) -> float:
        """The share of benign queries that may leave before the last exit: over the benign scenarios
        where the calibration has them (:attr:`benign_early_share`), else the held-out data's."""
        if self.benign_early_share is not None:
            return self.benign_early_share
        return 1 - self.id_counts[-1] / sum(self.id_counts)

    def save(self, path: Path) -> Path:
        """Write the calibration as JSON; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"monitor": "exit-sprt", **asdict(self)}, indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> ExitCalibration:
        """Read a calibration written by :meth:`save`.

        Raises:
            ArtifactError: missing, unreadable or not an ``exit-sprt`` calibration.
        """
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("monitor", None) != "exit-sprt":
                raise ValueError("not an exit-sprt calibration")
            data["id_counts"] = tuple(int(c) for c in data["id_counts"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(
                f"cannot read monitor calibration {path}: {exc} (make one with `fortress monitor calibrate`)"
            ) from exc


def calibrate_exit_sprt(
    id_exits: Tensor,
    num_exits: int,
    *,
    alpha: float = 0.01,
    horizon: int = 10_000,
    mix: float = 0.1,
    confidence: float = 0.95,
    simulations: int = 2000,
    seed: int = 0,
    id_profile: dict[str, Any] | None = None,
    benign: Mapping[str, Tensor] | None = None,
) -> ExitCalibration:
    """Pick the CUSUM threshold for a target false-positive rate (module docstring).

    With ``benign`` (exits of held-out ID images under realistic shifts and of single classes:
    traffic real users send that exits otherwise than the held-out data), H0 stays the held-out
    exit profile, streams are simulated from each scenario's own conservative exit distribution
    as well, and ``h`` is the largest of the quantiles: the rate holds in every scenario, as
    ``dadd``'s and ``step``'s calibrations do.

    Args:
        id_exits: ``(N,)`` exits of held-out ID queries (not the data the heads were trained on).
        num_exits: exits of the defense.
        alpha: share of ID keys allowed to be flagged within ``horizon`` queries.
        horizon: queries per ID key.
        mix: off-distribution share under H1 (smaller: slower drift, subtler shifts detected).
        confidence: level of the per-exit upper bounds the simulation uses.
        simulations: simulated ID streams (``alpha * simulations`` of them lie above ``h``).
        seed: simulation seed.
        id_profile: stored alongside for display.
        benign: per scenario name, ``(N,)`` exits of that benign traffic (each non-empty).

    Example:
        >>> cal = calibrate_exit_sprt(torch.full((1000,), 3), 4, simulations=200)
        >>> cal.threshold > 0
        True
    """
    if num_exits < 2:
        raise ConfigError(f"exit-sprt needs a defense with >= 2 exits, got num_exits={num_exits}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0.0 < mix < 1.0:
        raise ConfigError(f"mix must lie in (0, 1), got {mix}")
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence must lie in [0.5, 1), got {confidence}")
    if horizon < 1 or simulations < 10:
        raise ConfigError(f"horizon must be >= 1 and simulations >= 10, got {horizon} and {simulations}")
    if id_exits.dim() != 1 or id_exits.numel() == 0:
        raise InvalidInput(f"id_exits must be a non-empty (N,) tensor, got shape {tuple(id_exits.shape)}")
    if int(id_exits.min()) < 0 or int(id_exits.max()) >= num_exits:
        raise InvalidInput(
            f"id_exits must lie in [0, {num_exits}), got range [{int(id_exits.min())}, {int(id_exits.max())}]"
        )
    scenarios = {"id": id_exits, **(benign or {})}
    for name, ex in scenarios.items():
        if ex.dim() != 1 or ex.numel() == 0 or int(ex.min()) < 0 or int(ex.max()) >= num_exits:
            raise InvalidInput(f"benign scenario {name!r}: exits must be a non-empty (N,) tensor in [0, {num_exits})")
    counts = torch.bincount(id_exits.to(torch.long), minlength=num_exits)
    llr = exit_llr(counts, mix)
    gen = torch.Generator().manual_seed(seed)
    per: dict[str, float] = {}
    early = 0.0
    for name, ex in scenarios.items():
        early = max(early, float((ex != num_exits - 1).float().mean()))
        p_sim = conservative_exit_probs(torch.bincount(ex.to(torch.long), minlength=num_exits), llr, confidence)
        peaks = []
        for lo in range(0, simulations, _SIM_CHUNK):
            m = min(_SIM_CHUNK, simulations - lo)
            draws = torch.multinomial(p_sim, m * horizon, replacement=True, generator=gen).view(m, horizon)
            peaks.append(cusum(llr[draws]).amax(dim=1))
        per[name] = float(torch.quantile(torch.cat(peaks), 1.0 - alpha))
    h = max(per.values())
    # flags are ``S >= h``: sit just above the quantile so at most the top alpha share reaches it
    h = max(h, 1e-6) + 1e-9
    return ExitCalibration(
        num_exits=num_exits,
        id_counts=tuple(int(c) for c in counts.tolist()),
        threshold=h,
        alpha=alpha,
        horizon=horizon,
        mix=mix,
        confidence=confidence,
        simulations=simulations,
        seed=seed,
        id_profile=id_profile,
        per_scenario=per if benign else None,
        benign_early_share=early if benign else None,
    )


def light_views(x: Tensor, views: int, *, seed: int = 0, max_shift: int = 2, noise: float = 0.02) -> Tensor:
    """``x`` followed by ``views`` lightly perturbed copies (random shift, Gaussian noise), for calibration.

    Real users' queries are not pixel copies of the validation split; shifted, noisy copies make
    the held-out ID profile less optimistic about how rarely ID queries leave early.

    Shape:
        ``(N, C, H, W)`` → ``((1 + views) N, C, H, W)``, clamped to [0, 1].
    """
    if views < 0 or max_shift < 0 or noise < 0:
        raise ConfigError(f"views, max_shift and noise must be >= 0, got {views}, {max_shift}, {noise}")
    gen = torch.Generator().manual_seed(seed)
    out = [x]
    shifts = range(-max_shift, max_shift + 1)
    for _ in range(views):
        dx = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=gen)
        dy = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=gen)
        v = torch.empty_like(x)
        for sx in shifts:  # a loop over the few shifts, not over samples
            for sy in shifts:
                m = (dx == sx) & (dy == sy)
                v[m] = torch.roll(x[m], shifts=(sy, sx), dims=(2, 3))
        out.append((v + noise * torch.randn(v.shape, generator=gen)).clamp(0.0, 1.0))
    return torch.cat(out)


@torch.no_grad()
def calibrate_from_defense(
    defense: Defense,
    x_heldout: Tensor,
    *,
    chunk: int = 1024,
    shifts: Sequence[str] = (),
    variants: int = 10,
    **kw: Any,
) -> ExitCalibration:
    """Answer held-out ID images with ``defense`` and calibrate ``exit-sprt`` on their exits.

    With ``shifts`` (names of :data:`fortress.monitor.benign.IMAGE_SHIFTS`), the threshold also
    holds for benign traffic under each realistic shift and for users who send one predicted
    class only: ``variants`` shifted copies of ``x_heldout`` per shift are answered, and every
    shift × (all classes, each single class) is a benign scenario of :func:`calibrate_exit_sprt`
    (as are the held-out images' single classes). A class with fewer than 100 rows in a bank is
    left out of the per-class scenarios.

    Args:
        defense: a defense with exits (DNF).
        x_heldout: ``(N, C, H, W)`` held-out ID images.
        chunk: rows per forward pass.
        shifts: realistic shifts to calibrate for (empty: the held-out images as given only).
        variants: shifted copies per image and shift.
        **kw: passed to :func:`calibrate_exit_sprt` (``alpha``, ``horizon``, ``mix``, ``seed``, ...).

    Raises:
        ConfigError: the defense reports no exits, or an unknown shift.
    """
    from fortress.monitor.benign import shifted

    if not defense.num_exits:
        raise ConfigError(f"exit-sprt needs a defense that reports exits; {defense.name!r} reports none")

    def answer(x: Tensor, profile: KeyProfile | None = None) -> tuple[Tensor, Tensor]:
        exits, cls = [], []
        for i in range(0, x.shape[0], chunk):
            out = defense.respond(x[i : i + chunk])
            if out.exits is None:
                raise ConfigError(f"defense {defense.name!r} answered without exits")
            if profile is not None:
                profile.update(out.probs, out.exits)
            exits.append(out.exits)
            cls.append(out.probs.argmax(1))
        return torch.cat(exits), torch.cat(cls)

    prof = KeyProfile(num_exits=defense.num_exits)
    id_exits, id_cls = answer(x_heldout, prof)
    benign: dict[str, Tensor] = {}
    if shifts:
        gen = torch.Generator().manual_seed(int(kw.get("seed", 0)))
        banks = {"replay": (id_exits, id_cls)}
        for shift in shifts:
            if shift != "replay":
                banks[shift] = answer(torch.cat([shifted(x_heldout, shift, gen) for _ in range(variants)]))
        for shift, (ex, cls) in banks.items():
            benign[f"{shift}/uniform"] = ex
            for c in cls.unique().tolist():
                if int((cls == c).sum()) >= 100:
                    benign[f"{shift}/class {c}"] = ex[cls == c]
    return calibrate_exit_sprt(id_exits, defense.num_exits, id_profile=prof.as_dict(), benign=benign or None, **kw)


@dataclass
class _KeyState:
    s: float = 0.0
    n: int = 0
    flagged_at: int | None = None


class ExitSPRT(Monitor):
    """Flag a key whose exits depart from the ID exit profile (CUSUM test; module docstring).

    Args:
        calibration: from :func:`calibrate_exit_sprt` / ``fortress monitor calibrate``.
        threshold: override the calibrated ``h`` (``None``: use it).

    Example:
        >>> mon = ExitSPRT(calibrate_exit_sprt(torch.full((1000,), 3), 4, simulations=200))
        >>> early = torch.zeros(50, dtype=torch.long)  # every query leaves at the first exit
        >>> mon.observe("k", torch.rand(50, 1, 28, 28), torch.full((50, 10), 0.1), early).flagged
        True
    """

    name: ClassVar[str] = "exit-sprt"

    def __init__(self, calibration: ExitCalibration, *, threshold: float | None = None) -> None:
        if threshold is not None and not threshold > 0:
            raise ConfigError(f"threshold must be > 0, got {threshold}")
        self.calibration = calibration
        self.threshold = calibration.threshold if threshold is None else threshold
        self.llr = exit_llr(torch.tensor(calibration.id_counts), calibration.mix)
        self._keys: dict[str, _KeyState] = {}

    def observe(self, key_id: str, images: Tensor, probs: Tensor, exits: Tensor | None) -> Verdict:
        st = self._keys.setdefault(key_id, _KeyState())
        if exits is None:
            raise InvalidInput("exit-sprt needs the exits of each query; the defense reported none")
        e = exits.to(torch.long)
        if e.numel() and (int(e.min()) < 0 or int(e.max()) >= self.llr.numel()):
            raise InvalidInput(f"exit indices must lie in [0, {self.llr.numel()}), got {e.tolist()[:8]}")
        if e.numel():
            path = cusum(self.llr[e], st.s)
            if st.flagged_at is None:
                over = torch.nonzero(path >= self.threshold)
                if over.numel():
                    st.flagged_at = st.n + int(over[0]) + 1
            st.s = float(path[-1])
            st.n += int(e.numel())
        return self.verdict(key_id)

    def verdict(self, key_id: str) -> Verdict:
        st = self._keys.get(key_id, _KeyState())
        return Verdict(key_id, st.flagged_at is not None, st.n, st.flagged_at, st.s, self.threshold)

    def state(self, key_id: str) -> dict[str, Any] | None:
        st = self._keys.get(key_id)
        return None if st is None else {"s": st.s, "n": st.n, "flagged_at": st.flagged_at}

    def restore(self, key_id: str, state: dict[str, Any]) -> None:
        fa = state.get("flagged_at")
        self._keys[key_id] = _KeyState(float(state["s"]), int(state["n"]), None if fa is None else int(fa))

    def reset(self, key_id: str) -> None:
        self._keys.pop(key_id, None)
