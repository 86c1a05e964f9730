"""Any data set through the whole pipeline: a model remembers its data, every step and verb takes
``--data``, and data that do not fit the saved victim are one line before anything trains, queries or writes.

Tiny Fashion-MNIST-format IDX files and ``.npz`` archives written by the tests stand in for real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.pipeline import attack_pool, data_for, train_victim
from fortress.bench.records import read_records
from fortress.bench.steps import attack_saved, calibrate_saved, defend_saved, protect_saved
from fortress.cli import app
from fortress.config import AttackConfig, ProtectConfig, VictimConfig
from fortress.data.resolve import resolve_data
from fortress.data.spec import DataSpec
from fortress.defenses import load_defense
from fortress.defenses.dnf import DNFTrainConfig
from fortress.defenses.dnf.recipe import OODConfig
from fortress.errors import ConfigError, InvalidInput
from fortress.models import evaluate_accuracy
from test_data_spec import write_fashion

runner = CliRunner()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    return DataSpec("fashion-mnist", str(write_fashion(tmp_path_factory.mktemp("data") / "fashion")))


@pytest.fixture(scope="module")
def victim_dir(fashion: DataSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("victim") / "victim"
    train_victim(VictimConfig(data=fashion, epochs=1), out)
    return out


@pytest.fixture(scope="module")
def wrong(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DataSpec]:
    """Data that do not fit a 1x28x28, 10-class victim: RGB 32x32 images, and grey 28x28 ones in 5 classes."""
    root = tmp_path_factory.mktemp("wrong")
    rng = np.random.default_rng(0)
    np.savez(root / "rgb.npz", x=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), y=np.arange(60) % 10)
    np.savez(root / "five.npz", x=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), y=np.arange(60) % 5)
    return {"rgb": DataSpec("npz", str(root / "rgb.npz")), "five": DataSpec("npz", str(root / "five.npz"))}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_step_uses_the_data_the_victim_remembers(fashion: DataSpec, victim_dir: Path, tmp_path: Path) -> None:
    data = resolve_data(fashion)
    saved = json.loads((victim_dir / "model.json").read_text())
    assert saved["data"] == data.card().to_dict() and saved["data"]["classes"][0] == "T-shirt/top"
    made = defend_saved("undefended", victim_dir, tmp_path / "undefended", {})
    assert made.accuracy == pytest.approx(evaluate_accuracy(made.defense.victim, data.test.x, data.test.targets))
    assert load_defense(tmp_path / "undefended").victim.data_card == data.card()  # a defense keeps the victim's card
    cfg = AttackConfig(name="knockoff", budget=30, params={"epochs": 1})
    rec = attack_saved(str(tmp_path / "undefended"), cfg, tmp_path / "run").record
    assert rec.dataset == "fashion-mnist" and rec.config["pool"] == "patches"
    assert rec.data["sha256"] == data.sha256 and rec.data["splits"]["test"] == 50 and rec.data["path"] == fashion.path
    assert attack_pool(AttackConfig(name="jbda"), data, (1, 28, 28)) == "fashion-mnist-attacker"
    assert attack_pool(AttackConfig(name="dfme"), data, (1, 28, 28)) is None
    protect_cfg = ProtectConfig(train=DNFTrainConfig(epochs=1), ood=OODConfig(kind="noise"), min_ood_exit0=0.0)
    dnf = protect_saved(victim_dir, tmp_path / "dnf", protect_cfg)
    assert dnf.dnf.dataset == "fashion-mnist"
    cal = calibrate_saved(tmp_path / "dnf", tmp_path / "cal.json", views=1)
    assert cal.queries == 2 * len(data.val)  # the Fashion validation split and one view of it


@pytest.mark.parametrize(("which", "match"), [("rgb", r"images \(3, 32, 32\)"), ("five", "in 5 classes")])
def test_data_that_do_not_fit_the_victim_are_refused_before_anything_is_written(
    which: str, match: str, victim_dir: Path, wrong: dict[str, DataSpec], tmp_path: Path
) -> None:
    spec = wrong[which]
    for step in (
        lambda: defend_saved("undefended", victim_dir, tmp_path / "d", {}, data=spec),
        lambda: protect_saved(victim_dir, tmp_path / "p", ProtectConfig(), data=spec),
        lambda: attack_saved(str(victim_dir), AttackConfig(name="knockoff", budget=5), tmp_path / "a", data=spec),
    ):
        with pytest.raises(InvalidInput, match=match) as info:
            step()
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(InvalidInput, match=match):
        data_for(load_defense(victim_dir).victim, spec)


def test_the_cli_takes_data_on_every_verb_and_refuses_bad_data_in_one_line(
    fashion: DataSpec, victim_dir: Path, wrong: dict[str, DataSpec], tmp_path: Path
) -> None:
    args = ["--data", f"fashion-mnist:{fashion.path}", "--data-option", "train_size=40"]
    res = runner.invoke(app, ["train-victim", "--out", str(tmp_path / "v"), "--epochs", "1", *args])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v" / "model.json").read_text())["data"]["spec"]["options"] == {"train_size": 40}

    for argv, match in (
        (["train-victim", "--out", str(tmp_path / "x"), "--data", "nope"], "unknown dataset 'nope'"),
        (["train-victim", "--out", str(tmp_path / "x"), "--data", f"fashion-mnist:{tmp_path}/0"], "apt-get install"),
        (["train-victim", "--out", str(tmp_path / "x"), "--data-option", "val_size=3"], "needs --data"),
    ):
        res = runner.invoke(app, argv)
        assert res.exit_code == 1 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x").exists()

    existing = tmp_path / "kept"
    runner.invoke(app, ["defend", "undefended", str(victim_dir), "--out", str(existing)])
    attack = ["attack", "knockoff", "--target", str(existing), "--budget", "5", "--out", str(existing)]
    runner.invoke(app, [*attack, "--param", "epochs=1"])
    before = _tree(existing)
    rgb = f"npz:{wrong['rgb'].path}"
    for argv in (
        ["protect", str(victim_dir), "--out", str(existing), "--data", rgb],
        ["defend", "randp", str(victim_dir), "--out", str(existing), "--data", rgb],
        [*attack, "--data", rgb],
        ["bench-speed", str(existing), "--data", rgb],
    ):
        res = runner.invoke(app, argv)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1 and "(3, 32, 32)" in res.output and len(lines) == 1, res.output
    assert _tree(existing) == before and len(read_records(existing / "results.jsonl")) == 1


def test_the_saved_card_tells_protect_its_data_even_when_the_default_would_fit(victim_dir: Path) -> None:
    victim = load_defense(victim_dir).victim
    assert data_for(victim).name == "fashion-mnist"
    assert data_for(victim, DataSpec()).name == "mnist"  # an explicit spec wins (shape and classes fit)
    assert torch.equal(data_for(victim).test.x, resolve_data(victim.data_card.spec).test.x)  # type: ignore[union-attr]


def test_serve_names_the_classes_the_saved_model_remembers(victim_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fortress.data.registry import FASHION_CLASSES
    from fortress.serve import KeyStore, ServeSettings, create_app

    settings = ServeSettings(victim_dir, tmp_path / "keys.db")
    store = KeyStore(settings.keys_path, create=True)
    key = store.add("t")[1]
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/info", headers={"X-API-Key": key}).json()
    store.close()
    assert info["classes"] == list(FASHION_CLASSES) and info["input_shape"] == [1, 28, 28]


def test_every_verb_refuses_an_unknown_name_or_a_missing_path_in_one_line_and_keeps_what_exists(
    fashion: DataSpec, victim_dir: Path, wrong: dict[str, DataSpec], tmp_path: Path
) -> None:
    kept = tmp_path / "kept"
    made = runner.invoke(app, ["protect", str(victim_dir), "--out", str(kept), "--epochs", "1", "--ood", "noise"])
    assert made.exit_code == 0, made.output
    cal = tmp_path / "cal.json"
    cal.write_text("{}")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "note.txt").write_text("kept")
    before = {p: _tree(p) for p in (kept, demo)}
    verbs = (
        ["train-victim", "--out", str(kept)],
        ["protect", str(victim_dir), "--out", str(kept)],
        ["defend", "undefended", str(victim_dir), "--out", str(kept)],
        ["attack", "knockoff", "--target", str(kept), "--budget", "5", "--out", str(kept)],
        ["demo", "--out", str(demo), "--quick"],
        ["monitor", "calibrate", str(kept), "--out", str(cal)],
        ["bench-speed", str(kept)],
    )
    for verb in verbs:
        for data, match in (
            ("nope", "unknown dataset 'nope'"),
            (f"fashion-mnist:{tmp_path}/absent", "apt-get install"),
        ):
            res = runner.invoke(app, [*verb, "--data", data])
            lines = res.output.strip().splitlines()
            assert res.exit_code == 1 and match in res.output and len(lines) == 1, (verb, res.output)
    # data that do not fit the saved model: monitor calibrate (the other verbs: the test above)
    for spec, match in ((wrong["rgb"], "(3, 32, 32)"), (wrong["five"], "in 5 classes")):
        res = runner.invoke(app, ["monitor", "calibrate", str(kept), "--out", str(cal), "--data", f"npz:{spec.path}"])
        assert res.exit_code == 1 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert {p: _tree(p) for p in (kept, demo)} == before and cal.read_text() == "{}"


def test_train_victim_takes_the_recipe_of_the_architecture_and_the_data(fashion: DataSpec, tmp_path: Path) -> None:
    assert VictimConfig.recommended("lenet5") == VictimConfig()  # MNIST: the paper's training, unchanged
    cfg = VictimConfig.recommended("lenet5", fashion)
    assert (cfg.epochs, cfg.max_shift, cfg.hflip, cfg.optimizer) == (15, 0, True, "adam")
    res = runner.invoke(app, ["train-victim", "--out", str(tmp_path / "v"), "--epochs", "1", "--data", fashion.text()])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "v" / "model.json").read_text())["extra"]["config"]
    assert (saved["epochs"], saved["max_shift"], saved["hflip"]) == (1, 0, True)
    # flips on digits are refused before anything trains or is written
    with pytest.raises(ConfigError, match="horizontal flips change the class of digits"):
        train_victim(VictimConfig(epochs=1, hflip=True), tmp_path / "digits")
    assert not (tmp_path / "digits").exists()
    with pytest.raises(ConfigError, match="unknown victim training option"):
        VictimConfig.recommended("lenet5", fashion, nesterov=True)
