"""The account-level distribution detector (dadd), benign traffic, the population detector and the closed loop."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fortress.errors import ArtifactError, ConfigError
from fortress.monitor import DADD, MONITORS, AnyOf, DADDCalibration, DADDReference, create_monitor
from fortress.monitor.benign import IMAGE_SHIFTS, benign_streams, owned_stream, shifted
from fortress.monitor.dadd import calibrate_dadd, fit_reference
from fortress.monitor.population import PopulationDrift
from helpers import blob_images

K = F = 4


def _id_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters at 4·e_c, centred over the dimensions (like centred log-probabilities)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, K, (n,), generator=g)
    feats = torch.randn(n, F, generator=g)
    feats[torch.arange(n), cls] += 4.0
    return feats - feats.mean(dim=1, keepdim=True), cls


def _calibration(alpha: float = 0.01) -> DADDCalibration:
    f, c = _id_features(4000, 0)
    ref = fit_reference(f, c, K, feature="logits")
    bank = _id_features(2000, 1)
    return calibrate_dadd(ref, {"replay": bank}, alpha=alpha, horizon=300, streams=100, min_queries=50, seed=0)


def _probs(cls: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(cls, K).float() * 0.9 + 0.1 / K


def _feed(mon: DADD, key: str, feats: torch.Tensor, cls: torch.Tensor, batch: int = 25) -> None:
    for i in range(0, feats.shape[0], batch):
        mon.observe(key, feats[i : i + batch], _probs(cls[i : i + batch]), None)


def test_benign_keys_stay_unflagged_at_about_the_calibrated_rate_and_shifted_ones_are_flagged() -> None:
    cal = _calibration()
    # the same reference read as a feature space: the "images" handed in are the features themselves
    pen = replace(cal, reference=DADDReference("penultimate", cal.reference.means, cal.reference.whiten))
    with pytest.raises(ConfigError, match="needs the victim's feature function"):
        DADD(pen)
    mon = DADD(pen, features=lambda f: f)
    flagged = 0
    for k in range(100):  # fresh benign keys (another seed than the calibration's)
        f, c = _id_features(300, 100 + k)
        _feed(mon, f"b{k}", f, c)
        flagged += mon.verdict(f"b{k}").flagged
    assert flagged <= 5  # alpha = 1 %: 5 of 100 is far in the binomial tail
    f, c = _id_features(300, 7)
    _feed(
        mon, "far", f + torch.tensor([1.5, -1.5, 1.5, -1.5]), c
    )  # every query 1.5 off in each direction: a related but other domain
    v = mon.verdict("far")
    assert v.flagged and v.flagged_at is not None and v.flagged_at <= 60 and v.score > v.threshold


def test_one_class_keys_are_judged_like_any_other() -> None:
    cal = _calibration()
    flagged = 0
    for k in range(40):
        f, c = _id_features(2000, 300 + k)
        sel = c == k % K
        mon = DADD(cal)
        # the "logits" space reads the answers: features are the centred log-probabilities, so feed
        # the monitor probability rows whose logs are the synthetic features
        probs = torch.softmax(f[sel][:300], dim=1)
        for i in range(0, probs.shape[0], 25):
            mon.observe("k", torch.zeros(probs[i : i + 25].shape[0], 1, 2, 2), probs[i : i + 25], None)
        flagged += mon.verdict("k").flagged
    assert flagged <= 4


def test_the_threshold_is_the_largest_scenario_quantile_and_same_seed_same_threshold() -> None:
    f, c = _id_features(3000, 0)
    ref = fit_reference(f, c, K, feature="logits")
    near = _id_features(1000, 1)
    off = (near[0] + 0.5, near[1])
    kw = {"horizon": 200, "streams": 50, "min_queries": 50}
    a = calibrate_dadd(ref, {"replay": near, "shifted": off}, **kw)
    b = calibrate_dadd(ref, {"replay": near, "shifted": off}, **kw)
    assert a.threshold == b.threshold == max(a.per_scenario.values())
    assert set(a.per_scenario) == {
        f"{s}/{m}" for s in ("replay", "shifted") for m in ("uniform", "one-class", "skewed")
    }
    assert a.per_scenario["shifted/uniform"] > a.per_scenario["replay/uniform"]


def test_calibration_round_trips_and_bad_files_are_refused(tmp_path: Path) -> None:
    cal = _calibration()
    path = cal.save(tmp_path / "dadd.json")
    back = DADDCalibration.load(path)
    assert back.threshold == cal.threshold and torch.allclose(back.reference.whiten, cal.reference.whiten)
    (tmp_path / "bad.json").write_text(json.dumps({"monitor": "exit-sprt"}))
    with pytest.raises(ArtifactError, match="not a dadd calibration"):
        DADDCalibration.load(tmp_path / "bad.json")


def test_registry_union_and_bundle(tmp_path: Path) -> None:
    assert "dadd" in MONITORS.names()
    cal = _calibration()
    cal.save(tmp_path / "dadd.json")
    with pytest.raises(ConfigError, match="monitor 'dadd' needs a calibration file"):
        create_monitor("dadd")
    (tmp_path / "bundle.json").write_text(json.dumps({"monitor": "bundle", "members": {"dadd": "dadd.json"}}))
    union = create_monitor("dadd+prada", calibration=tmp_path / "bundle.json")
    assert isinstance(union, AnyOf) and isinstance(union.members[0], DADD)
    (tmp_path / "b2.json").write_text(json.dumps({"monitor": "bundle", "members": {}}))
    with pytest.raises(ArtifactError, match="no entry for monitor 'dadd'"):
        create_monitor("dadd", calibration=tmp_path / "b2.json")


def test_state_round_trip_continues_the_same_evidence() -> None:
    cal = _calibration()
    f, _ = _id_features(200, 9)
    one, two = DADD(cal), DADD(cal)
    p = torch.softmax(f + 1.0, dim=1)
    x = torch.zeros(200, 1, 2, 2)
    one.observe("k", x[:100], p[:100], None)
    two.restore("k", json.loads(json.dumps(one.state("k"))))
    a, b = one.observe("k", x[100:], p[100:], None), two.observe("k", x[100:], p[100:], None)
    assert a.flagged_at == b.flagged_at and a.score == pytest.approx(b.score, rel=1e-5)


@pytest.mark.parametrize("kind", IMAGE_SHIFTS)
def test_benign_shifts_stay_images_and_are_seeded(kind: str) -> None:
    x = torch.rand(16, 1, 28, 28)
    a = shifted(x, kind, torch.Generator().manual_seed(0))
    b = shifted(x, kind, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert (kind == "replay") == torch.equal(a, x)


def test_benign_streams_follow_their_class_mix() -> None:
    labels = torch.arange(1000) % 10
    g = torch.Generator().manual_seed(0)
    one = benign_streams(labels, 5, 200, "one-class", g)
    assert all(labels[row].unique().numel() == 1 for row in one)
    skew = benign_streams(labels, 5, 2000, "skewed", g)
    top = [torch.bincount(labels[row], minlength=10).max().item() / 2000 for row in skew]
    assert all(t > 0.3 for t in top)  # Zipf s = 1.5 over 10 classes: the top class takes ~ 0.48
    # a bank of 4 variants of 250 images: a key of 250 queries sends each image once, as some variant
    uni = benign_streams(labels, 3, 250, "uniform", g, variants=4)
    assert all((row % 250).unique().numel() == 250 for row in uni) and int(uni.max()) >= 250
    with pytest.raises(ConfigError, match="one of uniform, one-class, skewed"):
        benign_streams(labels, 1, 1, "pairs", g)


def test_an_owned_stream_sends_only_its_own_images_as_any_variant() -> None:
    labels = (torch.arange(250) % 10).repeat(4)  # 4 variants of 250 images
    g = torch.Generator().manual_seed(1)
    mine = torch.tensor([3, 17, 42, 99, 200])
    row = owned_stream(labels, mine, 300, "uniform", g, num_classes=10, variants=4)
    assert set((row % 250).tolist()) == set(mine.tolist()) and set((row // 250).tolist()) == {0, 1, 2, 3}
    one = owned_stream(labels, mine, 50, "one-class", g, num_classes=10, variants=4)
    assert labels[one].unique().numel() == 1 and set((one % 250).tolist()) <= set(mine.tolist())
    with pytest.raises(ConfigError, match="at least one image"):
        owned_stream(labels, torch.tensor([], dtype=torch.long), 10, "uniform", g, variants=4)


def test_population_flags_a_sybil_window_and_only_its_contributing_keys() -> None:
    cal = _calibration()
    pop = PopulationDrift(cal, id_early_share=0.0, num_exits=2, window_s=100.0, min_queries=200)
    last = torch.ones(20, dtype=torch.long)
    # window 0: 40 attacker keys of 20 far-off queries each (each too few for a per-key check)
    flag = None
    for k in range(40):
        f, c = _id_features(20, 500 + k)
        flag = pop.add(f"s{k}", 10.0, f + torch.tensor([1.5, -1.5, 1.5, -1.5]), c, last) or flag
    # window 1: 40 benign keys; window 0 also holds 5 benign keys
    for k in range(40):
        f, c = _id_features(20, 900 + k)
        pop.add(f"b{k}", 150.0, f, c, last)
    for k in range(5):
        f, c = _id_features(20, 990 + k)
        pop.add(f"m{k}", 20.0, f, c, last)
    assert flag is not None and flag.by == "features" and flag.queries >= 200
    assert sum(pop.flagged(f"s{k}") for k in range(40)) >= 36
    assert not any(pop.flagged(f"b{k}") for k in range(40))
    assert sum(pop.flagged(f"m{k}") for k in range(5)) <= 1


def test_population_exit_test_sees_early_exits() -> None:
    cal = _calibration()
    pop = PopulationDrift(cal, id_early_share=0.01, num_exits=4, window_s=100.0, min_queries=100)
    f, c = _id_features(200, 3)
    flag = pop.add("k", 1.0, f, c, torch.zeros(200, dtype=torch.long))
    assert flag is not None and "exits" in flag.by and flag.contributing == ("k",)
    with pytest.raises(ConfigError, match="needs both id_early_share and num_exits"):
        PopulationDrift(cal, id_early_share=0.01)


@pytest.mark.parametrize("response", ["degrade-exit0", "misinform", "misinform-id"])
def test_closed_loop_flags_the_attack_key_degrades_only_it_and_records_the_query(response: str) -> None:
    from fortress.monitor import Misinformation, Response
    from fortress.monitor.calibrate import dadd_from_defense
    from fortress.monitor.closed_loop import Monitored
    from fortress.oracle import LocalOracle
    from helpers import sharp_random_dnf

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])  # every query answered at the last exit: only features can tell
    train, val = blob_images(600, 0), blob_images(200, 1)
    cal = dadd_from_defense(dnf, train, val, variants=2, horizon=200, streams=20, min_queries=50)
    guarded = Monitored(dnf, monitor=DADD(cal, features=dnf.victim.penultimate), response=Response(response))
    oracle = LocalOracle(guarded, budget=10_000)
    benign = blob_images(200, 2)
    assert torch.allclose(oracle.query(benign), dnf(benign))  # unflagged: the defense's own answers
    assert guarded.records()["keys_flagged"] == 0
    attack = 1 - blob_images(300, 3)  # inverted blobs: another domain
    got = torch.cat([oracle.query(attack[i : i + 50]) for i in range(0, 300, 50)])
    rec = guarded.records()
    assert rec["keys_flagged"] == 1 and 200 < rec["flags"][0]["query"] <= 300  # after the attack began
    exit0 = torch.softmax(dnf.net.forward_all(attack).mean_logits[0], dim=1)
    if response == "degrade-exit0":
        assert torch.allclose(got[-50:], exit0[-50:], atol=1e-6)  # degraded after the flag
    elif response == "misinform-id":  # relabelled where DNF answered after its first exit, else as served
        out = dnf.respond(attack[-50:])  # every query at the last exit here: all relabelled (the mix: serve test)
        assert out.exits is not None
        late = (out.exits > 0)[:, None]
        want = torch.where(late, Misinformation.for_defense(dnf)(out.probs), out.probs)
        assert torch.allclose(got[-50:], want, atol=1e-6)
    else:
        served = dnf(attack[-50:])
        assert torch.allclose(got[-50:], Misinformation.for_defense(dnf)(served), atol=1e-6)
        assert (got[-50:].argmax(1) != served.argmax(1)).all()  # every label moved off the served one


def test_misinformation_relabels_by_a_seeded_derangement_keyed_to_the_weights() -> None:
    from fortress.monitor import Misinformation
    from fortress.monitor.misinform import derangement, weights_seed
    from helpers import sharp_random_dnf

    p = torch.softmax(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    mis = Misinformation(10, seed=7)
    m = mis(p)
    assert torch.equal(m.sort(1).values, p.sort(1).values)  # the same values, moved
    assert torch.equal(m.argmax(1), mis.perm[p.argmax(1)]) and (m.argmax(1) != p.argmax(1)).all()
    for seed in range(50):  # never a fixed point; same seed, same permutation
        perm = derangement(10, seed)
        assert not (perm == torch.arange(10)).any() and torch.equal(perm, derangement(10, seed))
    assert torch.equal(Misinformation(2, seed=3)(torch.tensor([[0.9, 0.1]])), torch.tensor([[0.1, 0.9]]))
    a, b = sharp_random_dnf(), sharp_random_dnf()
    assert weights_seed(a) == weights_seed(b)  # the same weights: every server process agrees
    with torch.no_grad():
        next(b.victim.parameters()).view(-1)[0] += 1e-3  # other weights: another (secret) seed
    assert weights_seed(a) != weights_seed(b)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        Misinformation(1, seed=0)
    with pytest.raises(ConfigError, match=r"\(B, 10\)"):
        mis(torch.rand(3, 4))


def test_sybil_keys_are_caught_by_the_population_detector() -> None:
    from fortress.monitor.calibrate import dadd_from_defense
    from fortress.monitor.closed_loop import KeyPlan, Monitored
    from fortress.oracle import LocalOracle
    from helpers import sharp_random_dnf

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])
    train, val = blob_images(600, 0), blob_images(200, 1)
    cal = dadd_from_defense(dnf, train, val, variants=2, horizon=200, streams=20, min_queries=50)
    pop = PopulationDrift(cal, window_s=3600.0, min_queries=200)
    guarded = Monitored(dnf, monitor=DADD(cal, features=dnf.victim.penultimate), population=pop, plan=KeyPlan(keys=20))
    oracle = LocalOracle(guarded, budget=10_000)
    attack = 1 - blob_images(400, 3)
    for i in range(0, 400, 20):  # 20 keys × 20 queries: no key reaches dadd's 50 queries
        oracle.query(attack[i : i + 20])
    rec = guarded.records()
    assert rec["keys_flagged"] >= 18 and {f["by"] for f in rec["flags"]} == {"population"}
    assert min(f["query"] for f in rec["flags"]) >= 200


def test_key_plan_splits_batches_over_keys_within_their_budgets() -> None:
    from fortress.monitor.closed_loop import KeyPlan

    plan = KeyPlan(keys=3, per_key=20)
    used = [0, 0, 0]
    pieces, turn = plan.split(50, used, 0)
    assert pieces == [(0, 0, 20), (1, 20, 40), (2, 40, 50)] and used == [20, 20, 10] and turn % 3 == 0
    pieces, _ = plan.split(15, used, turn)
    assert pieces == [(2, 0, 10), (0, 10, 15)]  # the last key fills up; past every budget the next key takes the rest
    burst = KeyPlan(keys=2, mode="bursts", per_key=10)
    assert burst.split(25, [0, 0], 0)[0] == [(0, 0, 10), (1, 10, 20), (1, 20, 25)]


@pytest.mark.parametrize("compute", ["dynamic", "full"])
def test_the_tap_gives_the_victims_features_from_the_answers_own_pass(compute: str) -> None:
    from fortress.monitor.tap import PenultimateTap
    from helpers import sharp_random_dnf

    dnf = sharp_random_dnf()
    dnf.compute = compute
    tap = PenultimateTap(dnf)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # exit 0 takes the more confident half of the rows, the rest go to the end
        conf = torch.softmax(dnf.net.forward_all(x).logits[0], dim=1).amax(dim=1)
    dnf.set_thresholds([float(conf.median()), 1.0, 1.0])
    out = dnf.respond(x)
    assert out.exits is not None and 0 < int((out.exits == 3).sum()) < 64  # a mix of early and final rows
    with torch.inference_mode():
        want = dnf.victim.penultimate(x)
    assert torch.allclose(tap.features(x, out.probs, out.exits), want, atol=1e-6)
    # kept features of another batch are never used for this one
    other = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    dnf.respond(other)
    assert torch.allclose(tap.features(x, out.probs, out.exits), want, atol=1e-6)
