"""Tests of the victim recipes end to end: ``benchmarks/victim_recipes.py`` on IDX files.

The default tests run the benchmark script on a tiny IDX data set they write; the ``slow`` tests
train LeNet-5 and ResNet-14-S on the real Fashion-MNIST (skipped where it is not installed) and
check the accuracy targets on its 10,000 test images.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fortress.models import create_model, evaluate_accuracy, train_classifier
from fortress.models.recipes import recipe_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "victim_recipes.py"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28×28 uint8 images of 10 mirror-invariant classes: a bar at one of 5 heights, thin or thick."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(y):
        row = 3 + 5 * (c % 5)
        x[i, row : row + 1 + 2 * (c // 5), 4:24] = 255
    return x.astype(np.uint8), y.astype(np.uint8)


def write_idx(root: Path, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write gzipped MNIST-format IDX files ``{prefix}-images-idx3-ubyte.gz`` and the labels."""
    for kind, arr, magic in (("images-idx3", x, 0x803), ("labels-idx1", y, 0x801)):
        data = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
        with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
            fh.write(data)


def run_script(*args: str, timeout: float) -> list[dict[str, Any]]:
    """Run the benchmark script; return its JSON records."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_script_trains_measures_and_reports(tmp_path: Path) -> None:
    write_idx(tmp_path, "train", *bars(400, seed=0))
    write_idx(tmp_path, "t10k", *bars(100, seed=1))
    out = tmp_path / "results.jsonl"
    records = run_script(
        "--data-dir", str(tmp_path), "--val", "100", "--epochs", "4", "--batch-size", "32", "--threads", "1",
        "--stages", "--repeats", "2", "--out", str(out), timeout=300,
    )  # fmt: skip
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    stages = {r["arch"]: r for r in records if r["kind"] == "stages"}
    trains = {r["arch"]: r for r in records if r["kind"] == "train"}
    assert sorted(stages) == sorted(trains) == ["lenet5", "resnet14-s"]
    for rec in stages.values():
        assert sum(rec["stage_flops"]) + rec["classifier_flops"] == rec["flops_per_image"]
        assert rec["cum_flop_share"][-1] + rec["classifier_flops"] / rec["flops_per_image"] == pytest.approx(
            1.0, abs=1e-3
        )
        assert all(a <= b for a, b in zip(rec["cum_cpu_share"], rec["cum_cpu_share"][1:], strict=False))
    assert stages["resnet14-s"]["cum_flop_share"][1] < 0.3  # exits 0/1 run under 30 % of the FLOPs
    assert stages["lenet5"]["stage_shapes"] == [[6, 14, 14], [16, 5, 5], [120, 1, 1]]
    for arch, rec in trains.items():
        assert rec["recipe"] == {**recipe_for(arch, "fashion-mnist").as_kwargs(), "epochs": 4, "batch_size": 32}
        assert (rec["n_train"], rec["n_val"]) == (300, 100)
        assert len(rec["val_acc"]) == len(rec["epoch_s"]) == len(rec["epoch_cpu_s"]) == 4
        assert 0.0 <= rec["test_acc"] <= 1.0
    assert trains["resnet14-s"]["test_acc"] > 0.5  # ten bar classes are easy to tell apart


def test_residual_recipe_learns_tiny_mirror_invariant_classes() -> None:
    x8, y8 = bars(400, seed=2)
    x = torch.from_numpy(x8).float().div(255).unsqueeze(1)
    y = torch.from_numpy(y8).long()
    torch.manual_seed(0)
    model = create_model("resnet14-s")
    recipe = recipe_for("resnet14-s", "fashion-mnist")
    kwargs = {**recipe.as_kwargs(), "epochs": 6, "batch_size": 32}
    train_classifier(model, x[:240], y[:240], seed=0, **kwargs)
    assert evaluate_accuracy(model, x[240:], y[240:]) > 0.9


# --------------------------------------------------------------------------------------------------
# The real Fashion-MNIST (slow)

needs_fashion = pytest.mark.skipif(
    not all((FASHION_DIR / f).is_file() for f in FASHION_FILES),
    reason=f"Fashion-MNIST is not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize(("arch", "target"), [("lenet5", 0.89), ("resnet14-s", 0.92)])
def test_victim_reaches_its_target_on_fashion_mnist(arch: str, target: float) -> None:
    (record,) = run_script("--arch", arch, "--threads", "2", timeout=3600)
    assert record["n_train"] == 55_000 and record["n_val"] == 5_000
    assert record["test_acc"] >= target, record
