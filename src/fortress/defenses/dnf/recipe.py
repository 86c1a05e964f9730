"""The DNF protection recipe: what ``fortress protect`` and the benchmark grids do to a victim.

:meth:`DNF.fit` trains exit heads. Protecting a model takes more steps, each from the paper or
measured here, and :func:`protect` runs them in order:

1. **OOD source** (paper §4.1, App. F): a DCGAN trained on proxy images, the proxy images
   themselves, noise, or DCGAN samples mixed with noise (:class:`OODConfig`).
2. **Training with an acceptance check**: the heads train (Alg. 1); then at least
   ``min_ood_exit0`` of fresh OOD samples must leave at exit 0, else the heads are re-initialised
   with the next seed and trained again, up to ``max_attempts`` times (the best attempt is kept).
3. **Utility guard** (beyond the paper, whose App. H searches thresholds under a utility
   constraint): thresholds are raised until early exits cost at most ``max_utility_drop`` points
   of held-out ID accuracy (default 0.5, the paper's Table 4 gap; 0: no head may answer a held-out
   ID image wrongly that the victim answers rightly) (:func:`guard_utility`). The budget is also
   the threshold search's tolerance.
4. **Selection by an extraction probe** (optional, beyond the paper; ``ProtectConfig.select``):
   steps 2–3 run for several candidate trainings, each is attacked by the defender's own short
   data-free extraction (:func:`~fortress.defenses.dnf.probe.extraction_probe`), and the candidate
   the probe extracts least from is kept. How well one training protects is partly luck; this
   trades training time for a narrower spread.
5. **Threshold search** (optional, paper App. H): SMAC3 Bayesian optimisation of the thresholds.

Every option is validated before anything trains, and every expensive result is saved before the
next expensive step starts: the DCGAN to ``OUT/ood/`` (reused when the run is repeated), each
training attempt to ``OUT/checkpoints/attempt-<k>/`` every epoch (candidate ``j > 0`` of a selection:
``OUT/checkpoints/candidate-<j>/attempt-<k>/``), the guarded DNF to ``OUT`` before
the search, and again with the searched thresholds. What was done is recorded on the model as one
frozen :class:`~fortress.defenses.dnf.provenance.Provenance` (``dnf.provenance``), saved with it.

Example:
    >>> from fortress.data import mnist_splits
    >>> d = mnist_splits()
    >>> data = DefenderData.from_splits(d.train, d.val, num_classes=10, dataset="mnist")
    >>> dnf = protect(victim, data, ProtectConfig(), out=Path("runs/dnf"))  # doctest: +SKIP
    >>> dnf.provenance.attempts  # doctest: +SKIP
    (Attempt(head_seed=0, ood_exit0=0.94),)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fortress.data.defaults import fitted_options
from fortress.data.registry import load_dataset
from fortress.defenses.dnf.defense import DNF
from fortress.defenses.dnf.guard import guard_utility
from fortress.defenses.dnf.probe import ProbeConfig, extraction_probe
from fortress.defenses.dnf.provenance import Attempt, Candidate, GuardResult, Provenance, SearchSummary, Selection
from fortress.defenses.dnf.threshold_search import (
    ThresholdSearchConfig,
    ThresholdSearchResult,
    default_query_set,
    search_thresholds,
)
from fortress.defenses.dnf.training import DNFTrainConfig, StepInfo
from fortress.defenses.trainable import DefenderData
from fortress.device import device_of
from fortress.errors import ArtifactError, ConfigError
from fortress.generative.dcgan import CONFIG as DCGAN_CONFIG
from fortress.generative.dcgan import DCGANGenerator, load_generator, save_generator, train_dcgan
from fortress.generative.near_ood import NEAR_TRANSFORMS, NearIDOOD
from fortress.generative.ood import GeneratorOOD, MixtureOOD, NoiseOOD, OODSource, PoolOOD
from fortress.models.staged import StagedBackbone

__all__ = [
    "OOD_PARTS",
    "OODConfig",
    "ProtectConfig",
    "SelectConfig",
    "build_ood",
    "effective",
    "guard_utility",
    "protect",
]

log = logging.getLogger(__name__)

#: Seed offset of the OOD probes of the acceptance check (fresh draws, never seen in training).
PROBE_SEED = 20_000
#: Sub-directories of ``out``: the trained OOD generator and the per-attempt training checkpoints.
OOD_DIR = "ood"
CHECKPOINTS_DIR = "checkpoints"
#: Candidate ``j`` of a selection trains with seed ``train.seed + CANDIDATE_SEED_STRIDE * j``, so no
#: candidate of one training seed is a candidate (or an acceptance retry) of another.
CANDIDATE_SEED_STRIDE = 1_000

#: The parts an OOD source is mixed from (``OODConfig.kind`` joins them with ``+``).
OOD_PARTS = ("dcgan", "proxy", "noise", "near")


@dataclass(frozen=True)
class OODConfig:
    """Where DNF's OOD training data come from (paper §4.1, App. F, Table 3), recorded with the model.

    Attributes:
        kind: one part or several joined by ``+`` (a mixture, equal shares unless ``weights``):
            ``"dcgan"`` (a DCGAN trained on the proxy set; the paper's choice), ``"proxy"`` (the proxy
            images themselves: another real data set of the victim's shape), ``"noise"``
            (uniform/Gaussian/smooth noise) and ``"near"`` (the defender's own ID training images
            put through semantics-destroying transforms, :class:`~fortress.generative.near_ood.NearIDOOD`).
            Default ``"dcgan+noise"``. The paper finds the OOD set matters little (Table 3);
            measured against a 1M-query DFME on LeNet-5/MNIST (seed 0), the mixture cut the clone to
            18.4 % with 77.5 % of DFME queries at exit 0, against 33.1 % and 42.6 % for the DCGAN alone.
        proxy: registered data set used as proxy (default: natural-photo patches; ``patches`` crops
            are drawn with ``seed``).
        proxy_size: proxy images used.
        dcgan_epochs: DCGAN training epochs (paper: 30).
        dcgan_ngf: DCGAN width.
        near_transforms: the transforms of ``"near"`` (among
            :data:`~fortress.generative.near_ood.NEAR_TRANSFORMS`).
        weights: the mixture's share per part of ``kind``, in its order (``None``: equal shares).
        seed: seeds the proxy sample and the DCGAN.
    """

    kind: str = "dcgan+noise"
    proxy: str = "patches"
    proxy_size: int = 2000
    dcgan_epochs: int = 30
    dcgan_ngf: int = 32
    near_transforms: tuple[str, ...] = NEAR_TRANSFORMS
    weights: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        parts = self.parts
        if not parts or any(p not in OOD_PARTS for p in parts) or len(set(parts)) != len(parts):
            raise ConfigError(
                f"ood.kind must be one of {', '.join(OOD_PARTS)} or several of them joined by '+' "
                f"(e.g. dcgan+noise, near+noise), each at most once; got {self.kind!r}"
            )
        for label, value, least in (
            ("proxy_size", self.proxy_size, 2),
            ("dcgan_epochs", self.dcgan_epochs, 1),
            ("dcgan_ngf", self.dcgan_ngf, 1),
        ):
            if value < least:
                raise ConfigError(f"invalid OOD settings: {label} must be >= {least}, got {value}")
        bad = [t for t in self.near_transforms if t not in NEAR_TRANSFORMS]
        if bad or not self.near_transforms:
            raise ConfigError(f"near_transforms must be among {NEAR_TRANSFORMS}, got {list(self.near_transforms)}")
        if self.weights is not None and (
            len(self.weights) != len(parts) or any(not w >= 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ConfigError(
                f"OOD weights must be {len(parts)} non-negative numbers (one per part of {self.kind!r}), "
                f"got {list(self.weights)}"
            )

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts of :attr:`kind`, in order."""
        return tuple(p.strip() for p in self.kind.split("+"))


@dataclass(frozen=True)
class SelectConfig:
    """Selection among candidate trainings by the defender's extraction probe (recipe step 4).

    Attributes:
        candidates: DNFs trained (each with its own seed, acceptance check and utility guard);
            training time grows about linearly with it, plus one probe per candidate.
        probe: the extraction probe's settings (the same probe, seed included, for every candidate).
    """

    candidates: int = 3
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ConfigError(f"select.candidates must be >= 1, got {self.candidates}")


@dataclass(frozen=True)
class ProtectConfig:
    """How to build and train DNF on a victim (the settings of :func:`protect`).

    Attributes:
        head_kind: ``"vib"`` (paper Eq. 5) or ``"plain"``.
        hidden: head hidden width (``None``: one linear layer, paper Table 6).
        thresholds: per-head thresholds (``None``: the paper's defaults for the data set).
        train_final_exit: train a copy of the final classifier too.
        utility_guard: after training, raise thresholds so early exits cost at most
            ``max_utility_drop`` of held-out ID validation accuracy (:func:`guard_utility`).
        max_utility_drop: the utility budget, in points of ID validation accuracy (default 0.5, the
            gap of the paper's Table 4): the guard and the threshold search accept early ID answers as
            long as the defended accuracy stays at least the victim's minus this. 0: zero tolerance, no
            head may answer a validation image wrongly that the victim answers rightly (the search then
            keeps its own ``tolerance``).
        early_id_exits: with a utility budget (``max_utility_drop > 0``), train the intermediate
            exits to answer ID queries (:meth:`effective`): the ID KL term only at exit 0, ID
            confident and distilled from the final exit at exits 1…, and a temperature fitted to
            each of them. Exit 0 keeps the paper's objective, so it keeps catching attack queries.
            With a zero budget it does nothing (today's recipe).
        calibrate_from: fit a temperature to every head from this one on, on the ID validation
            split, before the guard (:func:`~fortress.defenses.dnf.calibration.calibrate_exits`);
            ``None``: off.
        min_ood_exit0: acceptance check on the defender's own data: after training, at least this
            share of fresh samples from the OOD source must leave at exit 0, else the heads are
            re-initialised with the next seed and retrained (0 turns the check off).
        max_attempts: trainings tried before giving up on the acceptance check (the best is kept).
        train: DNF training hyper-parameters.
        ood: OOD data source.
        select: train several candidates and keep the one the extraction probe extracts least
            from (:class:`SelectConfig`); ``None``: one training, as before the selection existed.
        search: SMAC3 threshold search after training (paper App. H; ``None``: keep the thresholds).
    """

    head_kind: Literal["vib", "plain"] = "vib"
    hidden: int | None = None
    thresholds: tuple[float, ...] | None = None
    train_final_exit: bool = False
    utility_guard: bool = True
    max_utility_drop: float = 0.5
    early_id_exits: bool = True
    calibrate_from: int | None = None
    min_ood_exit0: float = 0.5
    max_attempts: int = 3
    train: DNFTrainConfig = field(default_factory=DNFTrainConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    select: SelectConfig | None = None
    search: ThresholdSearchConfig | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.min_ood_exit0 <= 1.0:
            raise ConfigError(f"min_ood_exit0 (a share of OOD probes) must be in [0, 1], got {self.min_ood_exit0}")
        if not 0.0 <= self.max_utility_drop <= 100.0:
            raise ConfigError(
                f"max_utility_drop (points of ID validation accuracy) must be in [0, 100], got {self.max_utility_drop}"
            )
        if self.calibrate_from is not None and self.calibrate_from < 1:
            raise ConfigError(
                f"calibrate_from must be >= 1 (exit 0 stays as trained) or None, got {self.calibrate_from}"
            )
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden (head width) must be >= 1 or None, got {self.hidden}")


def effective(cfg: ProtectConfig) -> ProtectConfig:
    """``cfg`` with ``early_id_exits`` applied: the loss options and calibration it implies, where
    they are left at the paper's values (a zero budget or ``early_id_exits=False``: ``cfg`` itself)."""
    if not cfg.early_id_exits or cfg.max_utility_drop == 0:
        return cfg
    w = cfg.train.weights
    weights = replace(
        w,
        id_kl_until=1 if w.id_kl_until is None else w.id_kl_until,
        id_confident_from=1 if w.id_confident_from is None else w.id_confident_from,
        distill=1.0 if w.distill == 0 else w.distill,
    )
    return replace(
        cfg,
        train=replace(cfg.train, weights=weights),
        calibrate_from=1 if cfg.calibrate_from is None else cfg.calibrate_from,
    )


#: The OOD settings a saved DCGAN depends on (compared when it is reused).
DCGAN_SETTINGS = ("proxy", "proxy_size", "dcgan_epochs", "dcgan_ngf", "seed")


def _dcgan_settings(cfg: OODConfig) -> dict[str, object]:
    return {k: v for k, v in asdict(cfg).items() if k in DCGAN_SETTINGS}


def _dcgan(
    cfg: OODConfig,
    images: Tensor,
    directory: Path | None,
    resume: bool,
    on_epoch: Callable[[int, float, float], None] | None,
    device: torch.device | None = None,
) -> DCGANGenerator:
    """Train the proxy DCGAN and save it to ``directory``, or reuse the one saved there with the same settings."""
    settings = _dcgan_settings(cfg)
    if directory is not None and resume and (directory / DCGAN_CONFIG).is_file():
        generator, extra = load_generator(directory)
        if extra.get("settings") != settings or generator.image_shape != tuple(images.shape[1:]):
            raise ArtifactError(
                f"the OOD generator in {directory} was trained with other settings ({extra.get('settings')}); "
                "remove it or pass resume=False to train a new one"
            )
        log.info("reusing the OOD generator saved in %s", directory)
        return generator if device is None else generator.to(device)
    generator, report = train_dcgan(
        images, epochs=cfg.dcgan_epochs, ngf=cfg.dcgan_ngf, seed=cfg.seed, on_epoch=on_epoch, device=device
    )
    if directory is not None:
        save_generator(generator, directory, {"settings": settings, "g_loss": report.g_loss, "d_loss": report.d_loss})
    return generator


def build_ood(
    cfg: OODConfig,
    image_shape: tuple[int, int, int],
    *,
    id_data: tuple[Tensor, Tensor] | None = None,
    directory: Path | None = None,
    resume: bool = True,
    on_epoch: Callable[[int, float, float], None] | None = None,
    device: torch.device | None = None,
) -> OODSource:
    """Build DNF's OOD source, training the DCGAN on the proxy set when ``cfg.kind`` needs one.

    Args:
        cfg: the OOD settings.
        image_shape: the victim's ``(C, H, W)``.
        id_data: the defender's ID training images ``(N, C, H, W)`` and labels ``(N,)`` (``"near"`` needs them).
        directory: where the trained DCGAN is saved (and found again when ``resume``); ``None``: not saved.
        resume: reuse a DCGAN saved in ``directory`` with the same settings.
        on_epoch: DCGAN progress, ``on_epoch(epoch, g_loss, d_loss)``.
        device: where the DCGAN trains and samples (``None``: the CPU); every source answers on the CPU.

    Raises:
        ConfigError: the proxy images do not have the victim's shape, or ``"near"`` without ``id_data``.
        ArtifactError: the saved DCGAN is corrupt or was trained with other settings.
    """
    parts = cfg.parts
    if "near" in parts and id_data is None:
        raise ConfigError(f"OOD kind {cfg.kind!r} transforms the defender's ID images; pass id_data")
    x: Tensor | None = None
    if "proxy" in parts or "dcgan" in parts:
        drawn: dict[str, object] = {"n": cfg.proxy_size, "seed": cfg.seed} if cfg.proxy == "patches" else {}
        proxy = load_dataset(cfg.proxy, None, **fitted_options(cfg.proxy, image_shape), **drawn)  # the victim's shape
        x = proxy.x[: cfg.proxy_size]
        if tuple(x.shape[1:]) != tuple(image_shape):
            raise ConfigError(
                f"proxy set {cfg.proxy!r} has images {tuple(x.shape[1:])}, the victim takes {image_shape}"
            )
    sources: list[OODSource] = []
    for part in parts:
        if part == "noise":
            sources.append(NoiseOOD(image_shape))
        elif part == "near":
            assert id_data is not None  # checked above
            sources.append(NearIDOOD(id_data[0], id_data[1], transforms=cfg.near_transforms))
        elif part == "proxy":
            assert x is not None
            sources.append(PoolOOD(x, name=cfg.proxy))
        else:
            assert x is not None
            sources.append(GeneratorOOD(_dcgan(cfg, x, directory, resume, on_epoch, device), proxy=cfg.proxy))
    return sources[0] if len(sources) == 1 else MixtureOOD(sources, cfg.weights)


def _guard(dnf: DNF, data: DefenderData, cfg: ProtectConfig) -> tuple[GuardResult | None, tuple[float, ...] | None]:
    """Calibrate the intermediate exits (if configured), then run the utility guard (if on)."""
    temps = None
    if cfg.calibrate_from is not None:
        from fortress.defenses.dnf.calibration import calibrate_exits

        temps = calibrate_exits(dnf, data.x_val, data.y_val, first=cfg.calibrate_from)
        log.info("exit temperatures %s", [round(t, 4) for t in temps])
    if not cfg.utility_guard:
        return None, temps
    return guard_utility(dnf, data.x_val, data.y_val, max_utility_drop=cfg.max_utility_drop), temps


def _search_config(cfg: ProtectConfig) -> ThresholdSearchConfig | None:
    """The search's settings; a utility budget sets its tolerance (a zero budget keeps the search's own)."""
    if cfg.search is None or cfg.max_utility_drop == 0:
        return cfg.search
    return replace(cfg.search, tolerance=cfg.max_utility_drop / 100.0)


def _new_dnf(victim: StagedBackbone, cfg: ProtectConfig, dataset: str | None, seed: int) -> DNF:
    dnf = DNF(
        victim,
        head_kind=cfg.head_kind,
        hidden=cfg.hidden,
        thresholds=cfg.thresholds,
        dataset=dataset,
        train_final_exit=cfg.train_final_exit,
        seed=seed,
    )
    return dnf.to(device_of(victim))  # the heads join the victim on its device


def _check(victim: StagedBackbone, data: DefenderData, cfg: ProtectConfig) -> Tensor | None:
    """Refuse what would fail after training; return the threshold search's query set (if searching)."""
    data.check_fits(victim.input_shape, victim.num_classes, what="the victim")
    _new_dnf(victim, cfg, data.dataset, cfg.train.seed)  # head options and thresholds
    if cfg.search is None:
        return None
    query = default_query_set(cfg.search, victim.input_shape)
    if tuple(query.shape[1:]) != victim.input_shape:
        raise ConfigError(
            f"the threshold search's query set has images {tuple(query.shape[1:])}, the victim takes "
            f"{victim.input_shape}; search the thresholds with search_thresholds(..., query=<your images>)"
        )
    return query


def _summary(result: ThresholdSearchResult) -> SearchSummary:
    return SearchSummary(
        thresholds=tuple(result.best.thresholds),
        surrogate=result.best.surrogate,
        val_acc=result.best.val_acc,
        baseline_thresholds=tuple(result.baseline.thresholds),
        baseline_surrogate=result.baseline.surrogate,
        baseline_val_acc=result.baseline.val_acc,
        victim_val_acc=result.victim_val_acc,
        n_trials=len(result.trials),
        trials_file=None if result.trials_path is None else result.trials_path.name,
    )


def _pareto(
    dnf: DNF,
    data: DefenderData,
    cfg: ProtectConfig,
    search: ThresholdSearchConfig,
    query: Tensor | None,
    out: Path | None,
) -> None:
    """The three-way threshold search; apply its pick under the utility budget and record it."""
    from fortress.defenses.dnf.pareto_search import PARETO_FILE, search_pareto

    assert search.goal is not None and dnf.provenance is not None
    budget = cfg.max_utility_drop if cfg.max_utility_drop > 0 else 100.0 * search.tolerance
    res = search_pareto(
        dnf.net,
        (data.x_val, data.y_val),
        goal=search.goal,
        max_utility_drop=budget,
        config=search,
        query=query,
        dataset=data.dataset,
        out_dir=out,
    )
    dnf.set_thresholds(res.chosen.thresholds)
    summary = SearchSummary(
        thresholds=tuple(res.chosen.thresholds),
        surrogate=res.chosen.surrogate,
        val_acc=res.chosen.val_acc,
        baseline_thresholds=tuple(res.baseline.thresholds),
        baseline_surrogate=res.baseline.surrogate,
        baseline_val_acc=res.baseline.val_acc,
        victim_val_acc=res.victim_val_acc,
        n_trials=len(res.trials),
        trials_file=None if res.front_path is None else PARETO_FILE,
        goal=search.goal,
        id_compute=res.chosen.id_compute,
        baseline_id_compute=res.baseline.id_compute,
        front_size=len(res.front),
    )
    dnf.provenance = replace(dnf.provenance, search=summary)
    log.info(
        "three-way threshold search (%s): %s (surrogate %.4f, ID compute %.3f×, val acc %.4f), front of %d",
        search.goal,
        res.chosen.thresholds,
        res.chosen.surrogate,
        res.chosen.id_compute,
        res.chosen.val_acc,
        len(res.front),
    )
    if out is not None:
        dnf.save(out)


def _train_accepted(
    victim: StagedBackbone,
    data: DefenderData,
    cfg: ProtectConfig,
    ood: OODSource,
    seed: int,
    checkpoints: Path | None,
    resume: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> tuple[DNF, list[Attempt]]:
    """Train with training seed ``seed`` until the acceptance check passes (at most ``max_attempts``); keep the best."""
    # acceptance probe: fresh draws from the defender's own OOD source (never seen in training)
    probe = ood.sample(1024, torch.Generator().manual_seed(PROBE_SEED + seed))
    train = replace(cfg.train, seed=seed)
    attempts: list[Attempt] = []
    best: tuple[float, DNF] | None = None
    for attempt in range(cfg.max_attempts):
        head_seed = seed + attempt
        dnf = _new_dnf(victim, cfg, data.dataset, head_seed)
        dnf.fit(
            data,
            train,
            ood=ood,
            checkpoint_dir=None if checkpoints is None else checkpoints / f"attempt-{attempt}",
            resume=resume,
            on_step=on_step,
        )
        share = dnf.exit_share(probe, 0)
        attempts.append(Attempt(head_seed, share))
        log.info("DNF attempt %d (head seed %d): %.1f%% of OOD probes leave at exit 0", attempt, head_seed, 100 * share)
        if best is None or share > best[0]:
            best = (share, dnf)
        if share >= cfg.min_ood_exit0:
            break
    assert best is not None  # max_attempts >= 1
    return best[1], attempts


def _select(
    victim: StagedBackbone,
    data: DefenderData,
    cfg: ProtectConfig,
    select: SelectConfig,
    ood: OODSource,
    checkpoints: Path | None,
    resume: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> DNF:
    """Train ``select.candidates`` accepted, guarded DNFs; keep the one the extraction probe extracts least from."""
    made: list[tuple[DNF, Candidate, tuple[GuardResult | None, tuple[float, ...] | None]]] = []
    for j in range(select.candidates):
        seed = cfg.train.seed + CANDIDATE_SEED_STRIDE * j
        where = checkpoints if checkpoints is None or j == 0 else checkpoints / f"candidate-{j}"
        t0 = time.perf_counter()
        dnf, attempts = _train_accepted(victim, data, cfg, ood, seed, where, resume, on_step)
        adjusted = _guard(dnf, data, cfg)
        t1 = time.perf_counter()
        result = extraction_probe(dnf, data.x_val, data.y_val, select.probe)
        accepted = any(a.ood_exit0 >= cfg.min_ood_exit0 for a in attempts)
        cand = Candidate(seed, tuple(attempts), accepted, result.student_acc, result.exit_hist, t1 - t0, result.wall_s)
        log.info(
            "DNF candidate %d (training seed %d): the probe's student reached %.1f%% (exits %s)",
            j,
            seed,
            100 * result.student_acc,
            [round(v, 3) for v in result.exit_hist],
        )
        made.append((dnf, cand, adjusted))
    pool = [i for i, (_, c, _) in enumerate(made) if c.accepted] or list(range(len(made)))
    chosen = min(pool, key=lambda i: (made[i][1].probe_student_acc, i))
    dnf, cand, (guard, temps) = made[chosen]
    selection = Selection(tuple(c for _, c, _ in made), chosen, asdict(select.probe))
    dnf.provenance = Provenance(cand.attempts, cfg.min_ood_exit0, guard=guard, selection=selection, temperatures=temps)
    return dnf


def protect(
    victim: StagedBackbone,
    data: DefenderData,
    config: ProtectConfig | None = None,
    *,
    out: Path | None = None,
    resume: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    on_dcgan_epoch: Callable[[int, float, float], None] | None = None,
) -> DNF:
    """Protect ``victim`` with DNF: OOD source, training with acceptance check, utility guard, selection, search.

    Args:
        victim: the trained, staged victim (never modified).
        data: the defender's data (training, validation; ``data.dataset`` picks paper defaults).
        config: the recipe's settings (default :class:`ProtectConfig`).
        out: directory to save into (DCGAN, checkpoints, the DNF, the search's trials); ``None``: nothing is written.
        resume: reuse the DCGAN and continue the trainings saved in ``out``.
        on_step: progress of each training step.
        on_dcgan_epoch: progress of the DCGAN, ``on_dcgan_epoch(epoch, g_loss, d_loss)``.

    Returns:
        The DNF, with its :class:`~fortress.defenses.dnf.provenance.Provenance` in ``dnf.provenance``
        (also saved to ``out``).

    Raises:
        InvalidInput: ``data`` does not fit the victim.
        ConfigError: a setting is invalid (raised before anything trains).
        ArtifactError: a saved DCGAN or checkpoint in ``out`` is corrupt or was made with other settings.
    """
    cfg = effective(config or ProtectConfig())
    out = None if out is None else Path(out)
    query = _check(victim, data, cfg)
    ood = build_ood(
        cfg.ood,
        victim.input_shape,
        id_data=(data.x_train, data.y_train),
        directory=None if out is None else out / OOD_DIR,
        resume=resume,
        on_epoch=on_dcgan_epoch,
        device=device_of(victim),
    )
    ckpt = None if out is None else out / CHECKPOINTS_DIR
    if cfg.select is None:
        dnf, attempts = _train_accepted(victim, data, cfg, ood, cfg.train.seed, ckpt, resume, on_step)
        guard, temps = _guard(dnf, data, cfg)
        dnf.provenance = Provenance(tuple(attempts), cfg.min_ood_exit0, guard=guard, temperatures=temps)
    else:
        dnf = _select(victim, data, cfg, cfg.select, ood, ckpt, resume, on_step)
    if out is not None:
        dnf.save(out)  # a failing search never costs the trained model
    search = _search_config(cfg)
    if search is not None and search.goal is not None:
        _pareto(dnf, data, cfg, search, query, out)
    elif search is not None:
        result = search_thresholds(
            dnf.net, (data.x_val, data.y_val), config=search, query=query, dataset=data.dataset, out_dir=out
        )
        dnf.set_thresholds(result.best.thresholds)
        assert dnf.provenance is not None  # set by both training paths above
        dnf.provenance = replace(dnf.provenance, search=_summary(result))
        log.info(
            "threshold search: %s (surrogate %.4f, val acc %.4f) vs paper defaults %s (surrogate %.4f, val acc %.4f)",
            result.best.thresholds,
            result.best.surrogate,
            result.best.val_acc,
            result.baseline.thresholds,
            result.baseline.surrogate,
            result.baseline.val_acc,
        )
        if out is not None:
            dnf.save(out)
    return dnf
