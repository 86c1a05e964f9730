"""Tests of the SMAC3 exit-threshold search (paper App. H): the closed-form threshold simulation
against DNF's real dynamic inference, the search's guarantees, its records and plot, and bad settings."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.threshold_plot import plot_threshold_search
from fortress.cli import app
from fortress.data import mnist_splits
from fortress.defenses import DNF
from fortress.defenses.dnf import ThresholdSearchConfig, search_thresholds
from fortress.defenses.dnf.threshold_search import TRIALS_FILE, ExitTable, default_query_set
from fortress.errors import ConfigError
from fortress.models import create_model, train_classifier

# confident heads put the max-softmax of the rows all over [0.1, 1]; thresholds are searched there
LOW, HIGH = 0.3, 0.9


@lru_cache(maxsize=1)
def tiny_dnf() -> DNF:
    """A LeNet-5 trained briefly on 600 digits, with plain heads scaled up so their confidence varies."""
    data = mnist_splits()
    torch.manual_seed(0)
    victim = create_model("lenet5")
    train_classifier(victim, data.train.x[:600], data.train.targets[:600], epochs=1, seed=0)
    dnf = DNF(victim.eval(), head_kind="plain", seed=0)
    with torch.no_grad():
        for head in dnf.net.heads:
            for p in head.parameters():
                p.mul_(6.0)
    return dnf


def query_images() -> torch.Tensor:
    return default_query_set(ThresholdSearchConfig(patches=60))[::12]


def test_closed_form_simulation_equals_dynamic_inference() -> None:
    dnf = tiny_dnf()
    x = torch.cat([mnist_splits().val.x[:100], query_images()[:100]])
    table = ExitTable.build(dnf.net, x, batch_size=64)  # batching must not matter either
    conf = table.probs[:-1].amax(2)
    assert float(conf.min()) < LOW and float(conf.max()) > HIGH  # the thresholds below really split rows
    gen = torch.Generator().manual_seed(1)
    thresholds = LOW + (HIGH - LOW) * torch.rand(12, dnf.num_exits - 1, generator=gen)
    seen_exits: set[int] = set()
    for thr in thresholds:
        dnf.set_thresholds(thr.tolist())
        out = dnf.respond(x)  # the real dynamic path (stages skipped for finished rows)
        assert out.exits is not None
        assert torch.equal(table.exits(thr), out.exits)
        torch.testing.assert_close(table.answers(thr), out.probs, rtol=1e-5, atol=1e-6)
        seen_exits |= set(out.exits.tolist())
    assert seen_exits == set(range(dnf.num_exits))
    # many threshold vectors at once give the same exits as one at a time
    batched = table.exits(thresholds)
    assert torch.equal(batched, torch.stack([table.exits(t) for t in thresholds]))


def test_search_is_within_bounds_feasible_and_no_worse_than_the_defaults(tmp_path: Path) -> None:
    dnf = tiny_dnf()
    before = dnf.thresholds
    val = mnist_splits().val
    cfg = ThresholdSearchConfig(
        n_trials=10, low=LOW, high=HIGH, tolerance=0.02, clone_epochs=1, clone_repeats=1, patches=60
    )
    base = [0.5, 0.6, 0.7]
    res = search_thresholds(
        dnf.net, (val.x[:150], val.targets[:150]), config=cfg, query=query_images(), baseline=base, out_dir=tmp_path
    )
    assert dnf.thresholds == before  # the search leaves the network alone
    assert len(res.trials) == cfg.n_trials
    assert [t.trial for t in res.trials] == list(range(cfg.n_trials))
    for t in res.trials:
        assert all(LOW <= v <= HIGH for v in t.thresholds)
        assert t.feasible == (t.val_acc >= res.victim_val_acc - cfg.tolerance - 1e-9)
        assert t.cost == (
            t.surrogate if t.feasible else pytest.approx(1 + res.victim_val_acc - cfg.tolerance - t.val_acc)
        )
        assert sum(t.query_exit_hist) == pytest.approx(1.0)
    assert res.best.feasible
    assert res.best.val_acc >= res.victim_val_acc - cfg.tolerance
    assert res.baseline.thresholds == pytest.approx(base)
    assert res.best.cost <= res.baseline.cost  # the defaults are among the trials
    assert res.best.cost == min(t.cost for t in res.trials if t.feasible)
    # the record: baseline, every trial, the best; SMAC3's own run directory beside it
    lines = [json.loads(s) for s in (tmp_path / TRIALS_FILE).read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["baseline"] + ["trial"] * cfg.n_trials + ["best"]
    assert lines[-1]["thresholds"] == res.best.thresholds
    assert (tmp_path / "smac").is_dir()
    png = plot_threshold_search(tmp_path / TRIALS_FILE)
    assert png == tmp_path / "threshold_search.png"
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"n_trials": 0}, "n_trials must be >= 2, got 0"),
        ({"low": -0.1}, "low=-0.1"),
        ({"high": 1.5}, "high=1.5"),
        ({"low": 0.95, "high": 0.9}, "low=0.95"),
        ({"tolerance": -0.01}, "got -0.01"),
        ({"clone_repeats": 0}, "clone_repeats=0"),
        ({"objective": "loss"}, "'loss'"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_value(kwargs: dict[str, object], shown: str) -> None:
    with pytest.raises(ConfigError, match=shown.replace("(", r"\(")):
        ThresholdSearchConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_rejects_bad_trial_count_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["protect", str(tmp_path / "victim"), "--out", str(tmp_path / "dnf"), "--search-trials", "0"]
    )
    assert res.exit_code == 1
    assert "n_trials must be >= 2, got 0" in res.output


def test_baseline_of_wrong_length_is_rejected() -> None:
    val = mnist_splits().val
    with pytest.raises(ConfigError, match=r"\[0.9\]"):
        search_thresholds(tiny_dnf().net, (val.x, val.targets), baseline=[0.9], query=query_images())


def test_cli_protect_searches_thresholds_and_records_trials(tmp_path: Path) -> None:
    runner = CliRunner()
    victim, out = tmp_path / "victim", tmp_path / "dnf"
    res = runner.invoke(app, ["train-victim", "--out", str(victim), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    toml = tmp_path / "protect.toml"
    toml.write_text("[search]\nclone_epochs = 1\nclone_repeats = 1\npatches = 0\n", encoding="utf-8")
    args = ["protect", str(victim), "--out", str(out), "--epochs", "1", "--ood", "noise", "--config", str(toml)]
    res = runner.invoke(app, [*args, "--search-thresholds", "--search-trials", "6"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(s) for s in (out / TRIALS_FILE).read_text().splitlines()]
    assert len([r for r in lines if r["kind"] == "trial"]) == 6
    assert lines[-1]["config"]["clone_epochs"] == 1
    assert (out / "threshold_search.png").is_file()
    saved = json.loads((out / "defense.json").read_text())["params"]["thresholds"]
    assert saved == pytest.approx(lines[-1]["thresholds"])
    assert all(0.85 <= t <= 1.0 for t in saved)
