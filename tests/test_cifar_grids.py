"""The paper's CIFAR grids run end to end, shrunk to seconds, on tiny CIFAR-format pickles.

The test writes the official "python version" layout (``cifar-10-batches-py/`` with ``batches.meta``,
``data_batch_1`` .. ``data_batch_5``, ``test_batch``; ``cifar-100-python/`` with ``meta``, ``train``,
``test``) with a few hundred random images, loads ``benchmarks/cifar10-paper.toml`` and
``benchmarks/cifar100-paper.toml``, keeps every defense and attack of the grid but shrinks what costs
time (one seed, tiny budgets and epochs, small models in place of ResNet-34-8x and the paper's
clones), runs the grid and writes its report.
"""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fortress.bench.grid import load_grid
from fortress.bench.report import make_report
from fortress.bench.runner import run_grid
from fortress.config import from_dict
from fortress.data.spec import DataSpec
from fortress.errors import ArtifactError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _batch(n: int, classes: int, rng: np.random.Generator, label_keys: dict[str, int]) -> dict[bytes, Any]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = np.arange(n) % classes
    out: dict[bytes, Any] = {b"data": data}
    for key, k in label_keys.items():
        out[key.encode()] = [int(v) % k for v in labels]
    return out


def _dump(path: Path, obj: Any) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the official files are protocol-2 pickles with bytes keys


def write_cifar10(root: Path, per_batch: int = 24, test: int = 40) -> Path:
    """A tiny CIFAR-10 in the official layout under ``root``; returns ``root``."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _dump(d / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", _batch(per_batch, 10, rng, {"labels": 10}))
    _dump(d / "test_batch", _batch(test, 10, rng, {"labels": 10}))
    return root


def write_cifar100(root: Path, train: int = 400, test: int = 200) -> Path:
    """A tiny CIFAR-100 in the official layout under ``root``; returns ``root``."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}
    names[b"coarse_label_names"] = [f"c{i}".encode() for i in range(20)]
    _dump(d / "meta", names)
    _dump(d / "train", _batch(train, 100, rng, {"fine_labels": 100, "coarse_labels": 20}))
    _dump(d / "test", _batch(test, 100, rng, {"fine_labels": 100, "coarse_labels": 20}))
    return root


#: Small stand-ins for ResNet-34-8x and the paper's three clones (each a distinct architecture, so
#: the grid keeps one cell per clone).
_CLONES = {"resnet18-8x": "lenet5-half", "mobilenetv2": "lenet5", "densenet121": "lenet5"}
_TINY_ATTACKS = {
    "dfme": ({"batch_size": 4, "ngf": 4, "nz": 8, "d_iter": 1}, 40),
    "dfms-hl": ({"dcgan_epochs": 1, "dcgan_ngf": 4, "dcgan_images": 16, "warmup_epochs": 1, "batch_size": 4}, 40),
}


def shrunk(name: str, data: DataSpec) -> Any:
    """The committed grid ``name`` with every costly setting made tiny (its defenses and attacks kept)."""
    raw = tomllib.loads((ROOT / "benchmarks" / f"{name}.toml").read_text(encoding="utf-8"))
    raw["seeds"] = raw["seeds"][:1]
    raw["eval_every"] = 20
    raw.pop("data", None)
    for v in raw["victims"]:
        assert v["arch"] == "resnet34-8x" and v["milestones"] == [80, 120] and v["epochs"] == 200
        v.update(arch="lenet5", epochs=2, batch_size=32, milestones=[1])
    for d in raw["defenses"]:
        params = d.setdefault("params", {})
        if "fit" in params:
            params["fit"] = {**params["fit"], "epochs": 1}
        if "match_utility" in params:
            params["match_utility"] = {**params["match_utility"], "steps": 2}
        if d["name"] == "dnf":
            params.update(
                train={"epochs": 1, "batch_size": 32, "ood_batch_size": 16},
                ood={"dcgan_epochs": 1, "proxy_size": 64, "dcgan_ngf": 4},
                utility_guard=False,
            )
    # one clone per attack (the clone architectures themselves are tested in test_models)
    kept = {"dfme": "resnet18-8x", "dfms-hl": "mobilenetv2"}
    raw["attacks"] = [a for a in raw["attacks"] if kept[a["name"]] == a["clone"]]
    for a in raw["attacks"]:
        a["clone"] = _CLONES[a["clone"]]
        params, budget = _TINY_ATTACKS[a["name"]]
        a["params"] = params
        a["budgets"] = [budget]
    grid = from_dict(type(load_grid(ROOT / "benchmarks" / "mnist-quick.toml")), raw, where=name)
    return load_grid_from(grid, data)


def load_grid_from(grid: Any, data: DataSpec) -> Any:
    from dataclasses import replace

    out = replace(grid, data=data)
    out.validate()
    return out


@pytest.mark.parametrize(
    ("name", "writer", "spec"),
    [
        ("cifar10-paper", write_cifar10, "cifar10"),
        ("cifar100-paper", write_cifar100, "cifar100"),
    ],
)
def test_the_cifar_paper_grids_run_end_to_end_into_a_report(tmp_path: Path, name: str, writer: Any, spec: str) -> None:
    root = writer(tmp_path / "data")
    data = DataSpec(spec, str(root), {"val_size": 0.25, "attacker_size": 0.1})
    grid = shrunk(name, data)
    assert len(grid.seeds) == 1 and {a.name for a in grid.attacks} == {"dfme", "dfms-hl"}
    out = tmp_path / "run"
    run = run_grid(grid, out, threads=1)
    assert not run.failed, run.failed
    assert len(run.records) == grid.num_cells == 6 * 2  # six defenses, two attacks
    defenses = {r.defense for r in run.records}
    assert defenses == {"undefended", "randp-matched", "mad-matched", "grad2-matched", "meco", "dnf"}
    for r in run.records:
        assert r.dataset == spec and r.queries_used <= r.budget
        assert r.extra["device"] == "cpu" and r.extra["torch_version"]
        assert r.config["device"] == "cpu"
    report = make_report(out)
    assert report.records == len(run.records) and report.markdown.is_file()
    assert "lenet5-half" in report.markdown.read_text(encoding="utf-8")


def test_the_committed_cifar_grids_hold_the_papers_protocol() -> None:
    for name, dfme, dfms in (("cifar10-paper", 20_000_000, 8_000_000), ("cifar100-paper", 200_000_000, 10_000_000)):
        raw = tomllib.loads((ROOT / "benchmarks" / f"{name}.toml").read_text(encoding="utf-8"))
        assert raw["seeds"] == [0, 1, 2, 3, 4]
        budgets = {(a["name"], tuple(a.get("output_modes", ["soft"]))): a["budgets"] for a in raw["attacks"]}
        assert budgets == {("dfme", ("soft",)): [dfme], ("dfms-hl", ("hard",)): [dfms]}
        assert sorted({a["clone"] for a in raw["attacks"]}) == ["densenet121", "mobilenetv2", "resnet18-8x"]
        matched = [d for d in raw["defenses"] if "match_utility" in d.get("params", {})]
        assert {d["name"] for d in matched} == {"randp", "mad", "grad2"}


def test_a_cifar_grid_without_its_folder_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a path"):
        load_grid(ROOT / "benchmarks" / "cifar10-paper.toml")
    with pytest.raises(ArtifactError, match=r"neither cifar-10-batches-py/ nor batches\.meta"):
        load_grid(ROOT / "benchmarks" / "cifar10-paper.toml", data=DataSpec("cifar10", str(tmp_path)))
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ArtifactError, match="data_batch_3 does not exist"):
        load_grid(ROOT / "benchmarks" / "cifar10-paper.toml", data=DataSpec("cifar10", str(tmp_path)))


def test_the_app_g_recipe_of_resnet34_8x_on_cifar() -> None:
    import torch

    from fortress.config import VictimConfig, from_dict
    from fortress.models import create_model, recipe_for, train_classifier
    from fortress.models.recipes import PAPER_RESNET34_CIFAR, TrainRecipe

    for data in ("cifar10", "cifar100"):
        r = recipe_for("resnet34-8x", data)
        assert r == PAPER_RESNET34_CIFAR
        assert (r.optimizer, r.lr, r.epochs, r.schedule, r.milestones) == ("sgd", 0.1, 200, "step", (80, 120))
    with pytest.raises(ConfigError, match="milestones"):
        TrainRecipe(epochs=100, schedule="step", milestones=(80, 120))
    with pytest.raises(ConfigError, match="milestones"):
        TrainRecipe(epochs=200, milestones=(80, 120))  # the cosine schedule has no drops
    with pytest.raises(ConfigError, match="milestones"):  # milestones without the step schedule
        VictimConfig(arch="resnet34-8x", epochs=200, lr=0.1, optimizer="sgd", milestones=(80, 120))
    with pytest.raises(ConfigError, match="nesterov"):
        from_dict(VictimConfig, {"nesterov": True}, where="victim")
    # train-victim's config: the recipe, and a shorter run keeps the drops at the same fraction
    full = VictimConfig.recommended("resnet34-8x", DataSpec("cifar10"))
    assert full.train_recipe() == PAPER_RESNET34_CIFAR
    assert VictimConfig.recommended("resnet34-8x", DataSpec("cifar10"), epochs=20).milestones == (8, 12)
    short = VictimConfig.recommended("resnet34-8x", DataSpec("cifar10"), epochs=1)
    assert (short.milestones, short.schedule) == (None, "constant")
    # the drops happen after the named epochs: 3 epochs of one step each, ÷10 after epochs 1 and 2
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=3, image_size=32)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    seen: list[float] = []
    orig = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *a: object, **k: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.SGD.step = spy  # type: ignore[method-assign]
    try:
        train_classifier(
            model, x, y, epochs=3, batch_size=8, optimizer="sgd", lr=0.1, schedule="step", milestones=(1, 2)
        )
    finally:
        torch.optim.SGD.step = orig  # type: ignore[method-assign]
    assert seen == pytest.approx([0.1, 0.01, 0.001])
