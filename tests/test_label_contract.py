"""One label contract at every public entry point that takes labels (``fortress.tensors.check_labels``).

Integer class indices, one per image, in ``[0, K)``: ``(N, 1)`` columns and every integer dtype give
exactly the value ``(N,)`` int64 labels give (never an ``N × N`` broadcast); floats, bools, one-hot
rows, a wrong count and labels out of range are refused with an ``InvalidInput`` that names them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from fortress.attacks import EvalSet
from fortress.bench.pipeline import defended_accuracy
from fortress.data import ImageSet, load_npz, mnist_splits
from fortress.defenses import DNF, AdaptiveMisinformation, DefenderData, MeCo, Undefended
from fortress.defenses.adaptive_misinfo import MisinformationFitConfig
from fortress.defenses.dnf import NoiseOOD, ThresholdSearchConfig, guard_utility, search_thresholds
from fortress.defenses.dnf.threshold_search import default_query_set
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.defenses.meco import MeCoTrainConfig
from fortress.errors import ArtifactError, InvalidInput
from fortress.models import create_model, evaluate_accuracy, predict_logits, train_classifier
from fortress.models.staged import StagedBackbone

N, K = 40, 10
DIGITS = tuple(str(i) for i in range(K))


@lru_cache(maxsize=1)
def _data() -> tuple[Tensor, Tensor]:
    val = mnist_splits().val
    return val.x[:N], val.targets[:N]


@lru_cache(maxsize=1)
def _victim() -> StagedBackbone:
    torch.manual_seed(0)
    victim = create_model("lenet5")
    train_classifier(victim, mnist_splits().train.x[:400], mnist_splits().train.targets[:400], epochs=1, seed=0)
    return victim.eval()


def _fresh_lenet() -> StagedBackbone:
    torch.manual_seed(1)
    return create_model("lenet5")


def _dnf() -> DNF:
    return DNF(_victim(), seed=0)


_DNF_CFG = DNFTrainConfig(epochs=1, batch_size=20, ood_batch_size=20)
_MECO_CFG = MeCoTrainConfig(epochs=1, batch_size=20, ood_batch_size=20, dro_steps=1)
_SEARCH_CFG = ThresholdSearchConfig(n_trials=3, clone_epochs=1, clone_repeats=1, patches=60)


def _bundle(y: Tensor | None = None, *, y_val: Tensor | None = None) -> DefenderData:
    """The defender's data with ``y`` as training labels (or ``y_val`` as validation labels)."""
    x, good = _data()
    return DefenderData(x, good if y is None else y, x, good if y_val is None else y_val, K)


def _losses(report: Any) -> list[float]:
    """The per-epoch losses of a training report (what identical labels must reproduce exactly)."""
    return list(report.train_loss if hasattr(report, "train_loss") else report.loss)


def _npz(y: Tensor, tmp: Path) -> list[int]:
    x, _ = _data()
    path = tmp / "set.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    loaded = load_npz(path).y
    assert loaded is not None
    return loaded.tolist()


# entry point -> (call with labels y, returning a comparable value; the error class it refuses with)
ENTRY_POINTS: dict[str, tuple[Callable[[Tensor, Path], object], type[Exception]]] = {
    "ImageSet": (lambda y, _: ImageSet(_data()[0], y, DIGITS).targets.tolist(), InvalidInput),
    "EvalSet.score accuracy": (lambda y, _: EvalSet(_data()[0], y).score(_victim()), InvalidInput),
    "EvalSet.score fidelity": (
        lambda y, _: EvalSet(_data()[0], _data()[1], victim_labels=y).score(_victim()),
        InvalidInput,
    ),
    "evaluate_accuracy": (lambda y, _: evaluate_accuracy(_victim(), _data()[0], y), InvalidInput),
    "train_classifier": (
        lambda y, _: _losses(train_classifier(_fresh_lenet(), _data()[0], y, epochs=1, batch_size=20)),
        InvalidInput,
    ),
    "train_classifier val": (
        lambda y, _: train_classifier(_fresh_lenet(), *_data(), epochs=1, val=(_data()[0], y)).val_acc,
        InvalidInput,
    ),
    "DNF.fit": (lambda y, _: _losses(_dnf().fit(_bundle(y), _DNF_CFG, ood=NoiseOOD((1, 28, 28)))), InvalidInput),
    "DNF.fit val": (
        lambda y, _: _dnf().fit(_bundle(y_val=y), _DNF_CFG, ood=NoiseOOD((1, 28, 28))).val_acc,
        InvalidInput,
    ),
    "guard_utility": (lambda y, _: guard_utility(_dnf(), _data()[0], y).after, InvalidInput),
    "search_thresholds": (
        lambda y, _: (
            search_thresholds(
                _dnf().net, (_data()[0], y), config=_SEARCH_CFG, query=default_query_set(_SEARCH_CFG)[::6]
            ).baseline.val_acc
        ),
        InvalidInput,
    ),
    "MeCo.fit": (lambda y, _: _losses(MeCo(_victim(), seed=0).fit(_bundle(y), _MECO_CFG)), InvalidInput),
    "MeCo.fit val": (
        lambda y, _: MeCo(_victim(), seed=0).fit(_bundle(y_val=y), _MECO_CFG).val_acc,
        InvalidInput,
    ),
    "AdaptiveMisinformation.fit": (
        lambda y, _: _losses(
            AdaptiveMisinformation(_victim(), seed=0).fit(_bundle(y), MisinformationFitConfig(epochs=1, batch_size=20))
        ),
        InvalidInput,
    ),
    "defended_accuracy": (
        lambda y, _: defended_accuracy(Undefended(_victim()), ImageSet(_data()[0], y))[0],
        InvalidInput,
    ),
    "load_npz": (_npz, ArtifactError),  # a file's labels: refused as a bad artifact
}
#: Entry points that do not know the class count K (only non-negativity is checked there).
_NO_K = {"load_npz"}

#: Slow entry points (a training run or a search per variant) check fewer accepted variants.
_SLOW = {"search_thresholds": ("(N, 1) int64",), **dict.fromkeys(("MeCo.fit", "DNF.fit"), ("(N, 1) int64", "int32"))}
_EXPECTED: dict[str, object] = {}

ACCEPTED: dict[str, Callable[[Tensor], Tensor]] = {
    "(N, 1) int64": lambda y: y.view(-1, 1),
    "int32": lambda y: y.to(torch.int32),
    "uint8": lambda y: y.to(torch.uint8),
    "(N, 1) int16": lambda y: y.to(torch.int16).view(-1, 1),
}

REFUSED: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "float": (lambda y: y.float(), "integer dtype"),
    "bool": (lambda y: y % 2 == 1, "integer dtype"),
    "one-hot (N, K)": (lambda y: torch.nn.functional.one_hot(y, K), r"shape \(N,\)"),
    "out of range": (lambda y: torch.cat([y[:-1], torch.tensor([K])]), r"expected class indices in \[0, 9\]"),
    "negative": (lambda y: torch.cat([y[:-1], torch.tensor([-1])]), "expected class indices"),
    "wrong count": (lambda y: y[:-1], f"{N - 1} entries for {N} images"),
}


def _accepted_cases() -> list[Any]:
    cases = []
    for ep in ENTRY_POINTS:
        for name in ACCEPTED:
            if name not in _SLOW.get(ep, ACCEPTED):
                continue
            cases.append(pytest.param(ep, name, id=f"{ep}-{name}"))
    return cases


@pytest.mark.parametrize(("entry", "variant"), _accepted_cases())
def test_integer_labels_of_any_width_and_columns_give_the_same_value(entry: str, variant: str, tmp_path: Path) -> None:
    call, _ = ENTRY_POINTS[entry]
    y = _data()[1]
    if entry not in _EXPECTED:  # the value with (N,) int64 labels, computed once per entry point
        _EXPECTED[entry] = call(y, tmp_path)
    expected = _EXPECTED[entry]
    got = call(ACCEPTED[variant](y), tmp_path)
    assert got == expected, f"{entry} with {variant} labels gives {got}, with (N,) int64 labels {expected}"


@pytest.mark.parametrize(
    ("entry", "variant"),
    [
        pytest.param(ep, name, id=f"{ep}-{name}")
        for ep in ENTRY_POINTS
        for name in REFUSED
        if not (ep in _NO_K and name == "out of range")
    ],
)
def test_labels_outside_the_contract_are_refused_and_named(entry: str, variant: str, tmp_path: Path) -> None:
    call, error = ENTRY_POINTS[entry]
    make, fragment = REFUSED[variant]
    with pytest.raises(error, match=fragment):
        call(make(_data()[1]), tmp_path)


def test_a_perfect_clone_scores_one_with_column_labels() -> None:
    """``EvalSet(x, y.view(-1, 1)).score(clone)`` once reported 0.100 for a clone right on every image."""
    x, _ = _data()
    victim = _victim()
    y = predict_logits(victim, x).argmax(1)
    acc, fid = EvalSet(x, y.view(-1, 1), victim_labels=y.view(-1, 1)).score(victim)
    assert (acc, fid) == (1.0, 1.0)
