"""Bridge to the Adversarial Robustness Toolbox (ART): any fortress Oracle as an ART black-box classifier.

ART (Nicolae et al., 2018) ships its own model-extraction attacks (``KnockoffNets``,
``CopycatCNN``, ``FunctionallyEquivalentExtraction``). :func:`as_art_classifier` exposes a fortress
:class:`~fortress.oracle.Oracle` as an ``art.estimators.classification.BlackBoxClassifier``, so those
attacks run unchanged against a DNF-protected (or any other defended) model while the oracle keeps
counting, capping and logging every query exactly as it does for fortress's own attacks.
:func:`run_art_extraction` runs one of ART's extraction attacks end to end and returns an
:class:`~fortress.attacks.base.AttackResult`, so its figures sit next to fortress's in the same records.

ART is an optional dependency: ``pip install "fortress[art]"``. Importing this module without it
raises :class:`~fortress.errors.ConfigError` naming the extra.

Example:
    >>> from fortress.defenses import Undefended
    >>> from fortress.models import create_model
    >>> from fortress.oracle import LocalOracle
    >>> oracle = LocalOracle(Undefended(create_model("lenet5")), budget=100)
    >>> art_victim = as_art_classifier(oracle)
    >>> art_victim.predict(np.random.rand(4, 1, 28, 28).astype(np.float32)).shape, oracle.budget_left
    ((4, 10), 96)
"""

from __future__ import annotations

import time
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from fortress.attacks.base import AttackResult, EvalSet
from fortress.errors import ConfigError
from fortress.oracle import Oracle, OutputMode

try:  # ART is an optional extra
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("the ART bridge needs the Adversarial Robustness Toolbox: pip install 'fortress[art]'") from exc

__all__ = ["ARTAttackName", "art_thief", "as_art_classifier", "run_art_extraction"]

#: ART extraction attacks :func:`run_art_extraction` drives.
ARTAttackName = Literal["knockoff", "copycat"]


def as_art_classifier(oracle: Oracle) -> BlackBoxClassifier:
    """Wrap ``oracle`` as an ART ``BlackBoxClassifier`` (inputs NCHW float in [0, 1], rows as the oracle answers).

    Every row ART predicts is one oracle query: the oracle's budget, output mode and query log apply
    unchanged, and a batch that would pass the budget raises
    :class:`~fortress.errors.BudgetExceeded` out of ART's ``predict`` with nothing charged.

    Shape:
        ART calls ``predict_fn`` with ``(B, C, H, W)`` arrays and gets ``(B, K)`` float32 rows.
    """

    def predict_fn(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return oracle.query(t).numpy().astype(np.float32)

    return BlackBoxClassifier(
        predict_fn,
        tuple(oracle.input_shape),
        oracle.num_classes,
        clip_values=(0.0, 1.0),
    )


def art_thief(clone: nn.Module, input_shape: tuple[int, int, int], num_classes: int, *, lr: float = 1e-3) -> Any:
    """Wrap ``clone`` as the ART ``PyTorchClassifier`` an ART extraction attack trains (Adam, cross-entropy, CPU).

    ART reduces probability targets to their argmax before its cross-entropy, so a thief trained through
    ART learns from top-1 labels even when the victim answers with probabilities.
    """
    return PyTorchClassifier(
        model=clone,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(clone.parameters(), lr=lr),
        input_shape=tuple(input_shape),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def run_art_extraction(
    oracle: Oracle,
    clone: nn.Module,
    pool: Tensor,
    *,
    attack: ARTAttackName = "knockoff",
    budget: int,
    seed: int = 0,
    epochs: int = 10,
    batch_size_fit: int = 64,
    batch_size_query: int = 64,
    use_probability: bool | None = None,
    lr: float = 1e-3,
    eval_set: EvalSet | None = None,
) -> AttackResult:
    """Run ART's ``KnockoffNets`` (random sampling) or ``CopycatCNN`` through ``oracle`` and train ``clone``.

    Args:
        oracle: the victim as the attacker sees it (its budget caps what ART may spend).
        clone: the thief network (trained in place), taking [0, 1] images of the oracle's shape.
        pool: attacker images ``(N, C, H, W)`` in [0, 1]; ART samples ``min(budget, N)`` of them.
        attack: ``"knockoff"`` (ART ``KnockoffNets``, random strategy) or ``"copycat"`` (ART ``CopycatCNN``).
        budget: queries ART may spend (ART's ``nb_stolen``).
        seed: seeds numpy's and torch's global generators, which ART draws from.
        epochs: ART's ``nb_epochs``.
        batch_size_fit: ART's training batch size.
        batch_size_query: rows per oracle call.
        use_probability: pass probability rows to ART (default: ``True`` for a soft oracle).
        lr: Adam learning rate of the thief.
        eval_set: scored after training (never charged).

    Returns:
        An :class:`AttackResult` with the queries the oracle charged and ``extras["art_attack"]``.

    Raises:
        ConfigError: unknown ``attack``, a non-positive ``budget`` or a pool of the wrong shape.
    """
    if attack not in get_args(ARTAttackName):
        raise ConfigError(f"attack must be one of {', '.join(get_args(ARTAttackName))}, got {attack!r}")
    if budget < 1:
        raise ConfigError(f"budget must be a positive number of queries, got {budget}")
    shape = tuple(oracle.input_shape)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != shape or pool.shape[0] == 0:
        raise ConfigError(
            f"pool must be a non-empty (N, C, H, W) batch with (C, H, W) = {shape}, got {tuple(pool.shape)}"
        )
    if use_probability is None:
        use_probability = oracle.output_mode is OutputMode.SOFT
    np.random.seed(seed)
    torch.manual_seed(seed)
    start = oracle.queries_used
    t0 = time.perf_counter()
    victim = as_art_classifier(oracle)
    thief = art_thief(clone, shape, oracle.num_classes, lr=lr)  # type: ignore[arg-type]
    n = int(min(budget, pool.shape[0]))
    kw: dict[str, Any] = {
        "batch_size_fit": batch_size_fit,
        "batch_size_query": batch_size_query,
        "nb_epochs": epochs,
        "nb_stolen": n,
        "use_probability": use_probability,
    }
    x = pool.numpy().astype(np.float32)
    if attack == "knockoff":
        KnockoffNets(victim, sampling_strategy="random", **kw).extract(x, thieved_classifier=thief)
    else:
        # CopycatCNN queries every image it is given, so hand it exactly the sample it may afford
        idx = np.random.choice(x.shape[0], n, replace=False)
        CopycatCNN(victim, **kw).extract(x[idx], thieved_classifier=thief)
    clone.eval()
    acc: float | None = None
    fid: float | None = None
    if eval_set is not None:
        acc, fid = eval_set.score(clone)
    return AttackResult(
        clone=clone,
        queries_used=oracle.queries_used - start,
        wall_s=time.perf_counter() - t0,
        clone_acc=acc,
        clone_fidelity=fid,
        extras={"art_attack": attack, "use_probability": use_probability, "transfer_set_size": n},
    )
