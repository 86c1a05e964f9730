"""Run every seeded procedure at toy size and print ``{procedure: sha256 of what it produced}`` as JSON.

``test_determinism.py`` runs this file in fresh interpreters with different ``PYTHONHASHSEED`` and
compares the digests: the same seed must give the same weights, records and search trials in any
process. Usage: ``python tests/seeded_runs.py [--threads N] OUT_DIR [PROCEDURE ...]`` (default: all
procedures, one torch thread); each procedure's time goes to stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS
from fortress.bench.grid import AttackSpec, DefenseSpec, GridConfig, expand_grid
from fortress.bench.runner import run_cell
from fortress.config import VictimConfig
from fortress.data import mnist_splits, natural_patches
from fortress.defenses import DNF, AdaptiveMisinformation, DefenderData, MeCo
from fortress.defenses.adaptive_misinfo import MisinformationFitConfig
from fortress.defenses.dnf import (
    GeneratorOOD,
    MixtureOOD,
    NoiseOOD,
    ProbeConfig,
    ThresholdSearchConfig,
    extraction_probe,
    search_thresholds,
    train_dcgan,
)
from fortress.defenses.dnf.threshold_search import default_query_set
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.defenses.meco import MeCoTrainConfig
from fortress.models import create_model, train_classifier
from fortress.oracle import LocalOracle
from test_attack_contract import TINY

#: Keys whose values are measured times (they differ between runs by nature).
_TIMING = ("wall", "seconds", "_s", "time", "s_per_1k")


def _plain(obj: Any) -> Any:
    """``obj`` as JSON-able data: modules and tensors as their exact bytes, timings dropped."""
    if isinstance(obj, nn.Module):
        return {k: _plain(v) for k, v in sorted(obj.state_dict().items())}
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        return [str(t.dtype), list(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()]
    if isinstance(obj, np.ndarray):
        return _plain(torch.from_numpy(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not any(m in str(k) for m in _TIMING)}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return float.hex(obj)  # exact
    if obj is None or isinstance(obj, int | str | bool):
        return obj
    return repr(obj)


def digest(*objs: Any) -> str:
    return hashlib.sha256(json.dumps(_plain(list(objs)), sort_keys=True).encode()).hexdigest()


def _victim() -> nn.Module:
    data = mnist_splits()
    torch.manual_seed(0)
    victim = create_model("lenet5")
    train_classifier(victim, data.train.x[:256], data.train.targets[:256], epochs=1, batch_size=32, seed=0)
    return victim.eval()


@lru_cache(maxsize=1)
def _trained_dnf() -> tuple[DNF, Any]:
    """One DNF over :func:`_victim` for the procedures that only use it (built once per process)."""
    return _dnf(_victim())


def _dnf(victim: nn.Module) -> tuple[DNF, Any]:
    data = mnist_splits()
    gen, _ = train_dcgan(natural_patches(64, seed=1).x, epochs=1, batch_size=16, nz=8, ngf=4, seed=0)
    dnf = DNF(victim, seed=0)  # type: ignore[arg-type]
    cfg = DNFTrainConfig(epochs=1, batch_size=32, ood_batch_size=32)
    ood = MixtureOOD([GeneratorOOD(gen), NoiseOOD((1, 28, 28))])
    bundle = DefenderData(data.train.x[:128], data.train.targets[:128], data.val.x[:64], data.val.targets[:64], 10)
    report = dnf.fit(bundle, cfg, ood=ood)
    return dnf, report


def victim_training(out: Path) -> str:
    return digest(_victim())


def dcgan_training(out: Path) -> str:
    gen, report = train_dcgan(natural_patches(64, seed=1).x, epochs=1, batch_size=16, nz=8, ngf=4, seed=0)
    return digest(gen, report)


def dnf_training(out: Path) -> str:
    dnf, report = _dnf(_victim())
    return digest(dnf.net, report)


def threshold_search(out: Path) -> str:
    dnf, _ = _trained_dnf()
    val = mnist_splits().val
    cfg = ThresholdSearchConfig(n_trials=4, low=0.3, high=0.9, clone_epochs=1, clone_repeats=1, patches=60)
    res = search_thresholds(
        dnf.net, (val.x[:100], val.targets[:100]), config=cfg, query=default_query_set(cfg)[::6], out_dir=out
    )
    return digest(res.baseline, res.best, res.trials)


def extraction_probe_run(out: Path) -> str:
    dnf, _ = _trained_dnf()
    val = mnist_splits().val
    cfg = ProbeConfig(iterations=3, batch_size=32, student_steps=2, nz=8, ngf=4)
    return digest(extraction_probe(dnf, val.x[:100], val.targets[:100], cfg))


def baseline_defense_training(out: Path) -> str:
    data = mnist_splits()
    x, y = data.train.x[:64], data.train.targets[:64]
    meco = MeCo(_victim(), seed=0)  # type: ignore[arg-type]
    bundle = DefenderData(x, y, data.val.x[:64], data.val.targets[:64], 10)
    meco_report = meco.fit(bundle, MeCoTrainConfig(epochs=1, batch_size=32, ood_batch_size=32, dro_steps=1))
    am = AdaptiveMisinformation(_victim(), seed=0)  # type: ignore[arg-type]
    am_losses = am.fit(bundle, MisinformationFitConfig(epochs=1, batch_size=32))
    return digest(meco.model, meco.generator, meco_report, am.misinfo, am_losses, am.tau)


def _attack(name: str, settings: dict[str, Any], mode: str) -> Callable[[Path], str]:
    def run(out: Path) -> str:
        dnf, _ = _trained_dnf()
        splits = mnist_splits()
        pool = torch.cat([splits.attacker.x, splits.val.x])
        oracle = LocalOracle(dnf, budget=240, output_mode=mode)
        attack = ATTACKS.get(name)(oracle, budget=240, seed=3, **settings)
        torch.manual_seed(123)
        clone = create_model("lenet5-half")
        result = attack.run(clone, pool)
        return digest(result.clone, result.queries_used, result.extras, oracle.log.as_dict())

    return run


def grid_cell(out: Path) -> str:
    grid = GridConfig(
        name="determinism",
        victims=(VictimConfig(arch="lenet5-half", epochs=1),),
        defenses=(
            DefenseSpec(
                "dnf",
                params={
                    "train": {"epochs": 1},
                    "ood": {"kind": "dcgan+noise", "proxy_size": 64, "dcgan_epochs": 1, "dcgan_ngf": 4},
                    "max_attempts": 1,
                },
            ),
        ),
        attacks=(AttackSpec("knockoff", budgets=(100,), params={"epochs": 1, "query_batch_size": 50}),),
    )
    (cell,) = expand_grid(grid)
    return digest(run_cell(cell, out, threads=1))


PROCEDURES: dict[str, Callable[[Path], str]] = {
    "victim training": victim_training,
    "dcgan training": dcgan_training,
    "dnf training": dnf_training,
    "threshold search": threshold_search,
    "dnf extraction probe": extraction_probe_run,
    "meco + adaptive misinformation training": baseline_defense_training,
    **{f"attack {name}": _attack(name, *TINY[name]) for name in ATTACKS.names()},
    "attack knockoff (adaptive)": _attack("knockoff", {**TINY["knockoff"][0], "strategy": "adaptive"}, "soft"),
    "grid cell": grid_cell,
}


def main(argv: list[str]) -> None:
    threads = 1
    if argv[:1] == ["--threads"]:
        threads, argv = int(argv[1]), argv[2:]
    torch.set_num_threads(threads)
    out = Path(argv[0])
    names = argv[1:] or list(PROCEDURES)
    result = {}
    for i, name in enumerate(names):
        sub = out / f"p{i}"
        sub.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result[name] = PROCEDURES[name](sub)
        print(f"{name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
