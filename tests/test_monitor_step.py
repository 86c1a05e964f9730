"""The ``step`` monitor (JBDA's small answer-moving steps), its calibration and its place in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.monitor import MONITORS, AnyOf, Step, StepCalibration, calibrate_step, create_monitor
from fortress.monitor.benign import shifted
from fortress.monitor.step import WindowSteps, step_pairs
from helpers import blob_images, sharp_random_dnf


def _answer(x: torch.Tensor) -> torch.Tensor:
    """A fixed answer: softmax of 10 seeded random projections (a sign step moves it ~45x more than noise)."""
    w = torch.randn(x[0].numel(), 10, generator=torch.Generator().manual_seed(0))
    return torch.softmax((x.flatten(1) - 0.5) @ w / x[0].numel() ** 0.5, dim=1)


def _sign_steps(x: torch.Tensor, seed: int, step: float = 0.1) -> torch.Tensor:
    """JBDA's augmentation in miniature: every image moved ±step along the sign of the answer's gradient
    toward a seeded random class (JBDA-TR's target), which moves the answer."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 10, (x.shape[0],), generator=g)
    x = x.detach().clone().requires_grad_(True)
    torch.log(_answer(x))[torch.arange(x.shape[0]), target].sum().backward()
    assert x.grad is not None
    return (x + step * x.grad.sign()).clamp(0, 1).detach()


def _feed(mon: Step, key: str, x: torch.Tensor, batch: int = 32) -> None:
    for i in range(0, x.shape[0], batch):
        mon.observe(key, x[i : i + batch], _answer(x[i : i + batch]), None)


def test_step_pairs_tell_sign_steps_from_resends_brightness_changes_and_other_images() -> None:
    cal = StepCalibration(threshold=0.1)
    x = blob_images(64, 0).flatten(1)
    p = _answer(x.view(-1, 1, 28, 28))

    def pairs(new: torch.Tensor) -> torch.Tensor:
        return step_pairs(new, x, _answer(new.view(-1, 1, 28, 28)), p, cal)

    assert pairs(_sign_steps(x, 1)).float().mean() > 0.9  # small, structured, answer-moving
    assert not pairs(x.clone()).any()  # a resend
    assert not pairs((x * 1.1 + 0.05).clamp(0, 1)).any()  # brightness and contrast: affine in the pixels
    assert not pairs(blob_images(64, 5).flatten(1)).any()  # other images: far in ℓ∞


def test_a_key_of_steps_is_flagged_and_one_of_natural_resends_is_not() -> None:
    cal = StepCalibration(threshold=0.1, min_queries=50)
    seeds = blob_images(100, 0)
    attack = torch.cat([seeds, _sign_steps(seeds, 1), _sign_steps(_sign_steps(seeds, 1), 2)])  # two rounds
    mon = Step(cal)
    _feed(mon, "attacker", attack)
    v = mon.verdict("attacker")
    assert v.flagged and 100 < (v.flagged_at or 0) <= 160 and v.score > 0.5
    g = torch.Generator().manual_seed(3)
    benign = torch.cat([shifted(seeds, kind, g) for kind in ("replay", "noise", "brightness", "shift-rotate")])
    _feed(mon, "user", benign[torch.randperm(400, generator=g)])
    assert not mon.verdict("user").flagged and mon.verdict("user").score < 0.05
    mon.reset("attacker")
    assert mon.verdict("attacker").queries == 0


def test_memory_bounds_what_a_key_keeps_and_state_round_trips_the_counts() -> None:
    mon = Step(StepCalibration(threshold=0.1, min_queries=10), memory=35)
    seeds = blob_images(40, 0)
    late_first = torch.cat([seeds[20:], seeds[:20]])  # the last 20 seeds' steps first, then the first 20's
    _feed(mon, "k", torch.cat([seeds, _sign_steps(late_first, 1)]), batch=10)
    assert mon._keys["k"].filled == 35
    # the first 20 seeds left the memory before their steps came: only the other 20 count
    assert 15 <= mon._keys["k"].steps <= 22
    other = Step(StepCalibration(threshold=0.1))
    other.restore("k", json.loads(json.dumps(mon.state("k"))))
    assert other.verdict("k") == mon.verdict("k")
    _feed(other, "k", _sign_steps(seeds[:10], 3), batch=10)  # a restored key keeps counting from its counts
    assert other.verdict("k").queries == 90


def test_bad_batches_and_settings_are_refused_by_name() -> None:
    mon = Step(StepCalibration(threshold=0.1))
    with pytest.raises(InvalidInput, match=r"\(B, C, H, W\)"):
        mon.observe("k", torch.rand(4, 784), torch.rand(4, 10), None)
    with pytest.raises(ConfigError, match="neighbours"):
        Step(StepCalibration(threshold=0.1), neighbours=0)
    with pytest.raises(ConfigError, match="unknown step rule"):
        calibrate_step(_answer, blob_images(20, 0), radius=0.2, lambda_=0.1)
    with pytest.raises(ConfigError, match="alpha"):
        calibrate_step(_answer, blob_images(20, 0), alpha=0.0)


def test_calibration_covers_every_scenario_respects_the_floor_and_round_trips(tmp_path: Path) -> None:
    x = blob_images(60, 0)
    cal = calibrate_step(_answer, x, variants=3, horizon=200, streams=20, min_queries=20, floor=0.1, seed=1, windows=2)
    assert len(cal.per_scenario) == 15 and all(0.0 <= v <= 1.0 for v in cal.per_scenario.values())
    assert cal.threshold == max(0.1, *cal.per_scenario.values())
    again = calibrate_step(
        _answer, x, variants=3, horizon=200, streams=20, min_queries=20, floor=0.1, seed=1, windows=2
    )
    assert again == cal  # seeded, the simulated benign windows too
    assert cal.window_threshold == max(0.02, *cal.window_per_scenario.values())
    path = cal.save(tmp_path / "step.json")
    assert StepCalibration.load(path) == cal
    (tmp_path / "bad.json").write_text(json.dumps({"monitor": "dadd"}))
    with pytest.raises(ArtifactError, match="step calibration"):
        StepCalibration.load(tmp_path / "bad.json")


def test_step_is_registered_needs_its_calibration_and_joins_a_union_through_a_bundle(tmp_path: Path) -> None:
    assert "step" in MONITORS
    with pytest.raises(ConfigError, match="--step"):
        create_monitor("step")
    StepCalibration(threshold=0.2).save(tmp_path / "b.step.json")
    bundle = tmp_path / "b.json"
    bundle.write_text(json.dumps({"monitor": "bundle", "members": {"step": "b.step.json"}}))
    made = create_monitor("step+prada", calibration=bundle)
    assert isinstance(made, AnyOf) and isinstance(made.members[0], Step) and made.members[0].threshold == 0.2


def test_the_closed_loop_with_step_degrades_a_stepping_key() -> None:
    from fortress.monitor.calibrate import dadd_from_defense
    from fortress.monitor.closed_loop import LoopCalibration, LoopConfig, closed_loop
    from fortress.monitor.exit_sprt import calibrate_from_defense

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])  # every query at the last exit: only the pairs can tell
    train, val = blob_images(300, 0), blob_images(100, 1)
    cals = LoopCalibration(
        calibrate_from_defense(dnf, val, simulations=50),
        dadd_from_defense(dnf, train, val, variants=2, horizon=200, streams=20, min_queries=50),
        StepCalibration(threshold=0.1, min_queries=50, min_change=0.0),
    )
    guarded = closed_loop(dnf, LoopConfig(monitor="step"), cals, budget=300)
    g = torch.Generator().manual_seed(2)
    seeds = torch.rand(100, 1, 28, 28, generator=g)  # far apart from each other in ℓ∞
    for _k in range(3):  # the seeds, then two rounds of ±0.1 steps (min_change 0: any answer counts)
        guarded.respond(seeds)
        seeds = (seeds + 0.1 * (torch.randint(0, 2, seeds.shape, generator=g) * 2 - 1)).clamp(0, 1)
    rec = guarded.records()
    assert rec["keys_flagged"] == 1 and rec["flags"][0]["by"] == "step" and 100 < rec["flags"][0]["query"] <= 200
    with pytest.raises(ConfigError, match="calibrations hold none"):
        closed_loop(dnf, LoopConfig(monitor="step"), LoopCalibration(cals.exit_sprt, cals.dadd), budget=10)


def test_steps_spread_over_many_keys_are_caught_across_the_window() -> None:
    from fortress.monitor.closed_loop import KeyPlan, Monitored

    dnf = sharp_random_dnf()
    cal = StepCalibration(threshold=0.1, min_queries=50, min_change=0.0)
    per_key = Step(cal)  # what each key alone shows: too few queries, and parents on other keys
    guarded = Monitored(dnf, monitor=per_key, population_step=WindowSteps(cal), plan=KeyPlan(keys=10, per_key=30))
    g = torch.Generator().manual_seed(4)
    seeds = torch.rand(100, 1, 28, 28, generator=g)
    for _round in range(3):  # 300 queries round-robin over 10 keys, batches of 20: a parent and its step differ in key
        for i in range(0, 100, 20):
            guarded.respond(seeds[i : i + 20])
        seeds = (seeds + 0.1 * (torch.randint(0, 2, seeds.shape, generator=g) * 2 - 1)).clamp(0, 1)
    rec = guarded.records()
    assert all(not per_key.verdict(f"key-{k}").flagged for k in range(10))
    assert rec["keys_flagged"] >= 8 and {f["by"] for f in rec["flags"]} == {"population-step"}
    assert 100 < guarded.first_flag() <= 200  # after the first round of steps began
    assert guarded.hparams()["population_step"] is True


def test_the_window_credits_the_keys_others_step_from_and_never_a_benign_key() -> None:
    cal = StepCalibration(threshold=0.1, min_queries=10, min_change=0.0)
    ws = WindowSteps(cal)
    g = torch.Generator().manual_seed(5)
    parents, benign = torch.rand(40, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g)
    zero, one = torch.eye(4)[[0] * 40], torch.eye(4)[[1] * 40]
    assert ws.add("seeds", 0.0, parents, zero) == []
    assert ws.add("benign", 0.0, benign, zero) == []  # other images: no step of anything
    sign = torch.randint(0, 2, parents.shape, generator=g) * 2 - 1
    steps = (parents + 0.1 * sign).clamp(0, 1)
    # the stepping key sent the steps, the seeds' key their parents: both contribute; the benign key does not
    assert sorted(ws.add("stepper", 0.0, steps, one)) == ["seeds", "stepper"]
    assert ws.share("seeds") == 1.0 and ws.share("stepper") == 1.0 and ws.share("benign") == 0.0
    # steps between a key's own queries count once (the key sent both)
    solo = WindowSteps(cal)
    solo.add("k", 0.0, torch.cat([parents, steps]), torch.cat([zero, one]))
    assert solo.share("k") == 0.5


def test_the_window_flags_steps_from_other_keys_below_the_per_key_threshold() -> None:
    # the per-key threshold (0.5) is out of reach; the cross-key one (0.05) is not
    cal = StepCalibration(threshold=0.5, min_queries=20, min_change=0.0, window_threshold=0.05)
    g = torch.Generator().manual_seed(6)
    parents = torch.rand(40, 1, 8, 8, generator=g)
    zero, one = torch.eye(4)[[0] * 40], torch.eye(4)[[1] * 40]
    steps = (parents + 0.1 * (torch.randint(0, 2, parents.shape, generator=g) * 2 - 1)).clamp(0, 1)
    ws = WindowSteps(cal)
    for k in range(4):  # 160 queries of fresh images on four keys: no steps
        assert ws.add(f"seeds-{k}", 0.0, torch.rand(40, 1, 8, 8, generator=g), zero) == []
    assert ws.add("seeds", 0.0, parents, zero) == []
    assert ws.add("benign", 0.0, torch.rand(40, 1, 8, 8, generator=g), zero) == []
    got = ws.add("stepper", 0.0, steps[:20], one[:20])  # 20 cross-key steps in 260 queries: 0.077 > 0.05
    assert sorted(got) == ["seeds", "stepper"]
    assert ws.flagged_at(0.0) == 240 + 13  # the 13th step makes 13 / 253 > 0.05 (12 / 252 is not)
    assert ws.share("stepper", cross=True) == 1.0 and ws.share("seeds", cross=True) == 0.5
    assert ws.share("benign", cross=True) == 0.0 and ws.evidence("stepper") == (1.0, 0.05)
    # the same steps between one key's own queries are no cross-key steps: the window stays unflagged
    solo = WindowSteps(cal)
    for k in range(5):
        solo.add(f"other-{k}", 0.0, torch.rand(40, 1, 8, 8, generator=g), zero)
    assert solo.add("k", 0.0, torch.cat([parents, steps[:20]]), torch.cat([zero, one[:20]])) == []
    assert solo.share("k", cross=True) == 0.0 and solo.flagged_at(0.0) is None
    # a calibration from before the cross-key test (no window_threshold) keeps only the all-steps test
    old = WindowSteps(StepCalibration(threshold=0.5, min_queries=20, min_change=0.0))
    old.add("seeds", 0.0, parents, zero)
    assert old.add("stepper", 0.0, steps[:20], one[:20]) == [] and old.flagged_at(0.0) is None


def test_the_window_calibration_counts_distinct_users_whose_images_are_steps_of_each_other() -> None:
    x = blob_images(60, 0)
    plain = calibrate_step(_answer, x, variants=3, horizon=200, streams=20, min_queries=20, windows=5, seed=1)
    assert set(plain.window_per_scenario) == set(plain.per_scenario) and plain.window_keys == [10, 100]
    assert plain.window_threshold == max(0.02, *plain.window_per_scenario.values())
    # half the held-out images are sign steps of the other half: users holding a parent and its step
    # make cross-key steps, and the calibrated cross-key threshold rises above the floor
    twins = torch.cat([x[:30], _sign_steps(x[:30], 3)])
    cal = calibrate_step(_answer, twins, variants=3, horizon=200, streams=20, min_queries=20, windows=5, seed=1)
    assert cal.window_threshold is not None and cal.window_threshold > 0.02
    assert max(cal.window_per_scenario.values()) > max(plain.window_per_scenario.values())
    assert calibrate_step(_answer, x, variants=3, horizon=200, streams=20, window_keys=()).window_threshold is None
    with pytest.raises(ConfigError, match="window_keys"):
        calibrate_step(_answer, x, window_keys=(1,))
