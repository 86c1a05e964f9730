"""The three-way threshold search: SMAC3 multi-objective over surrogate clone accuracy, ID compute and
utility loss; its Pareto front written as JSON lines, plotted, and one point picked per objective."""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.threshold_plot import plot_pareto
from fortress.cli import app
from fortress.data import mnist_splits
from fortress.defenses import DNF, DefenderData, load_defense
from fortress.defenses.dnf import ThresholdSearchConfig
from fortress.defenses.dnf.pareto_search import PARETO_FILE, ParetoTrial, pareto_front, pick, search_pareto
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.errors import ConfigError
from fortress.generative.ood import NoiseOOD
from fortress.models import create_model, save_model, train_classifier

SEARCH = ThresholdSearchConfig(n_trials=8, clone_epochs=1, clone_repeats=1, patches=0)


@lru_cache(maxsize=1)
def trained() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    d = mnist_splits()
    torch.manual_seed(0)
    victim = create_model("lenet5")
    train_classifier(victim, d.train.x[:1500], d.train.targets[:1500], epochs=2, seed=0)
    dnf = DNF(victim.eval(), seed=0, dataset="mnist")
    data = DefenderData(d.train.x[:512], d.train.targets[:512], d.val.x, d.val.targets, 10, dataset="mnist")
    dnf.fit(data, DNFTrainConfig(epochs=2, ood_batch_size=64), ood=NoiseOOD((1, 28, 28)))
    return victim.state_dict(), dnf.net.state_dict()


def dnf() -> DNF:
    v, heads = trained()
    victim = create_model("lenet5")
    victim.load_state_dict(v)
    made = DNF(victim.eval(), seed=0, dataset="mnist")
    made.net.load_state_dict(heads)
    return made


def trial(i: int, s: float, c: float, u: float, feasible: bool = True) -> ParetoTrial:
    return ParetoTrial(i, [0.9], s, c, u, 0.9, feasible, [0.5, 0.5], [0.5, 0.5])


def test_front_keeps_only_feasible_non_dominated_points_and_picks_by_objective() -> None:
    trials = [
        trial(0, 0.30, 1.00, 0.000),
        trial(1, 0.20, 0.90, 0.001),
        trial(2, 0.25, 0.50, 0.002),
        trial(3, 0.25, 0.60, 0.002),  # dominated by 2
        trial(4, 0.10, 0.20, 0.000, feasible=False),
        trial(5, 0.40, 0.30, 0.004),
    ]
    front = pareto_front(trials)
    assert [t.trial for t in front] == [1, 2, 0, 5]
    base = trial(-1, 0.25, 1.0, 0.0)
    assert pick(front, "protection", base).trial == 1
    assert pick(front, "efficiency", base).trial == 2  # the least compute that protects no worse than the defaults
    assert pick(front, "efficiency", trial(-1, 0.15, 1.0, 0.0)).trial == 1  # none does: the protection point
    assert pick(front, "pareto", base).trial in {1, 2}
    with pytest.raises(ConfigError, match="unknown threshold-search objective 'speed'"):
        pick(front, "speed", base)
    with pytest.raises(ConfigError, match="unknown threshold-search objective 'fast'"):
        ThresholdSearchConfig(goal="fast")


def test_search_writes_the_front_and_every_pick_respects_the_budget(tmp_path: Path) -> None:
    d = mnist_splits()
    r = search_pareto(dnf().net, (d.val.x, d.val.targets), goal="pareto", config=SEARCH, out_dir=tmp_path)
    assert len(r.trials) == SEARCH.n_trials and r.front and r.chosen in r.front
    for a, b in itertools.permutations(r.front, 2):  # nobody on the front dominates another
        va, vb = (a.surrogate, a.id_compute, a.utility_loss), (b.surrogate, b.id_compute, b.utility_loss)
        assert not (all(x <= y for x, y in zip(va, vb, strict=True)) and va != vb)
    picks = {g: pick(r.front, g, r.baseline) for g in ("protection", "efficiency", "pareto")}
    assert picks["pareto"] == r.chosen
    for p in picks.values():
        assert p.feasible and p.utility_loss <= 0.005 + 1e-9
    assert picks["protection"].surrogate == min(t.surrogate for t in r.front)
    assert picks["efficiency"].id_compute <= picks["protection"].id_compute
    rows = [json.loads(x) for x in (tmp_path / PARETO_FILE).read_text().splitlines()]
    assert [x["kind"] for x in rows].count("trial") == SEARCH.n_trials
    assert sum(x.get("on_front", False) for x in rows) == len(r.front)
    assert rows[-1]["kind"] == "chosen" and rows[-1]["goal"] == "pareto"
    assert plot_pareto(tmp_path / PARETO_FILE).stat().st_size > 0
    # compute is FLOPs per ID query: all answered at the final exit costs more than the victim alone
    all_final = [t for t in r.trials if all(v == 1.0 for v in t.thresholds)]
    assert all_final and all_final[0].id_compute > 1.0 and all_final[0].id_exit_hist[-1] == 1.0


def test_cli_objective_runs_the_three_way_search_and_plots_it(tmp_path: Path) -> None:
    v, _ = trained()
    victim = create_model("lenet5")
    victim.load_state_dict(v)
    vdir = save_model(victim.eval(), tmp_path / "victim")
    out = tmp_path / "dnf"
    args = ["protect", str(vdir), "--out", str(out), "--epochs", "1", "--ood", "noise", "--objective", "efficiency"]
    res = CliRunner().invoke(app, [*args, "--search-trials", "4"])
    assert res.exit_code == 0, res.output
    assert (out / PARETO_FILE).is_file() and (out / "threshold_pareto.png").is_file()
    loaded = load_defense(out)
    assert isinstance(loaded, DNF) and loaded.provenance is not None and loaded.provenance.search is not None
    assert loaded.provenance.search.goal == "efficiency" and loaded.provenance.search.n_trials == 4
    assert list(loaded.provenance.search.thresholds) == pytest.approx(loaded.thresholds)
    assert "three-way search (efficiency)" in res.output
    bad = CliRunner().invoke(app, ["protect", str(vdir), "--out", str(tmp_path / "x"), "--objective", "speed"])
    assert bad.exit_code == 1 and "unknown threshold-search objective 'speed'" in bad.output
    assert not (tmp_path / "x").exists()
