"""The defense scaffold: one data bundle for every ``fit``, default save/load, the shared resumable loop.

A new trainable defense is one small class plus its registration: :class:`Calibrated` below trains
through the base ``fit(data, config)`` in the shared epoch loop, is saved and loaded by the base
class, and the grid builds it from a TOML-style ``fit`` table without a builder of its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.bench.build import BuildContext, build_defense, check_defense_params
from fortress.data import mnist_splits
from fortress.defenses import (
    DEFENSES,
    AdaptiveMisinformation,
    DefenderData,
    DefenseOutput,
    Grad2,
    MeCo,
    TrainableDefense,
    load_defense,
)
from fortress.defenses._perturb import SurrogateFitConfig
from fortress.defenses.adaptive_misinfo import MisinformationFitConfig
from fortress.defenses.meco import MeCoTrainConfig
from fortress.errors import ArtifactError, ConfigError, InvalidInput, TrainingDiverged
from fortress.models import StagedBackbone, create_model
from fortress.training import EpochLoop, History, RunOptions

# ------------------------------------------------------------------------- a new defense, in full


@dataclass(frozen=True)
class CalibrateFit:
    epochs: int = 2
    lr: float = 0.05


class Calibrated(TrainableDefense[CalibrateFit]):
    """Answers softmax(W·z + b) of the victim's logits z, with W, b fitted on the defender's data."""

    name = "calibrated"
    saved_parts = ("layer",)
    fit_config = CalibrateFit

    def __init__(self, victim: StagedBackbone, *, seed: int = 0) -> None:
        super().__init__(victim)
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layer = nn.Linear(victim.num_classes, victim.num_classes)

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        return DefenseOutput(torch.softmax(self.layer(self.victim(x)), dim=1))

    def _fit(self, data: DefenderData, config: CalibrateFit, options: RunOptions) -> History:
        opt = torch.optim.SGD(self.layer.parameters(), lr=config.lr)
        with torch.no_grad():
            z = self.victim(data.x_train)

        def train_epoch(epoch: int, gen: torch.Generator) -> float:
            perm = torch.randperm(z.shape[0], generator=gen)[:256]
            loss = F.cross_entropy(self.layer(z[perm]), data.y_train[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        loop = EpochLoop("calibrated", config.epochs, self.seed, dataclasses.asdict(config), {"layer": self.layer}, opt)
        return loop.run(History(), train_epoch, options=options)


# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture
def registered() -> Iterator[type[Calibrated]]:
    DEFENSES.add(Calibrated.name, Calibrated)
    try:
        yield Calibrated
    finally:
        DEFENSES._items.pop(Calibrated.name)


@lru_cache(maxsize=1)
def victim_state() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return create_model("lenet5").state_dict()


def victim() -> StagedBackbone:
    net = create_model("lenet5")
    net.load_state_dict(victim_state())
    return net.eval()


def data(n: int = 256) -> DefenderData:
    d = mnist_splits()
    return DefenderData(d.train.x[:n], d.train.targets[:n], d.val.x[:100], d.val.targets[:100], 10)


def queries() -> Tensor:
    return torch.cat(
        [mnist_splits().test.x[:32], torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    )


class Stop(Exception):
    pass


def stop_at(epoch: int) -> Any:
    def on_epoch(e: int, loss: float) -> None:
        if e == epoch:
            raise Stop

    return on_epoch


# ------------------------------------------------------------------------------------ the new file


def test_a_new_defense_trains_saves_loads_and_builds_from_a_grid_table(
    registered: type[Calibrated], tmp_path: Path
) -> None:
    toy = Calibrated(victim(), seed=3)
    before = toy.layer.weight.detach().clone()
    history = toy.fit(data(), CalibrateFit(epochs=3), checkpoint_dir=tmp_path / "ckpt")
    assert history.epochs_done == 3 and len(history.loss) == 3
    assert not torch.equal(before, toy.layer.weight)
    toy.save(tmp_path / "toy")
    files = sorted(p.relative_to(tmp_path / "toy").as_posix() for p in (tmp_path / "toy").rglob("*") if p.is_file())
    assert files == ["defense.json", "layer.safetensors", "victim/model.json", "victim/model.safetensors"]
    assert json.loads((tmp_path / "toy" / "defense.json").read_text()) == {
        "defense": "calibrated",
        "params": {"seed": 3},
    }
    loaded = load_defense(tmp_path / "toy")
    assert isinstance(loaded, Calibrated) and loaded.hparams() == toy.hparams() == {"seed": 3}
    assert torch.equal(loaded(queries()), toy(queries()))
    # the grid reads the fit table into CalibrateFit and fits on the defender's data, checkpointing in OUT
    check_defense_params("calibrated", {"seed": 3, "fit": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"fit options \['epoch'\] are unknown"):
        check_defense_params("calibrated", {"fit": {"epoch": 3}})
    built = build_defense("calibrated", victim(), {"seed": 3, "fit": {"epochs": 1}}, BuildContext(out=tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoints" / "calibrated-checkpoint.json").is_file()
    assert isinstance(built, Calibrated) and not torch.equal(before, built.layer.weight)


def test_the_shared_loop_resumes_a_new_defense_exactly(tmp_path: Path) -> None:
    straight = Calibrated(victim(), seed=1)
    straight.fit(data(), CalibrateFit(epochs=3))
    interrupted = Calibrated(victim(), seed=1)
    with pytest.raises(Stop):
        interrupted.fit(data(), CalibrateFit(epochs=3), checkpoint_dir=tmp_path, on_epoch=stop_at(1))
    resumed = Calibrated(victim(), seed=1)
    history = resumed.fit(data(), CalibrateFit(epochs=3), checkpoint_dir=tmp_path)
    assert history.resumed_from == 2 and history.epochs_done == 3
    assert torch.equal(resumed.layer.weight, straight.layer.weight)
    with pytest.raises(ArtifactError, match="different calibrated configuration"):
        Calibrated(victim(), seed=1).fit(data(), CalibrateFit(epochs=3, lr=0.5), checkpoint_dir=tmp_path)


def test_non_finite_weights_stop_training_and_keep_the_last_checkpoint(tmp_path: Path) -> None:
    toy = Calibrated(victim())
    toy.fit(data(), CalibrateFit(epochs=1), checkpoint_dir=tmp_path)
    saved = (tmp_path / "calibrated-checkpoint.json").read_text()
    with pytest.raises(TrainingDiverged, match="calibrated training diverged in epoch 1: weights are not finite"):
        Calibrated(victim()).fit(data(), CalibrateFit(epochs=2, lr=float("inf")), checkpoint_dir=tmp_path, resume=False)
    assert (tmp_path / "calibrated-checkpoint.json").read_text() == saved  # nothing non-finite was written


# ----------------------------------------------------------------------------------- DefenderData


def test_defender_data_takes_labels_by_the_one_contract() -> None:
    d = mnist_splits()
    col = d.train.targets[:50].view(-1, 1).to(torch.int32)
    bundle = DefenderData(d.train.x[:50], col, d.val.x[:20], d.val.targets[:20], 10)
    assert bundle.y_train.dtype == torch.int64 and bundle.y_train.shape == (50,)
    assert torch.equal(bundle.y_train, d.train.targets[:50])
    assert bundle.image_shape == (1, 28, 28)
    with pytest.raises(InvalidInput, match="training labels must have an integer dtype"):
        DefenderData(d.train.x[:50], d.train.targets[:50].float(), d.val.x, d.val.targets, 10)
    with pytest.raises(InvalidInput, match=r"validation labels are in \[0, 9\], expected class indices in \[0, 4\]"):
        DefenderData(d.train.x[:50], d.train.targets[:50] % 5, d.val.x, d.val.targets, 5)
    with pytest.raises(InvalidInput, match="training labels hold 49 entries for 50 images"):
        DefenderData(d.train.x[:50], d.train.targets[:49], d.val.x, d.val.targets, 10)
    with pytest.raises(InvalidInput, match=r"validation images have per-image shape \(3, 28, 28\)"):
        DefenderData(d.train.x[:50], d.train.targets[:50], torch.rand(4, 3, 28, 28), d.val.targets[:4], 10)
    with pytest.raises(InvalidInput, match="num_classes must be an integer >= 2, got 1"):
        DefenderData(d.train.x[:50], d.train.targets[:50] * 0, d.val.x, d.val.targets * 0, 1)


def test_fit_refuses_data_and_configs_that_do_not_fit_the_defense() -> None:
    d = mnist_splits()
    five = DefenderData(d.train.x[:50], d.train.targets[:50] % 5, d.val.x[:9], d.val.targets[:9] % 5, 5)
    with pytest.raises(InvalidInput, match="5 classes, defense 'grad2' has 10"):
        Grad2(victim()).fit(five)
    with pytest.raises(ConfigError, match="trains with a SurrogateFitConfig, got MeCoTrainConfig"):
        Grad2(victim()).fit(data(), MeCoTrainConfig())  # type: ignore[arg-type]


# ---------------------------------------------------------- resumable training of every trainable


@pytest.mark.parametrize(
    ("make", "config", "parts"),
    [
        (lambda: Grad2(victim(), seed=2), SurrogateFitConfig(epochs=3, batch_size=64), ["surrogate"]),
        (lambda: AdaptiveMisinformation(victim(), seed=2), MisinformationFitConfig(epochs=3), ["misinfo"]),
        (
            lambda: MeCo(victim(), seed=2),
            MeCoTrainConfig(epochs=3, batch_size=128, ood_batch_size=32, dro_steps=1),
            ["generator", "model"],
        ),
    ],
    ids=["grad2-surrogate", "adaptive-misinformation", "meco"],
)
def test_every_trainable_defense_resumes_exactly(make: Any, config: Any, parts: list[str], tmp_path: Path) -> None:
    straight = make()
    straight.fit(data(), config)
    interrupted = make()
    with pytest.raises(Stop):
        interrupted.fit(data(), config, checkpoint_dir=tmp_path, on_epoch=stop_at(0))
    resumed = make()
    history = resumed.fit(data(), config, checkpoint_dir=tmp_path)
    assert history.resumed_from == 1 and history.epochs_done == 3 and len(history.loss) == 3
    for name in parts:
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert straight.hparams() == resumed.hparams()
