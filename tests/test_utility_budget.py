"""The utility budget of the DNF recipe: early ID answers accepted while the defended accuracy stays
within ``max_utility_drop`` points of the victim's; a zero budget is the zero-tolerance guard."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fortress.cli import app
from fortress.data import mnist_splits
from fortress.defenses import DNF, DefenderData, load_defense
from fortress.defenses.dnf import OODConfig, ProtectConfig, Provenance, guard_utility, protect
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.errors import ConfigError
from fortress.generative.ood import NoiseOOD
from fortress.models import StagedBackbone, create_model, save_model, train_classifier

TRAIN = DNFTrainConfig(epochs=2, batch_size=128, ood_batch_size=64)
OOD = OODConfig(kind="noise")


@lru_cache(maxsize=1)
def victim_state() -> dict[str, torch.Tensor]:
    d = mnist_splits()
    torch.manual_seed(0)
    net = create_model("lenet5")
    train_classifier(net, d.train.x[:1500], d.train.targets[:1500], epochs=2, seed=0)
    return net.state_dict()


def victim() -> StagedBackbone:
    net = create_model("lenet5")
    net.load_state_dict(victim_state())
    return net.eval()


def data() -> DefenderData:
    d = mnist_splits()
    return DefenderData(d.train.x[:512], d.train.targets[:512], d.val.x, d.val.targets, 10, dataset="mnist")


@lru_cache(maxsize=1)
def trained_heads() -> dict[str, torch.Tensor]:
    dnf = DNF(victim(), seed=0, dataset="mnist")
    dnf.fit(data(), TRAIN)
    return {k: v.clone() for k, v in dnf.net.state_dict().items()}


def trained(thresholds: float) -> DNF:
    dnf = DNF(victim(), seed=0, dataset="mnist")
    dnf.net.load_state_dict(trained_heads())
    dnf.set_thresholds([thresholds] * (dnf.num_exits - 1))
    return dnf


def accuracy(dnf: DNF, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((dnf.net.forward_dynamic(x)[0].argmax(1) == y).float().mean())


@pytest.mark.parametrize("budget", [0.5, 2.0])
def test_the_budget_guard_keeps_accuracy_within_the_budget_and_answers_early(budget: float) -> None:
    d = data()
    loose = trained(0.3)  # low thresholds: many early answers, many of them wrong
    victim_acc = float((loose.victim(d.x_val).argmax(1) == d.y_val).float().mean())
    assert accuracy(loose, d.x_val, d.y_val) < victim_acc - budget / 100  # the guard has work to do
    strict, budgeted = trained(0.3), trained(0.3)
    zero = guard_utility(strict, d.x_val, d.y_val)
    res = guard_utility(budgeted, d.x_val, d.y_val, max_utility_drop=budget)
    acc = accuracy(budgeted, d.x_val, d.y_val)
    assert res.victim_val_acc == pytest.approx(victim_acc) and res.val_acc == pytest.approx(acc)
    assert victim_acc - budget / 100 - 1e-6 <= acc
    assert all(a >= b for a, b in zip(res.after, res.before, strict=True))  # thresholds only go up
    assert all(a <= z for a, z in zip(res.after, zero.after, strict=True))  # never stricter than zero tolerance
    early = lambda dnf: float((dnf.net.forward_dynamic(d.x_val)[1] < dnf.num_exits - 1).float().mean())  # noqa: E731
    assert early(budgeted) > early(strict)
    assert zero.max_utility_drop == 0 and zero.val_acc is None


def test_a_larger_budget_never_answers_later() -> None:
    d = data()
    shares = []
    for budget in (0.0, 0.5, 2.0, 10.0):
        dnf = trained(0.3)
        guard_utility(dnf, d.x_val, d.y_val, max_utility_drop=budget)
        shares.append(float(dnf.net.forward_dynamic(d.x_val)[1].float().mean()))
    assert shares == sorted(shares, reverse=True)


def test_budget_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"max_utility_drop .* must be in \[0, 100\], got -1"):
        ProtectConfig(max_utility_drop=-1)
    with pytest.raises(ConfigError, match="not both"):
        guard_utility(trained(0.5), data().x_val, data().y_val, max_harm=2, max_utility_drop=0.5)
    assert ProtectConfig().max_utility_drop == 0.5


def test_zero_budget_saves_the_record_of_the_zero_tolerance_guard(tmp_path: Path) -> None:
    cfg = dict(train=TRAIN, ood=OOD, min_ood_exit0=0.0, max_attempts=1)
    a = protect(victim(), data(), ProtectConfig(**cfg, max_utility_drop=0.0), out=tmp_path / "a")
    # the zero-tolerance guard by hand on the same training gives the same thresholds
    b = DNF(victim(), seed=0, dataset="mnist")
    b.fit(data(), TRAIN, ood=NoiseOOD((1, 28, 28)))
    guard_utility(b, data().x_val, data().y_val, max_harm=0)
    assert a.thresholds == b.thresholds
    meta = json.loads((tmp_path / "a" / "defense.json").read_text())
    assert set(meta["provenance"]["guard"]) == {"before", "after", "max_harm"}  # the record's older form
    c = protect(victim(), data(), ProtectConfig(**cfg, max_utility_drop=1.0), out=tmp_path / "c")
    guard = json.loads((tmp_path / "c" / "defense.json").read_text())["provenance"]["guard"]
    assert guard["max_utility_drop"] == 1.0 and guard["val_acc"] >= guard["victim_val_acc"] - 0.01 - 1e-6
    assert load_defense(tmp_path / "c").provenance == c.provenance
    assert Provenance.from_json(meta["provenance"]) == a.provenance


def test_cli_refuses_a_negative_budget_before_anything_is_written(tmp_path: Path) -> None:
    victim_dir = save_model(victim(), tmp_path / "victim")
    out = tmp_path / "dnf"
    res = CliRunner().invoke(app, ["protect", str(victim_dir), "--out", str(out), "--max-utility-drop", "-1"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "max_utility_drop (points of ID validation accuracy) must be in [0, 100], got -1.0" in res.output
    assert not out.exists()


@pytest.mark.parametrize("kind", ["vib", "plain"])
@pytest.mark.parametrize("hidden", [None, 8])
def test_scaling_a_head_scales_its_logits(kind: str, hidden: int | None) -> None:
    from fortress.defenses.dnf.calibration import scale_head
    from fortress.exits.heads import ExitHead

    torch.manual_seed(0)
    head = ExitHead((4, 3, 3), 5, kind=kind, hidden=hidden).eval()  # type: ignore[arg-type]
    h = torch.randn(6, 4, 3, 3)
    before = head(h).logits
    scale_head(head, 0.25)
    torch.testing.assert_close(head(h).logits, 0.25 * before)


def test_calibration_fits_exits_from_one_on_and_is_recorded(tmp_path: Path) -> None:
    from fortress.defenses.dnf.calibration import calibrate_exits, fit_temperature

    d = data()
    dnf = trained(0.9)
    before = dnf.net.forward_all(d.x_val).logits
    temps = calibrate_exits(dnf, d.x_val, d.y_val)
    after = dnf.net.forward_all(d.x_val).logits
    assert temps[0] == 1.0 and all(t != 1.0 for t in temps[1:])
    torch.testing.assert_close(after[0], before[0])  # exit 0 and the final exit are left alone
    torch.testing.assert_close(after[-1], before[-1])
    for j in range(1, dnf.num_exits - 1):
        torch.testing.assert_close(after[j], before[j] / temps[j], rtol=1e-4, atol=1e-5)
        assert torch.equal(after[j].argmax(1), before[j].argmax(1))
        nll = torch.nn.functional.cross_entropy
        assert nll(after[j], d.y_val) <= nll(before[j], d.y_val)
        again = fit_temperature(after[j], d.y_val)  # a second fit finds (almost) nothing left to gain
        assert nll(after[j] / again, d.y_val) >= nll(after[j], d.y_val) - 1e-3
    with pytest.raises(ConfigError, match="calibrate_from must be >= 1"):
        ProtectConfig(calibrate_from=0)
    cfg = dict(train=TRAIN, ood=OOD, min_ood_exit0=0.0, max_attempts=1)
    made = protect(victim(), data(), ProtectConfig(**cfg, calibrate_from=1), out=tmp_path / "c")
    assert made.provenance is not None and made.provenance.temperatures is not None
    loaded = load_defense(tmp_path / "c")
    assert isinstance(loaded, DNF) and loaded.provenance == made.provenance
    torch.testing.assert_close(loaded.net.forward_all(d.x_val).logits, made.net.forward_all(d.x_val).logits)


def test_early_id_exits_apply_only_with_a_budget() -> None:
    from fortress.defenses.dnf.recipe import effective

    zero = ProtectConfig(max_utility_drop=0.0)
    assert effective(zero) is zero  # a zero budget is today's recipe
    off = ProtectConfig(early_id_exits=False)
    assert effective(off) is off
    on = effective(ProtectConfig())
    w = on.train.weights
    assert (w.id_kl_until, w.id_confident_from, w.distill, on.calibrate_from) == (1, 1, 1.0, 1)
    custom = ProtectConfig(train=DNFTrainConfig(weights=dataclasses.replace(w, id_kl_until=2, distill=0.3)))
    kept = effective(custom).train.weights
    assert (kept.id_kl_until, kept.distill) == (2, 0.3)  # values set by hand are kept


def test_training_records_written_without_the_new_loss_options_at_their_paper_values() -> None:
    plain = DNFTrainConfig().as_dict()["weights"]
    assert not {"id_confident_from", "distill", "id_kl_until"} & set(plain)
    set_ = DNFTrainConfig(weights=dataclasses.replace(DNFTrainConfig().weights, distill=0.5)).as_dict()["weights"]
    assert set_["distill"] == 0.5 and "id_kl_until" not in set_
