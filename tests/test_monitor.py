"""Extraction monitors: CUSUM math against a naive loop, calibrated false-positive rate on ID-like
exit streams, fast flags on shifted streams, PRADA on normal vs. crafted query streams, profile
moments equal to torch's over the whole stream, persistence and the server-side responses."""

from __future__ import annotations

import http.server
import json
import logging
import queue
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from fortress.errors import ArtifactError, ConfigError, InvalidInput, UnknownComponent
from fortress.monitor import (
    MONITORS,
    ExitCalibration,
    ExitSPRT,
    KeyProfile,
    Prada,
    ProfileStore,
    Response,
    calibrate_exit_sprt,
    create_monitor,
)
from fortress.monitor.exit_sprt import conservative_exit_probs, cusum, exit_llr
from fortress.monitor.service import Watch
from fortress.monitor.store import ProfileRecord

ID_P = torch.tensor([0.002, 0.003, 0.005, 0.99])  # an ID exit profile: almost everything at the last exit


def _stream(p: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def _probs(n: int, k: int = 10) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), dim=1)


@pytest.fixture(scope="module")
def calibration() -> ExitCalibration:
    return calibrate_exit_sprt(_stream(ID_P, 5000, 0), 4, alpha=0.05, horizon=1000, simulations=400, seed=0)


def test_cusum_equals_naive_recursion() -> None:
    x = torch.randn(3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    start = torch.tensor([0.0, 2.5, 7.0], dtype=torch.float64)
    fast = cusum(x, start)
    for r in range(3):
        s = float(start[r])
        for t in range(200):
            s = max(0.0, s + float(x[r, t]))
            assert fast[r, t].item() == pytest.approx(s, abs=1e-9)


def test_llr_signs_and_conservative_probs() -> None:
    counts = torch.tensor([0, 1, 5, 994])
    llr = exit_llr(counts, 0.1)
    assert (llr[:3] > 0).all() and llr[3] < 0  # early exits are evidence of an attack
    p = conservative_exit_probs(counts, llr, 0.95)
    assert float(p.sum()) == pytest.approx(1.0)
    smoothed = (counts + 0.5) / (counts.sum() + 2.0)
    assert (p[:3] > smoothed[:3]).all()  # rarer-than-measured is not assumed


def test_calibrated_false_positive_rate_on_id_streams(calibration: ExitCalibration) -> None:
    flagged = 0
    for seed in range(200):
        mon = ExitSPRT(calibration)
        ex = _stream(ID_P, 1000, 100 + seed)
        flagged += mon.observe("k", torch.zeros(1000, 1, 1, 1), _probs(1000), ex).flagged
    assert flagged / 200 <= calibration.alpha + 0.03  # alpha = 5 %, binomial slack for 200 keys


def test_shifted_stream_flagged_quickly(calibration: ExitCalibration) -> None:
    mon = ExitSPRT(calibration)
    attack_p = torch.tensor([0.6, 0.1, 0.1, 0.2])
    v = mon.observe("a", torch.zeros(500, 1, 1, 1), _probs(500), _stream(attack_p, 500, 7))
    assert v.flagged and v.flagged_at is not None and v.flagged_at <= 50


def test_flag_position_independent_of_batching(calibration: ExitCalibration) -> None:
    ex = torch.cat([_stream(ID_P, 300, 3), _stream(torch.tensor([0.5, 0.2, 0.1, 0.2]), 300, 4)])
    whole = ExitSPRT(calibration).observe("k", torch.zeros(600, 1, 1, 1), _probs(600), ex)
    parts = ExitSPRT(calibration)
    for i in range(0, 600, 37):
        v = parts.observe("k", torch.zeros(len(ex[i : i + 37]), 1, 1, 1), _probs(len(ex[i : i + 37])), ex[i : i + 37])
    assert whole.flagged_at == v.flagged_at and whole.score == pytest.approx(v.score)
    assert whole.flagged_at is not None and whole.flagged_at > 300  # not before the shift


def test_exit_sprt_state_roundtrip_and_errors(calibration: ExitCalibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "cal.json")
    mon = create_monitor("exit-sprt", calibration=path)
    assert isinstance(mon, ExitSPRT) and mon.threshold == calibration.threshold
    mon.observe("k", torch.zeros(10, 1, 1, 1), _probs(10), torch.zeros(10, dtype=torch.long))
    other = ExitSPRT(ExitCalibration.load(path))
    state = mon.state("k")
    assert state is not None
    other.restore("k", state)
    assert other.verdict("k") == mon.verdict("k")
    with pytest.raises(InvalidInput, match="exits"):
        mon.observe("k", torch.zeros(2, 1, 1, 1), _probs(2), None)
    with pytest.raises(InvalidInput, match=r"\[0, 4\)"):
        mon.observe("k", torch.zeros(1, 1, 1, 1), _probs(1), torch.tensor([4]))
    with pytest.raises(ConfigError, match="calibration file"):
        create_monitor("exit-sprt")
    with pytest.raises(UnknownComponent, match="exit-sprt, prada"):
        create_monitor("nope")
    with pytest.raises(ConfigError, match="alpha"):
        calibrate_exit_sprt(torch.zeros(10, dtype=torch.long), 4, alpha=1.5)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ArtifactError, match="calibrate"):
        ExitCalibration.load(tmp_path / "bad.json")
    assert MONITORS.names() == ["dadd", "exit-sprt", "prada", "step"]


def test_calibration_is_seeded() -> None:
    ex = _stream(ID_P, 2000, 0)
    a = calibrate_exit_sprt(ex, 4, horizon=500, simulations=100, seed=3)
    b = calibrate_exit_sprt(ex, 4, horizon=500, simulations=100, seed=3)
    assert a.threshold == b.threshold


def test_prada_natural_vs_crafted_streams() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.rand(10, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (600,), generator=gen)
    natural = (centers[labels] + 0.15 * torch.randn(600, 1, 8, 8, generator=gen)).clamp(0, 1)
    probs = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    nat = Prada().observe("n", natural, probs, None)
    assert nat.queries == 600 and not nat.flagged and nat.score >= 0.9
    # crafted: small steps from a few seeds (JBDA-like), so most distances are tiny and a few huge
    seeds = torch.rand(5, 1, 8, 8, generator=gen)
    steps = seeds[torch.arange(600) % 5] + 0.002 * torch.randn(600, 1, 8, 8, generator=gen).cumsum(0)
    crafted = steps.clamp(0, 1)
    adv = Prada().observe("a", crafted, probs, None)
    assert adv.flagged and adv.flagged_at is not None and adv.flagged_at % 10 == 0 and adv.score < 0.9


def test_prada_flag_survives_a_restart_through_the_ledger(tmp_path: Path) -> None:
    """PRADA's image sets are not persisted, but a flagged key stays flagged across a restart."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (600,), generator=gen)
    probs = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    seeds = torch.rand(5, 1, 8, 8, generator=gen)
    crafted = (seeds[torch.arange(600) % 5] + 0.002 * torch.randn(600, 1, 8, 8, generator=gen).cumsum(0)).clamp(0, 1)
    watch = Watch(tmp_path / "k.db", num_exits=0, monitor=Prada())
    ans = watch.observe("thief", crafted, probs, None)
    assert ans.verdict is not None and ans.verdict.flagged
    watch.close()
    again = Watch(tmp_path / "k.db", num_exits=0, monitor=Prada())
    shown = again.profile("thief")["verdict"]
    assert shown["flagged"] and shown["flagged_at"] == ans.verdict.flagged_at and shown["queries"] == 600
    later = again.observe("thief", crafted[:10], probs[:10], None)
    assert later.verdict is not None and later.verdict.flagged and later.verdict.queries == 610
    again.close()
    with pytest.raises(ArtifactError, match="corrupt PRADA state"):
        Prada().restore("k", {"dim": 64})


def test_prada_batch_split_invariance_and_errors() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(250, 1, 6, 6, generator=gen)
    p = _probs(250, 4)
    whole = Prada().observe("k", x, p, None)
    parts = Prada()
    for i in range(0, 250, 33):
        v = parts.observe("k", x[i : i + 33], p[i : i + 33], None)
    assert v.score == pytest.approx(whole.score) and v.flagged_at == whole.flagged_at
    with pytest.raises(InvalidInput, match="must agree"):
        Prada().observe("k", x[:3], p[:2], None)
    with pytest.raises(ConfigError, match="delta"):
        Prada(delta=1.5)


def test_profile_welford_equals_torch_over_stream() -> None:
    prof = KeyProfile(num_exits=3)
    allp, alle = [], []
    for i, b in enumerate((1, 7, 64, 3, 200)):
        p = torch.softmax(torch.randn(b, 5, generator=torch.Generator().manual_seed(i)) * 3, dim=1)
        e = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(50 + i))
        prof.update(p, e)
        allp.append(p)
        alle.append(e)
    p, e = torch.cat(allp).double(), torch.cat(alle)
    ent = -(p * p.log()).sum(1)
    conf = p.amax(1)
    assert prof.queries == 275 and prof.exit_counts == torch.bincount(e, minlength=3).tolist()
    assert prof.entropy.mean == pytest.approx(float(ent.mean()), abs=1e-12)
    assert prof.entropy.var == pytest.approx(float(ent.var(correction=0)), abs=1e-12)
    assert prof.confidence.mean == pytest.approx(float(conf.mean()), abs=1e-12)
    assert prof.confidence.var == pytest.approx(float(conf.var(correction=0)), abs=1e-12)
    again = KeyProfile.from_dict(prof.as_dict())
    assert again.as_dict() == prof.as_dict()
    with pytest.raises(InvalidInput, match=r"\[0, 3\)"):
        prof.update(_probs(2, 5), torch.tensor([0, 3]))


def test_profile_store_adds_batches_and_keeps_flags(tmp_path: Path) -> None:
    """Each record adds its batch (never overwrites); a stored flag stays until a reset, which bumps the epoch."""
    p1, p2 = _probs(3, 4), _probs(5, 4)
    e1, e2 = torch.tensor([0, 1, 1]), torch.tensor([1, 1, 1, 0, 0])
    a, b = KeyProfile(num_exits=2), KeyProfile(num_exits=2)
    a.update(p1, e1)
    b.update(p2, e2)
    store = ProfileStore(tmp_path / "keys.db")
    store.save(ProfileRecord("k", a, monitor="exit-sprt", state={"s": 1.5}))
    store.save(ProfileRecord("k", b, monitor="exit-sprt", state={"s": 2.5}, flagged_at=4))
    store.save(ProfileRecord("k", a, monitor="exit-sprt", state={"s": 3.0}))  # later batches never clear a flag
    store.close()
    store = ProfileStore(tmp_path / "keys.db")
    rec = store.load("k")
    whole = KeyProfile(num_exits=2)
    whole.update(torch.cat([p1, p2, p1]), torch.cat([e1, e2, e1]))
    assert rec is not None and rec["flagged_at"] == 4 and rec["state"] == {"s": 3.0} and rec["epoch"] == 0
    got = KeyProfile.from_dict(rec["profile"])
    assert got.queries == 11 and got.exit_counts == whole.exit_counts == [4, 7]
    assert got.entropy.mean == pytest.approx(whole.entropy.mean) and got.entropy.var == pytest.approx(whole.entropy.var)
    assert got.confidence.var == pytest.approx(whole.confidence.var)
    assert store.clear_flag("k") and not store.clear_flag("nobody")
    store.save(ProfileRecord("k", a, state={"s": 9.0}, flagged_at=1, epoch=0))  # evidence from before the reset
    rec = store.load("k")
    assert rec is not None and rec["flagged_at"] is None and rec["state"] is None and rec["epoch"] == 1
    assert rec["profile"]["queries"] == 14  # its counts still add up
    assert store.flag("k") == (None, 1) and store.flag("nobody") == (None, 0)
    store.close()


@pytest.mark.parametrize("response", list(Response))
def test_watch_responses(calibration: ExitCalibration, tmp_path: Path, response: Response) -> None:
    from fortress.monitor import Misinformation

    exit0 = (lambda x: torch.full((x.shape[0], 10), 0.1)) if response is Response.DEGRADE_EXIT0 else None
    mis = Misinformation(10, seed=0) if response.relabels else None
    watch = Watch(
        tmp_path / "keys.db",
        num_exits=4,
        monitor=ExitSPRT(calibration),
        response=response,
        exit0=exit0,
        throttle_s_per_query=0.5,
        misinform=mis,
    )
    x, p = torch.zeros(4, 1, 1, 1), _probs(4)
    calm = watch.observe("k", x, p, torch.full((4,), 3))
    assert calm.probs is p and not calm.labels_only and calm.delay_s == 0.0
    attack = torch.zeros(40, dtype=torch.long)
    ans = watch.observe("k", torch.zeros(40, 1, 1, 1), _probs(40), attack)
    assert ans.verdict is not None and ans.verdict.flagged
    assert ans.labels_only == (response is Response.DEGRADE_LABEL)
    assert ans.delay_s == (20.0 if response is Response.THROTTLE else 0.0)
    assert torch.equal(ans.probs, torch.full((40, 10), 0.1)) == (response is Response.DEGRADE_EXIT0)
    # misinform relabels every row; misinform-id only rows answered after exit 0 (these all left at exit 0)
    assert torch.equal(ans.probs, mis(_probs(40)) if response is Response.MISINFORM else ans.probs)
    assert torch.equal(ans.probs, _probs(40)) == (response not in (Response.DEGRADE_EXIT0, Response.MISINFORM))
    late = watch.observe("k", torch.zeros(8, 1, 1, 1), _probs(8), torch.full((8,), 3))
    assert torch.equal(late.probs, mis(_probs(8)) if mis is not None else late.probs)
    watch.close()
    # a fresh Watch over the same file continues the profile and the flag
    again = Watch(tmp_path / "keys.db", num_exits=4, monitor=ExitSPRT(calibration))
    shown = again.profile("k")
    assert shown["profile"]["queries"] == 52 and shown["verdict"]["flagged"]
    assert shown["verdict"]["flagged_at"] == ans.verdict.flagged_at
    again.close()


class _Receiver(http.server.BaseHTTPRequestHandler):
    events: queue.Queue[tuple[str, dict[str, object]]] = queue.Queue()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.events.put((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_alert_webhook_posts_one_event_per_flag(calibration: ExitCalibration, tmp_path: Path) -> None:
    """The alert response POSTs a JSON event to a real local HTTP endpoint, once per flagged key."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        watch = Watch(
            tmp_path / "k.db", num_exits=4, monitor=ExitSPRT(calibration), response=Response.ALERT, webhook=url
        )
        attack = torch.zeros(40, dtype=torch.long)
        first = watch.observe("thief", torch.zeros(40, 1, 1, 1), _probs(40), attack)
        assert first.verdict is not None and first.verdict.flagged
        ctype, event = _Receiver.events.get(timeout=10)
        assert ctype == "application/json"
        assert event["event"] == "key_flagged" and event["key_id"] == "thief"
        assert event["monitor"] == "exit-sprt" and event["response"] == "alert"
        assert event["flagged_at"] == first.verdict.flagged_at and event["flagged"] is True
        watch.observe("thief", torch.zeros(40, 1, 1, 1), _probs(40), attack)  # still flagged: no new event
        with pytest.raises(queue.Empty):
            _Receiver.events.get(timeout=1)
        watch.close()
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_webhook_never_breaks_answers(
    calibration: ExitCalibration, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watch = Watch(
        tmp_path / "k.db",
        num_exits=4,
        monitor=ExitSPRT(calibration),
        response=Response.ALERT,
        webhook=f"http://127.0.0.1:{port}/hook",
    )
    with caplog.at_level(logging.WARNING):
        ans = watch.observe("thief", torch.zeros(40, 1, 1, 1), _probs(40), torch.zeros(40, dtype=torch.long))
        assert ans.verdict is not None and ans.verdict.flagged and ans.probs.shape == (40, 10)
        deadline = time.monotonic() + 10
        while not any("webhook" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any("alert webhook" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
    watch.close()


def test_watch_needs_exit0_for_degrade_exit0(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="degrade-exit0"):
        Watch(tmp_path / "k.db", num_exits=4, response=Response.DEGRADE_EXIT0)


def test_union_flags_at_the_earliest_member_and_round_trips(calibration: ExitCalibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "cal.json")
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=gen)
    probs = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    seeds = torch.rand(5, 1, 8, 8, generator=gen)
    crafted = (seeds[torch.arange(400) % 5] + 0.002 * torch.randn(400, 1, 8, 8, generator=gen).cumsum(0)).clamp(0, 1)
    id_exits = torch.full((400,), 3, dtype=torch.long)  # JBDA-like: ID exits, crafted inputs
    union = create_monitor("exit-sprt+prada", calibration=path)
    alone = Prada().observe("k", crafted, probs, id_exits)
    v = union.observe("k", crafted, probs, id_exits)
    assert alone.flagged and v.flagged and v.flagged_at == alone.flagged_at
    assert not ExitSPRT(calibration).observe("k", crafted, probs, id_exits).flagged
    # early exits: exit-sprt flags first, and the union reports its position
    early = torch.zeros(400, dtype=torch.long)
    first = ExitSPRT(calibration).observe("e", crafted, probs, early)
    assert union.observe("e", crafted, probs, early).flagged_at == first.flagged_at
    state = union.state("e")
    assert state is not None
    other = create_monitor("exit-sprt+prada", calibration=path)
    other.restore("e", state)
    assert other.verdict("e").flagged_at == first.flagged_at
    union.reset("e")
    assert not union.verdict("e").flagged
    with pytest.raises(ConfigError, match="no parameters"):
        create_monitor("exit-sprt+prada", calibration=path, delta=0.5)
    with pytest.raises(UnknownComponent):
        create_monitor("prada+nope")


def test_benign_scenarios_raise_the_exit_sprt_threshold_to_hold_the_rate_in_each() -> None:
    id_exits = torch.full((2000,), 3)
    id_exits[:20] = 0  # 1 % early
    early_users = torch.full((500,), 3)
    early_users[:50] = 0  # a benign sub-population that leaves early 10 % of the time
    plain = calibrate_exit_sprt(id_exits, 4, horizon=1000, simulations=200, seed=0)
    both = calibrate_exit_sprt(id_exits, 4, horizon=1000, simulations=200, seed=0, benign={"class 8": early_users})
    assert plain.per_scenario is None and both.per_scenario is not None
    assert set(both.per_scenario) == {"id", "class 8"}
    assert both.threshold == pytest.approx(max(both.per_scenario.values())) and both.threshold > plain.threshold
    assert both.per_scenario["id"] == pytest.approx(plain.threshold, rel=0.2)  # another stream of draws
    # the early sub-population's keys: flagged under the plain threshold, not under the scenario one
    g = torch.Generator().manual_seed(1)
    keys = early_users[torch.randint(0, 500, (50, 1000), generator=g)]
    flagged = [
        sum(
            ExitSPRT(cal).observe(f"k{i}", torch.zeros(1000, 1, 1, 1), _probs(1000), keys[i]).flagged for i in range(50)
        )
        for cal in (plain, both)
    ]
    assert flagged[0] > 25 and flagged[1] <= 2
    with pytest.raises(InvalidInput, match="benign scenario 'bad'"):
        calibrate_exit_sprt(id_exits, 4, simulations=20, benign={"bad": torch.tensor([5])})


def test_calibrating_from_a_defense_over_shifts_names_every_scenario() -> None:
    from fortress.monitor import calibrate_from_defense
    from helpers import blob_images, sharp_random_dnf

    dnf = sharp_random_dnf()
    cal = calibrate_from_defense(
        dnf, blob_images(200, 0), simulations=50, horizon=500, shifts=("noise", "brightness"), variants=2
    )
    assert cal.per_scenario is not None and "id" in cal.per_scenario
    assert {"replay/uniform", "noise/uniform", "brightness/uniform"} <= set(cal.per_scenario)
    assert cal.threshold == pytest.approx(max(cal.per_scenario.values()))


def test_the_population_early_share_is_the_largest_benign_one_when_scenarios_are_calibrated() -> None:
    id_exits = torch.full((1000,), 3)
    id_exits[:10] = 0
    darker = torch.full((500,), 3)
    darker[:40] = 1  # benign users whose darker images leave early 8 % of the time
    plain = calibrate_exit_sprt(id_exits, 4, simulations=20, horizon=100)
    both = calibrate_exit_sprt(id_exits, 4, simulations=20, horizon=100, benign={"brightness": darker})
    assert plain.benign_early_share is None and plain.early_share == pytest.approx(0.01)
    assert both.early_share == both.benign_early_share == pytest.approx(0.08)
