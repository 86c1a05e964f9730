"""The library calls behind the CLI verbs: train a victim, protect it with DNF, attack a defense.

Each function does one job and returns what it made; the CLI only parses arguments, shows
progress and prints. Data are named by a :class:`~fortress.data.spec.DataSpec` (default: the
embedded MNIST digits); a model trained here remembers its spec (``model.data_card``, saved in
``model.json``), so the steps after training find the data without being told (:func:`data_for`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fortress.attacks import ATTACKS, EvalSet, ProgressFn
from fortress.attacks.base import PoolKind
from fortress.bench.records import ResultRecord
from fortress.config import AttackConfig, ProtectConfig, VictimConfig, to_dict
from fortress.data.base import ImageSet
from fortress.data.defaults import PoolRole, default_pool, load_pool
from fortress.data.resolve import ResolvedData, resolve_data
from fortress.data.spec import DataSpec
from fortress.defenses.base import Defense
from fortress.defenses.dnf import DNF, StepInfo
from fortress.defenses.dnf.recipe import protect as protect_recipe
from fortress.defenses.trainable import DefenderData
from fortress.device import device_facts, resolve_device
from fortress.errors import ConfigError, InvalidInput
from fortress.models import (
    StagedBackbone,
    Staging,
    build_model,
    create_model,
    evaluate_accuracy,
    load_state,
    predict_logits,
    save_model,
    train_classifier,
)
from fortress.models.recipes import check_flips
from fortress.oracle import HttpOracle, LocalOracle, Oracle
from fortress.reproducibility import runtime_facts
from fortress.tensors import check_labels

__all__ = [
    "attack_pool",
    "data_for",
    "defended_accuracy",
    "defender_data",
    "id_data",
    "import_model",
    "protect",
    "resolve_target",
    "run_attack",
    "train_victim",
]

log = logging.getLogger(__name__)


def id_data(data: DataSpec | str | None = None) -> ResolvedData:
    """The defender's and attacker's splits of ``data`` (a spec, ``NAME[:PATH]`` text, ``None``: the embedded digits).

    Raises:
        UnknownComponent, ConfigError, ArtifactError: as :func:`fortress.data.resolve.resolve_data`.
    """
    spec = DataSpec.parse(data) if isinstance(data, str) else data
    return resolve_data(spec)


def data_for(victim: StagedBackbone, data: DataSpec | None = None) -> ResolvedData:
    """The data to use with ``victim``: ``data`` if given, else the spec the victim remembers, else the default.

    Resolved and checked against the victim before anything trains or queries. Data whose content
    hash differs from the one the victim was trained on are used, with a warning.

    Raises:
        InvalidInput: the images' shape or the class count do not fit the victim.
        UnknownComponent, ConfigError, ArtifactError: as :func:`fortress.data.resolve.resolve_data`.
    """
    card = victim.data_card
    spec = data if data is not None else (card.spec if card is not None else DataSpec())
    resolved = resolve_data(spec)
    if resolved.image_shape != victim.input_shape or resolved.num_classes != victim.num_classes:
        raise InvalidInput(
            f"data {spec.text()!r} have images {resolved.image_shape} in {resolved.num_classes} classes; the "
            f"{victim.arch} victim takes {victim.input_shape} in {victim.num_classes} classes"
        )
    if card is not None and card.sha256 != resolved.sha256:
        log.warning(
            "data %r (sha256 %s) are not the data the victim was trained on (%r, sha256 %s)",
            spec.text(),
            resolved.sha256[:12],
            card.spec.text(),
            card.sha256[:12],
        )
    return resolved


def train_victim(
    cfg: VictimConfig,
    out: Path | None = None,
    *,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> tuple[StagedBackbone, float]:
    """Train a victim on the ID training split of ``cfg.data``; save it to ``out`` if given.

    The model trains on ``device`` (with bf16 autocast when ``amp`` and the device is a GPU) and is
    returned there. The training options are the config's :meth:`~fortress.config.VictimConfig.train_recipe`.

    The data are resolved and the architecture built before training starts, and nothing is written
    before training ends, so a bad spec or architecture leaves ``out`` as it was. The saved model
    remembers its data (``model.data_card``).

    Returns:
        The model (eval mode) and its ID-test accuracy.

    Raises:
        ConfigError: flips are asked for on a digits data set (checked first).
        UnknownComponent, ConfigError, ArtifactError: as :func:`fortress.data.resolve.resolve_data`.
    """
    check_flips(cfg.dataset, cfg.hflip)
    dev = resolve_device(device)
    data = id_data(cfg.spec)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.arch, cfg.arch_params, input_shape=data.image_shape, num_classes=data.num_classes, staging=cfg.staging
    ).to(dev)
    options: dict[str, Any] = cfg.train_recipe().as_kwargs()
    train_classifier(
        model,
        data.train.x,
        data.train.targets,
        seed=cfg.seed,
        on_epoch=on_epoch,
        amp=amp,
        **options,
    )
    acc = evaluate_accuracy(model, data.test.x, data.test.targets)
    model.data_card = data.card()
    if out is not None:
        extra = {"test_acc": acc, "config": to_dict(cfg)}
        if dev.type != "cpu" or amp:  # CPU runs keep their model.json as before
            extra.update(device_facts(dev, amp=amp))
        save_model(model, out, extra=extra)
    return model, acc


def import_model(
    arch: str,
    weights: Path,
    *,
    params: dict[str, Any] | None = None,
    staging: Staging | None = None,
    data: DataSpec | None = None,
    out: Path | None = None,
) -> tuple[StagedBackbone, float]:
    """Bring a user's trained network into fortress: build ``arch``, copy in ``weights``, measure, save to ``out``.

    The data are resolved, the network built and the weights checked against it before anything is
    written; the saved model remembers its factory, arguments, staging and data, so ``protect``,
    ``defend``, ``attack`` and ``serve`` take it like a victim trained here.

    Args:
        arch: a factory path ``package.module:function``, an entry point of ``fortress.models`` or a
            registry name (:func:`fortress.models.build_model`).
        weights: a safetensors file of the network's state dict (the user's own tensor names).
        params: the factory's keyword arguments (JSON values).
        staging: module names staging a factory's plain network.
        data: the data it was trained on (``None``: the embedded MNIST digits).
        out: where to save it (``None``: not saved).

    Returns:
        The model (eval mode) and its ID-test accuracy.

    Raises:
        ArtifactError: the weights file is missing or corrupt, or does not fit the network (named).
        ModelFactoryError, UnknownComponent: the architecture cannot be built (see ``build_model``).
    """
    resolved = id_data(data)
    state = load_state(weights)
    model = build_model(
        arch,
        params,
        input_shape=resolved.image_shape,
        num_classes=resolved.num_classes,
        staging=staging,
        weights=state,
        weights_source=Path(weights),
    ).eval()
    acc = evaluate_accuracy(model, resolved.test.x, resolved.test.targets)
    model.data_card = resolved.card()
    if out is not None:
        save_model(model, out, extra={"test_acc": acc, "imported_from": str(weights)})
    return model, acc


def defender_data(data: ResolvedData) -> DefenderData:
    """The defender's data as the bundle every ``fit`` takes (training and validation splits)."""
    return DefenderData.from_splits(data.train, data.val, num_classes=data.num_classes, dataset=data.name)


def protect(
    victim: StagedBackbone,
    cfg: ProtectConfig,
    *,
    data: DataSpec | None = None,
    out: Path | None = None,
    resume: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    on_dcgan_epoch: Callable[[int, float, float], None] | None = None,
) -> DNF:
    """Protect ``victim`` with the DNF recipe (:func:`fortress.defenses.dnf.recipe.protect`) on its data.

    ``data`` defaults to the spec the victim remembers (:func:`data_for`). Saves to ``out``
    (checkpoints in ``out/checkpoints``, so an interrupted run resumes) and, after a threshold
    search, plots its trials to ``out/threshold_search.png``.
    """
    dnf = protect_recipe(
        victim,
        defender_data(data_for(victim, data)),
        cfg,
        out=out,
        resume=resume,
        on_step=on_step,
        on_dcgan_epoch=on_dcgan_epoch,
    )
    search = None if dnf.provenance is None else dnf.provenance.search
    if out is not None and search is not None and search.trials_file is not None:
        from fortress.bench.threshold_plot import plot_pareto, plot_threshold_search

        plot = plot_threshold_search if search.goal is None else plot_pareto
        plot(Path(out) / search.trials_file)
    return dnf


@torch.no_grad()
def defended_accuracy(defense: Defense, data: ImageSet) -> tuple[float, list[float]]:
    """Accuracy of the defense's answers on labelled ``data`` and its exit histogram (empty without exits).

    Called directly on the defense, so it never spends an oracle's budget.
    """
    y = check_labels(data.targets, len(data), defense.num_classes, name=f"{data.name} labels")
    out = defense.respond(data.x.to(defense.device)).to(data.x.device)
    acc = float((out.probs.argmax(1) == y).float().mean())
    hist: list[float] = []
    if out.exits is not None and defense.num_exits:
        counts = torch.bincount(out.exits, minlength=defense.num_exits).float()
        hist = (counts / counts.sum()).tolist()
    return acc, hist


def resolve_target(
    target: Defense | Oracle | str,
    cfg: AttackConfig,
    *,
    reference: Defense | None = None,
    api_key: str | None = None,
    api_budget: int | None = None,
) -> tuple[Oracle, Defense]:
    """The oracle an attack queries and the defense its result is evaluated against (off-budget).

    Args:
        target: a defense (wrapped in a :class:`~fortress.oracle.LocalOracle`), a ready oracle, or
            the URL of a ``fortress serve`` server (an :class:`~fortress.oracle.HttpOracle`).
        cfg: the attack's config (its budget and output mode).
        reference: the defense the evaluation runs on; needed for an HTTP target (a local copy of
            what the server serves), defaults to the defense of a defense or local-oracle target.
        api_key: the server key (URL targets only).
        api_budget: the oracle's own quota when this function builds it (default: ``cfg.budget``).

    Raises:
        ConfigError: a URL without key or reference, or an ``api_budget`` for a ready oracle.
    """
    quota = cfg.budget if api_budget is None else api_budget
    if isinstance(target, Defense):
        return LocalOracle(target, budget=quota, output_mode=cfg.output_mode), reference or target
    if isinstance(target, Oracle):
        if api_budget is not None:
            raise ConfigError("api_budget applies only to an oracle run_attack builds; set the budget on your oracle")
        ref = reference if reference is not None else getattr(target, "defense", None)
        if not isinstance(ref, Defense):
            raise ConfigError("a remote oracle needs reference= the served defense, for off-budget evaluation")
        return target, ref
    if not str(target).startswith(("http://", "https://")):
        raise ConfigError(f"target must be a Defense, an Oracle or an http(s):// URL, got {target!r}")
    if not api_key:
        raise ConfigError(f"attacking {target} needs an API key (the server's `fortress keys add` prints one)")
    if reference is None:
        raise ConfigError(
            f"attacking {target} needs a reference copy of the served defense (a local directory) to evaluate "
            "the clone and the victim off-budget"
        )
    oracle = HttpOracle(str(target), api_key, budget=quota)
    if oracle.output_mode.value != cfg.output_mode:
        log.warning("the server answers this key in %r mode, not %r", oracle.output_mode.value, cfg.output_mode)
    return oracle, reference


def run_attack(
    target: Defense | Oracle | str,
    cfg: AttackConfig,
    *,
    reference: Defense | None = None,
    api_key: str | None = None,
    data: DataSpec | None = None,
    eval_every: int | None = None,
    progress: ProgressFn | None = None,
    extra_config: dict[str, Any] | None = None,
    api_budget: int | None = None,
    device: torch.device | str | None = None,
    attack_args: dict[str, Any] | None = None,
) -> ResultRecord:
    """Run one attack against ``target`` at ``cfg.budget`` and return its result record.

    ``target`` is a defense, a ready oracle or a server URL (see :func:`resolve_target`; a server
    needs ``api_key`` and ``reference``). ``api_budget`` is the oracle's own quota (default: the
    attack budget); when it is smaller, the oracle refuses the batch that would pass it and
    :class:`~fortress.errors.BudgetExceeded` propagates — no record is produced for an unfinished
    attack.

    The data (``data``, default: the spec the victim remembers, :func:`data_for`) give the
    evaluation set (ID test) and the attacker's ID split; the pool (``cfg.pool``, default: the data
    defaults for the attack's kind of pool, :func:`attack_pool`) is loaded and checked against the
    victim's input shape before the first query. The evaluation and the victim's own labels for
    fidelity are computed directly on the reference models, off-budget; the attack sees only the oracle.
    The record's ``extra`` holds :func:`~fortress.reproducibility.runtime_facts` (torch threads and
    version, ...) and :func:`~fortress.device.device_facts` (``device``, ``device_name``): what the
    figures depend on besides the seeds.

    ``device`` is where the clone (and the attack's own networks) train and where a local defense
    answers (it is moved there); ``None``: where the defense already is (the CPU for a loaded one).
    """
    dev = None if device is None else resolve_device(device)
    attack_cls = ATTACKS.get(cfg.name)
    oracle, defense = resolve_target(target, cfg, reference=reference, api_key=api_key, api_budget=api_budget)
    if dev is not None:
        defense.to(dev)
        if isinstance(oracle, LocalOracle):
            oracle.defense.to(dev)
    dev = defense.device if dev is None else dev
    victim = defense.victim
    resolved = data_for(victim, data)
    pool_name = attack_pool(cfg, resolved, victim.input_shape)
    pool = None if pool_name is None else load_pool(pool_name, victim.input_shape, resolved).x
    victim_labels = predict_logits(victim, resolved.test.x).argmax(1)
    victim_acc = float((victim_labels == resolved.test.targets).float().mean())
    defended_acc, hist_id = defended_accuracy(defense, resolved.test)
    eval_set = EvalSet(resolved.test.x, resolved.test.targets, victim_labels)
    attack = attack_cls(oracle, budget=cfg.budget, seed=cfg.seed, **cfg.params, **(attack_args or {}))
    torch.manual_seed(cfg.seed)
    c, h, _ = victim.input_shape
    clone = create_model(cfg.clone, num_classes=victim.num_classes, in_channels=c, image_size=h).to(dev)
    t0 = time.perf_counter()
    result = attack.run(clone, pool, eval_set=eval_set, eval_every=eval_every, progress=progress)
    wall = time.perf_counter() - t0
    qlog = oracle.log
    return ResultRecord(
        defense=defense.name,
        attack=cfg.name,
        dataset=resolved.name,
        victim_arch=victim.arch,
        clone_arch=cfg.clone,
        budget=cfg.budget,
        queries_used=result.queries_used,
        seed=cfg.seed,
        victim_acc=victim_acc,
        defended_acc=defended_acc,
        clone_acc=result.clone_acc,
        clone_fidelity=result.clone_fidelity,
        exit_hist_id=hist_id,
        exit_hist_attack=qlog.exit_hist,
        mean_l1_perturbation=qlog.mean_l1,
        defense_s_per_1k_queries=qlog.s_per_1k,
        wall_s=wall,
        config={
            "attack": to_dict(cfg),
            "attack_hparams": attack.hparams(),
            "defense": defense.hparams(),
            "pool": pool_name,
            "device": str(dev),
            **(extra_config or {}),
        },
        clone_acc_best=result.best_clone_acc,
        checkpoints=[
            {
                "queries": c.queries,
                "clone_acc": c.clone_acc,
                "clone_fidelity": c.clone_fidelity,
                "wall_s": c.wall_s,
            }
            for c in result.checkpoints
        ],
        extra={
            "oracle_log": qlog.as_dict(),
            "attack_extras": _jsonable(result.extras),
            **runtime_facts(),
            **device_facts(dev),
        },
        data=resolved.describe(),
    )


#: The data defaults' pool role for each kind of pool an attack declares.
_POOL_ROLES: dict[PoolKind, PoolRole] = {PoolKind.ID_SEEDS: "id_seeds", PoolKind.NATURAL: "natural"}


def attack_pool(cfg: AttackConfig, data: ResolvedData, image_shape: tuple[int, int, int]) -> str | None:
    """The pool an attack queries: ``cfg.pool``, else the data defaults' pool for the attack's kind of pool.

    An attack that declares no default pool (``default_pool = None``: data-free attacks, and
    attacks whose pool is optional) gets none. Otherwise its :attr:`~fortress.attacks.Attack.pool_kind`
    picks the role and :func:`fortress.data.defaults.default_pool` the set for the victim's data:
    the attacker's ID split (``mnist-attacker`` on the embedded digits) for ID seeds, photo crops
    (``patches``) for natural images.
    """
    if cfg.pool is not None:
        return cfg.pool
    attack_cls = ATTACKS.get(cfg.name)
    role = _POOL_ROLES.get(attack_cls.pool_kind)
    if attack_cls.default_pool is None or role is None:
        return None
    return default_pool(role, data.name, image_shape)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    return str(obj)
