"""The DNF protection recipe: options checked before training, every expensive step saved before the
next one, reused on a repeated run, and recorded as one provenance record on the model."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import fortress.defenses.dnf.recipe as recipe
from fortress.bench.grid import load_grid
from fortress.bench.runner import ensure_defense
from fortress.cli import app
from fortress.data import mnist_splits
from fortress.defenses import DNF, DefenderData, load_defense
from fortress.defenses.dnf import OODConfig, ProtectConfig, Provenance, ThresholdSearchConfig, protect
from fortress.defenses.dnf.threshold_search import TRIALS_FILE
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.errors import ArtifactError, ConfigError, InvalidInput, UnknownComponent
from fortress.models import StagedBackbone, create_model, save_model
from fortress.models.io import load_state

TRAIN = DNFTrainConfig(epochs=2, batch_size=128, ood_batch_size=64)
OOD = OODConfig(kind="dcgan+noise", proxy_size=128, dcgan_epochs=1, dcgan_ngf=8)
SEARCH = ThresholdSearchConfig(n_trials=2, clone_epochs=1, clone_repeats=1, patches=0)


@lru_cache(maxsize=1)
def victim_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("lenet5").state_dict()


def victim() -> StagedBackbone:
    net = create_model("lenet5")
    net.load_state_dict(victim_state())
    return net.eval()


def data() -> DefenderData:
    d = mnist_splits()
    return DefenderData(d.train.x[:512], d.train.targets[:512], d.val.x, d.val.targets, 10, dataset="mnist")


def config(**kw: Any) -> ProtectConfig:
    return ProtectConfig(**{"train": TRAIN, "ood": OOD, "min_ood_exit0": 0.0, "max_attempts": 1, **kw})


def heads(directory: Path) -> dict[str, torch.Tensor]:
    return load_state(directory / "dnf.safetensors")


def must_not_run(*_: Any, **__: Any) -> Any:
    raise AssertionError("this step must not run again")


class SearchCrashed(RuntimeError):
    pass


def crash(*_: Any, **__: Any) -> Any:
    raise SearchCrashed("the search failed")


# ----------------------------------------------------------------------- validated before training


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda: ThresholdSearchConfig(n_trials=1), "n_trials must be >= 2, got 1"),
        (lambda: ProtectConfig(max_attempts=0), "max_attempts must be >= 1, got 0"),
        (lambda: ProtectConfig(min_ood_exit0=1.5), "min_ood_exit0 (a share of OOD probes) must be in [0, 1], got 1.5"),
        (lambda: ProtectConfig(hidden=0), "hidden (head width) must be >= 1 or None, got 0"),
        (lambda: OODConfig(proxy_size=1), "proxy_size must be >= 2, got 1"),
        (lambda: OODConfig(dcgan_epochs=0), "dcgan_epochs must be >= 1, got 0"),
    ],
)
def test_options_are_refused_at_construction_naming_value_and_minimum(make: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        make()
    assert shown in str(err.value)


def test_cli_search_trials_below_the_minimum_fail_before_anything_is_written(tmp_path: Path) -> None:
    victim_dir = save_model(victim(), tmp_path / "victim")
    out = tmp_path / "dnf"
    res = CliRunner().invoke(app, ["protect", str(victim_dir), "--out", str(out), "--search-trials", "1"])
    assert res.exit_code == 1
    assert "n_trials must be >= 2, got 1" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_the_smallest_trial_budget_runs() -> None:
    dnf = protect(victim(), data(), config(ood=OODConfig(kind="noise"), search=SEARCH))
    assert dnf.provenance is not None and dnf.provenance.search is not None
    assert dnf.provenance.search.n_trials == 2
    assert tuple(dnf.thresholds) == pytest.approx(dnf.provenance.search.thresholds)


@pytest.mark.parametrize(
    ("cfg", "bundle", "error", "shown"),
    [
        (lambda: config(thresholds=(0.9,)), data, ConfigError, "thresholds"),
        (
            config,
            lambda: DefenderData(
                torch.rand(8, 1, 32, 32),
                torch.zeros(8, dtype=torch.int64),
                torch.rand(4, 1, 32, 32),
                torch.zeros(4, dtype=torch.int64),
                10,
            ),
            InvalidInput,
            "the defender's images are (1, 32, 32), the victim takes (1, 28, 28)",
        ),
        (lambda: config(ood=OODConfig(proxy="digits28-missing")), data, UnknownComponent, "digits28-missing"),
    ],
    ids=["thresholds", "data-shape", "proxy-name"],
)
def test_bad_settings_fail_before_the_dcgan_or_the_heads_train(
    cfg: Any, bundle: Any, error: type[Exception], shown: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(recipe, "train_dcgan", must_not_run)
    monkeypatch.setattr(DNF, "fit", must_not_run)
    with pytest.raises(error) as err:
        protect(victim(), bundle(), cfg(), out=tmp_path / "dnf")
    assert shown in str(err.value)
    assert not (tmp_path / "dnf" / "checkpoints").exists()


def test_a_search_that_cannot_run_on_the_victim_fails_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "train_dcgan", must_not_run)
    monkeypatch.setattr(DNF, "fit", must_not_run)
    wide = create_model("lenet5", in_channels=3, image_size=32)
    bundle = DefenderData(torch.rand(8, 3, 32, 32), torch.arange(8) % 10, torch.rand(4, 3, 32, 32), torch.arange(4), 10)
    with pytest.raises(ConfigError, match=r"no default query set for \(3, 32, 32\) images with patches=0"):
        protect(wide, bundle, config(search=SEARCH))


# ------------------------------------------------------------- each expensive result saved first


def test_a_failed_search_keeps_the_trained_model_and_a_rerun_reuses_everything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = tmp_path / "dnf"
    with monkeypatch.context() as m:
        m.setattr(recipe, "search_thresholds", crash)
        with pytest.raises(SearchCrashed):
            protect(victim(), data(), config(search=SEARCH), out=out)
    # the DCGAN, the trained and guarded DNF and its record are on disk
    assert (out / "ood" / "dcgan.safetensors").is_file() and (out / "ood" / "dcgan.json").is_file()
    saved = load_defense(out)
    assert isinstance(saved, DNF) and saved.provenance is not None
    assert len(saved.provenance.attempts) == 1 and saved.provenance.guard is not None
    assert saved.provenance.search is None
    trained = heads(out)
    # the rerun neither trains the DCGAN nor the heads again: it only searches
    monkeypatch.setattr(recipe, "train_dcgan", must_not_run)
    dnf = protect(victim(), data(), config(search=SEARCH), out=out)
    assert dnf.train_report is not None and dnf.train_report.resumed_from == TRAIN.epochs
    assert all(torch.equal(v, heads(out)[k]) for k, v in trained.items())
    final = load_defense(out)
    assert isinstance(final, DNF) and final.provenance == dnf.provenance
    assert final.provenance is not None and final.provenance.search is not None
    assert final.provenance.search.trials_file == TRIALS_FILE and (out / TRIALS_FILE).is_file()
    assert final.thresholds == pytest.approx(list(final.provenance.search.thresholds))


def test_a_reused_dcgan_gives_the_same_dnf_as_a_fresh_one(tmp_path: Path) -> None:
    fresh = protect(victim(), data(), config(), out=tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "ood", tmp_path / "b" / "ood")
    reused = protect(victim(), data(), config(), out=tmp_path / "b")
    assert all(torch.equal(v, heads(tmp_path / "b")[k]) for k, v in heads(tmp_path / "a").items())
    assert reused.thresholds == fresh.thresholds and reused.provenance == fresh.provenance
    # another OOD setting is not silently served by the saved generator
    with pytest.raises(ArtifactError, match="trained with other settings"):
        protect(
            victim(), data(), config(ood=OODConfig(proxy_size=128, dcgan_epochs=2, dcgan_ngf=8)), out=tmp_path / "b"
        )


def test_grid_cells_keep_a_built_dnf_when_its_search_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "grid.toml"
    toml.write_text(
        """
name = "g"
seeds = [0]
[[victims]]
arch = "lenet5-half"
epochs = 1
[[defenses]]
name = "dnf"
[defenses.params]
max_attempts = 1
min_ood_exit0 = 0.0
train = { epochs = 1 }
ood = { kind = "noise" }
search = { n_trials = 2, clone_epochs = 1, clone_repeats = 1, patches = 0 }
[[attacks]]
name = "knockoff"
budgets = [100]
pool = "digits28"
""",
        encoding="utf-8",
    )
    grid = load_grid(toml)
    victim_cfg, spec = grid.victims[0], grid.defenses[0]
    with monkeypatch.context() as m:
        m.setattr(recipe, "search_thresholds", crash)
        with pytest.raises(SearchCrashed):
            ensure_defense(victim_cfg, spec, tmp_path / "run")
    built = next((tmp_path / "run" / "artifacts").glob("dnf-*"))
    assert isinstance(load_defense(built), DNF) and not (built / "built.json").exists()
    d = ensure_defense(victim_cfg, spec, tmp_path / "run")  # the rebuild resumes the finished training
    dnf = load_defense(d)
    assert isinstance(dnf, DNF) and dnf.train_report is not None and dnf.train_report.resumed_from == 1
    assert dnf.provenance is not None and dnf.provenance.search is not None
    # a trial budget the search cannot run is refused when the grid is loaded, before anything runs
    toml.write_text(toml.read_text().replace("n_trials = 2", "n_trials = 1"), encoding="utf-8")
    with pytest.raises(ConfigError, match="n_trials must be >= 2, got 1"):
        load_grid(toml)


# ------------------------------------------------------------------------------------- provenance


def test_provenance_is_one_record_saved_and_restored_with_the_model(tmp_path: Path) -> None:
    # heads that never fire fail the acceptance check: both attempts run, the best is kept
    cfg = config(ood=OODConfig(kind="noise"), thresholds=(1.5, 1.5, 1.5), min_ood_exit0=0.5, max_attempts=2)
    dnf = protect(victim(), data(), cfg, out=tmp_path / "d")
    prov = dnf.provenance
    assert prov is not None and [a.head_seed for a in prov.attempts] == [0, 1] and not prov.accepted
    assert [a.ood_exit0 for a in prov.attempts] == [0.0, 0.0]
    assert prov.guard is not None and prov.guard.before == (1.5, 1.5, 1.5) and list(prov.guard.after) == dnf.thresholds
    meta = json.loads((tmp_path / "d" / "defense.json").read_text())
    assert Provenance.from_json(meta["provenance"]) == prov
    loaded = load_defense(tmp_path / "d")
    assert isinstance(loaded, DNF) and loaded.provenance == prov
    assert loaded.hparams() == json.loads(json.dumps(dnf.hparams()))
    assert loaded.hparams()["attempts"] == [{"head_seed": a.head_seed, "ood_exit0": a.ood_exit0} for a in prov.attempts]
    assert loaded.hparams()["utility_guard"] is True


def test_a_dnf_saved_before_the_provenance_record_loads_with_its_attempts(tmp_path: Path) -> None:
    dnf = protect(victim(), data(), config(ood=OODConfig(kind="noise")), out=tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "defense.json").read_text())
    prov = meta.pop("provenance")
    meta["attempts"] = prov["attempts"]
    meta["utility_guard"] = True
    (tmp_path / "d" / "defense.json").write_text(json.dumps(meta))
    loaded = load_defense(tmp_path / "d")
    assert isinstance(loaded, DNF) and loaded.hparams() == json.loads(json.dumps(dnf.hparams()))
