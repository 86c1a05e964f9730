"""The exit-timing channel: padded compute (fortress.serve.timing) and the attacker's experiment
(fortress.bench.timing), down to one small run against the real server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fortress.bench.timing import exit_inference, timing_queries
from fortress.cli import ComputeMode
from fortress.cli import app as cli_app
from fortress.defenses import DNF
from fortress.errors import ConfigError
from fortress.serve import KeyStore
from fortress.serve.app import create_app
from fortress.serve.settings import ServeSettings
from fortress.serve.timing import FullPathClock, PaddedCompute
from helpers import sharp_random_dnf


def tiny_dnf() -> DNF:
    """An untrained LeNet-5 DNF whose sharpened heads send some inputs out early."""
    return sharp_random_dnf()


# -- the padding clock ---------------------------------------------------------------------------
def test_buckets_are_powers_of_two() -> None:
    assert [FullPathClock.bucket(n) for n in (1, 2, 3, 4, 5, 64, 65, 1024)] == [1, 2, 4, 4, 8, 64, 128, 1024]
    with pytest.raises(ConfigError, match="batch size"):
        FullPathClock.bucket(0)


def test_full_path_is_sampled_first_min_samples_then_every_nth() -> None:
    clock = FullPathClock(min_samples=3, sample_every=4)
    picks = []
    for _ in range(12):
        full = clock.wants_full(1)
        picks.append(full)
        if full:
            clock.observe(1, 0.001)
    # three calibration runs, then requests 4 and 8 (counting from 0) of the bucket
    assert picks == [True, True, True, False, True, False, False, False, True, False, False, False]
    assert clock.wants_full(64)  # another bucket calibrates on its own


def test_target_is_the_quantile_of_the_recent_window() -> None:
    rng = np.random.default_rng(0)
    clock = FullPathClock(quantile=0.9, window=50)
    assert clock.target(1) is None and clock.wait_s(1, 0.0) == 0.0
    first = rng.uniform(0.001, 0.002, 50)
    for t in first:
        clock.observe(1, float(t))
    assert clock.target(1) == pytest.approx(np.quantile(first, 0.9))
    slower = rng.uniform(0.010, 0.020, 50)  # load went up: the old times drop out of the window
    for t in slower:
        clock.observe(1, float(t))
    assert clock.target(1) == pytest.approx(np.quantile(slower, 0.9))
    assert clock.target(2) is None  # buckets are separate
    clock.observe(3, 0.5)
    assert clock.target(4) == 0.5


@pytest.mark.parametrize("elapsed", [0.0, 0.003, 0.0149, 0.015, 0.2])
def test_padded_time_never_falls_short_of_the_target(elapsed: float) -> None:
    clock = FullPathClock(quantile=1.0)
    clock.observe(8, 0.015)
    wait = clock.wait_s(8, elapsed)
    assert wait >= 0.0
    assert elapsed + wait >= 0.015 - 1e-12
    assert wait == pytest.approx(max(0.0, 0.015 - elapsed))


@pytest.mark.parametrize("kw", [{"quantile": 0.0}, {"quantile": 1.5}, {"window": 0}, {"sample_every": 0}])
def test_clock_rejects_bad_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        FullPathClock(**kw)  # type: ignore[arg-type]


def test_padded_compute_answers_like_dynamic_and_times_the_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    dnf = tiny_dnf()
    padded = PaddedCompute(dnf, FullPathClock(min_samples=2, sample_every=3))
    calls = {"full": 0, "dynamic": 0}
    real_full, real_dyn = padded.full.respond, dnf.respond

    def count(kind: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(x: torch.Tensor):  # type: ignore[no-untyped-def]
            calls[kind] += 1
            return fn(x)

        return wrapped

    monkeypatch.setattr(padded.full, "respond", count("full", real_full))
    monkeypatch.setattr(padded.defense, "respond", count("dynamic", real_dyn))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for _ in range(8):
        out = padded.respond(x)
        ref = real_dyn(x)
        assert torch.equal(out.exits, ref.exits)  # type: ignore[arg-type]
        torch.testing.assert_close(out.probs, ref.probs)
    assert calls["full"] == 4 and calls["dynamic"] == 4  # 2 calibration runs + the 3rd and 6th request
    assert dnf.compute == "dynamic" and padded.full.compute == "full"  # type: ignore[attr-defined]
    assert padded.clock.target(6) is not None and padded.clock.target(6) > 0


def test_pad_blocks_for_the_difference_only() -> None:
    padded = PaddedCompute(tiny_dnf(), FullPathClock(quantile=1.0))
    padded.pad(1, 0.0)  # no full-path time yet: nothing to pad to
    padded.clock.observe(1, 0.06)
    t0 = time.perf_counter()
    padded.pad(1, 0.02)
    assert time.perf_counter() - t0 >= 0.04
    t0 = time.perf_counter()
    padded.pad(1, 0.5)  # already slower than the full path
    assert time.perf_counter() - t0 < 0.03


def test_padded_compute_needs_a_dynamic_dnf() -> None:
    dnf = tiny_dnf()
    dnf.compute = "full"
    with pytest.raises(ConfigError, match="compute='dynamic'"):
        PaddedCompute(dnf)


def test_padded_server_holds_each_answer_until_the_target(tmp_path: Path) -> None:
    dnf = tiny_dnf()
    keys = tmp_path / "keys.db"
    store = KeyStore(keys, create=True)
    _, secret = store.add("t")
    store.close()
    app = create_app(ServeSettings(tmp_path, keys, compute="padded", profiles=False), defense=dnf)
    svc = app.state.service
    assert svc.padded is not None and dnf.compute == "dynamic"
    svc.padded.clock = FullPathClock(quantile=1.0, min_samples=1, sample_every=10**6)
    svc.padded.clock.observe(1, 0.25)  # as if the full path had taken 250 ms
    body = {"images": np.full((1, 1, 28, 28), 0.5, np.float32).tolist()}
    with TestClient(app) as client:
        for _ in range(3):
            t0 = time.perf_counter()
            r = client.post("/v1/predict", json=body, headers={"X-API-Key": secret})
            assert r.status_code == 200
            assert time.perf_counter() - t0 >= 0.25


def test_settings_and_cli_know_the_padded_mode(tmp_path: Path) -> None:
    assert ServeSettings(tmp_path, tmp_path / "k.db", compute="padded").compute == "padded"
    assert ComputeMode("padded") is ComputeMode.padded
    with pytest.raises(ConfigError, match="'padded'"):
        ServeSettings(tmp_path, tmp_path / "k.db", compute="sometimes")  # type: ignore[arg-type]
    # the padding target's quantile and window reach the server's clock
    settings = ServeSettings(tmp_path, tmp_path / "k.db", compute="padded", pad_quantile=0.9, pad_window=32)
    KeyStore(settings.keys_path, create=True).close()
    svc = create_app(settings, defense=tiny_dnf()).state.service
    assert svc.padded.clock.quantile == 0.9 and svc.padded.clock.window == 32
    with pytest.raises(ConfigError, match="pad_quantile must be in"):
        ServeSettings(tmp_path, tmp_path / "k.db", pad_quantile=0.0)
    with pytest.raises(ConfigError, match="pad_window must be >= 1"):
        ServeSettings(tmp_path, tmp_path / "k.db", pad_window=0)
    with pytest.raises(ConfigError, match="throttle_s_per_query"):
        ServeSettings(tmp_path, tmp_path / "k.db", throttle_s_per_query=-1.0)


# -- the attacker's classifier -------------------------------------------------------------------
def test_separable_latencies_are_inferred_perfectly() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    lat = np.where(y == 0, rng.uniform(0.002, 0.003, 400), rng.uniform(0.004, 0.005, 400))
    res = exit_inference(lat, y, seed=1)
    assert res.accuracy == 1.0 and res.n_train + res.n_test == 400
    y3 = rng.integers(0, 3, 600)  # three exits, three disjoint latency bands: a deeper tree separates them
    lat3 = 0.001 * (1 + y3) + rng.uniform(0, 0.0005, 600)
    assert exit_inference(lat3, y3, max_depth=3).accuracy == 1.0
    assert exit_inference(lat3, y3, max_depth=1).accuracy < 0.8  # one threshold cannot


def test_identical_latency_distributions_give_chance() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(int)
    lat = rng.lognormal(np.log(0.008), 0.3, 2000)  # independent of y
    res = exit_inference(lat, y, seed=0)
    assert res.chance == pytest.approx(0.7, abs=0.04)
    assert abs(res.accuracy - res.chance) < 0.05


def test_exit_inference_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="labels"):
        exit_inference(np.ones(10), np.zeros(9))
    with pytest.raises(ConfigError, match="positive"):
        exit_inference(np.zeros(10), np.zeros(10))


def test_timing_queries_mix_and_seed() -> None:
    x, kinds = timing_queries(40, seed=3)
    assert x.shape == (40, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert kinds.count("id") == 20 and kinds.count("noise") == 10 and kinds.count("patches") == 10
    assert kinds[:20] != sorted(kinds[:20])  # shuffled, so load drift hits every kind alike
    x2, kinds2 = timing_queries(40, seed=3)
    assert torch.equal(x, x2) and kinds == kinds2


# -- end to end: the real server, through the CLI -------------------------------------------------
def test_bench_timing_cli_against_the_real_server(tmp_path: Path) -> None:
    tiny_dnf().save(tmp_path / "dnf")
    out = tmp_path / "timing.json"
    args = ["bench-timing", str(tmp_path / "dnf"), "--queries", "40", "--modes", "dynamic,padded"]
    args += ["--requests", "4", "--batch", "8", "--concurrency", "2", "--json", str(out)]
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 0, res.output
    assert "exit inference from latency" in res.output
    rep = json.loads(out.read_text())
    assert [m["mode"] for m in rep["modes"]] == ["dynamic", "padded"]
    assert sum(rep["exit_hist"]) == 40
    for m in rep["modes"]:
        assert m["errors"] == 0 and m["images_per_s"] > 0
        assert 0 <= m["early"]["accuracy"] <= 1 and m["early"]["n_test"] == 20
        assert sum(v["n"] for v in m["latency_by_exit"].values()) == 40
    bad = CliRunner().invoke(cli_app, ["bench-timing", str(tmp_path / "dnf"), "--modes", "fast"])
    assert bad.exit_code == 1 and "modes must be among" in bad.output
