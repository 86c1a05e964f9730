"""Monitoring in the served API: the admin profile route, its guard, persistence across app
re-creation, and a degrade response that really changes a flagged key's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fortress.cli import app as cli_app
from fortress.defenses import DNF
from fortress.errors import ConfigError
from fortress.monitor import calibrate_exit_sprt
from fortress.serve import KeyStore, ServeSettings, create_app
from fortress.tensors import to_positive_probs
from helpers import blob_images, sharp_random_dnf


@pytest.fixture(scope="module")
def dnf() -> DNF:
    return sharp_random_dnf()  # random heads made confident: queries leave at every exit


def _npy_body(x: torch.Tensor) -> dict[str, str]:
    import base64
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, x.numpy().astype(np.float32))
    return {"npy": base64.b64encode(buf.getvalue()).decode()}


def _settings(tmp: Path, **kw: object) -> ServeSettings:
    # an ID profile that never leaves early: this random DNF's traffic departs from it at once
    cal = calibrate_exit_sprt(torch.full((2000,), 3), 4, horizon=1000, simulations=100, seed=0)
    path = cal.save(tmp / "cal.json")
    return ServeSettings(tmp / "dnf", tmp / "keys.db", monitor="exit-sprt", monitor_calibration=path, **kw)  # type: ignore[arg-type]


def test_profile_route_guard_and_persistence(dnf: DNF, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store = KeyStore(settings.keys_path, create=True)
    user, user_secret = store.add("user")
    _, admin_secret = store.add("ops", admin=True)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with TestClient(create_app(settings, defense=dnf)) as client:
        r = client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": user_secret})
        assert r.status_code == 200
        route = f"/v1/admin/keys/{user.key_id}/profile"
        assert client.get(route, headers={"X-API-Key": user_secret}).status_code == 403
        assert client.get(route).status_code == 401
        assert client.get("/v1/admin/keys/nope/profile", headers={"X-API-Key": admin_secret}).status_code == 422
        body = client.get(route, headers={"X-API-Key": admin_secret}).json()
    with torch.inference_mode():
        exits = dnf.respond(x).exits
    assert exits is not None
    assert body["profile"]["queries"] == 32
    assert body["profile"]["exit_counts"] == torch.bincount(exits, minlength=4).tolist()
    assert body["monitor"] == "exit-sprt" and body["verdict"]["flagged"]
    # a new app over the same ledger continues the profile
    with TestClient(create_app(settings, defense=dnf)) as client:
        client.post("/v1/predict", json=_npy_body(x[:8]), headers={"X-API-Key": user_secret})
        again = client.get(route, headers={"X-API-Key": admin_secret}).json()
    assert again["profile"]["queries"] == 40 and again["verdict"]["flagged_at"] == body["verdict"]["flagged_at"]
    res = CliRunner().invoke(cli_app, ["keys", "show", user.key_id, "--keys", str(settings.keys_path)])
    assert res.exit_code == 0, res.output
    assert "40" in res.output and "flagged" in res.output
    store.close()


def test_degrade_label_changes_answers(dnf: DNF, tmp_path: Path) -> None:
    settings = _settings(tmp_path, monitor_response="degrade-label")
    store = KeyStore(settings.keys_path, create=True)
    _, secret = store.add("user")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with TestClient(create_app(settings, defense=dnf)) as client:
        r = client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": secret}).json()
    assert r["output_mode"] == "hard" and r["probabilities"] is None
    store.close()


def test_degrade_exit0_answers_from_first_exit(dnf: DNF, tmp_path: Path) -> None:
    settings = _settings(tmp_path, monitor_response="degrade-exit0")
    store = KeyStore(settings.keys_path, create=True)
    _, secret = store.add("user")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with TestClient(create_app(settings, defense=dnf)) as client:
        r = client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": secret}).json()
    with torch.inference_mode():
        first = torch.softmax(dnf.net.forward_all(x).mean_logits[0], dim=1)
    assert r["labels"] == first.argmax(1).tolist()
    assert torch.allclose(torch.tensor(r["probabilities"]), to_positive_probs(first), atol=1e-6)
    store.close()


@pytest.mark.parametrize("response", ["misinform", "misinform-id"])
def test_misinform_answers_are_relabelled_by_the_models_derangement(dnf: DNF, tmp_path: Path, response: str) -> None:
    from fortress.monitor import Misinformation

    settings = _settings(tmp_path, monitor_response=response)
    store = KeyStore(settings.keys_path, create=True)
    _, secret = store.add("user")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    dnf = sharp_random_dnf()
    with torch.inference_mode():  # half the queries leave at exit 0, the rest at exit 1
        conf0 = torch.softmax(dnf.net.forward_all(x).mean_logits[0], dim=1).amax(1)
    dnf.set_thresholds([float(conf0.median()), 0.0, 0.0])
    with TestClient(create_app(settings, defense=dnf)) as client:
        r = client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": secret}).json()
    with torch.inference_mode():
        out = dnf.respond(x)
    served = out.probs
    wrong = Misinformation.for_defense(dnf)(served)
    if response == "misinform-id":  # exit-0 answers go out as they are
        assert out.exits is not None and bool((out.exits == 0).any()) and bool((out.exits > 0).any())
        wrong = torch.where((out.exits > 0)[:, None], wrong, served)
    assert r["labels"] == wrong.argmax(1).tolist()
    late = [True] * len(r["labels"]) if out.exits is None or response == "misinform" else (out.exits > 0).tolist()
    assert all((a != b) == m for a, b, m in zip(r["labels"], served.argmax(1).tolist(), late, strict=True))
    assert torch.allclose(torch.tensor(r["probabilities"]), to_positive_probs(wrong), atol=1e-6)
    store.close()


def test_monitor_settings_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="monitor response"):
        ServeSettings(tmp_path, tmp_path / "k.db", monitor_response="shout")
    with pytest.raises(ConfigError, match="profiles"):
        ServeSettings(tmp_path, tmp_path / "k.db", monitor="prada", profiles=False)


def test_reset_clears_the_flag_keeps_the_profile_and_persists(dnf: DNF, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store = KeyStore(settings.keys_path, create=True)
    user, user_secret = store.add("user")
    _, admin_secret = store.add("ops", admin=True)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    admin = {"X-API-Key": admin_secret}
    with TestClient(create_app(settings, defense=dnf)) as client:
        client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": user_secret})
        route = f"/v1/admin/keys/{user.key_id}"
        assert client.get(f"{route}/profile", headers=admin).json()["verdict"]["flagged"]
        assert client.post(f"{route}/reset", headers={"X-API-Key": user_secret}).status_code == 403
        assert client.post("/v1/admin/keys/nope/reset", headers=admin).status_code == 422
        body = client.post(f"{route}/reset", headers=admin).json()
        assert not body["verdict"]["flagged"] and body["verdict"]["flagged_at"] is None
        assert body["profile"]["queries"] == 32  # the statistics stay
    # the cleared state is on disk: a new app starts unflagged, and new evidence flags the key again
    with TestClient(create_app(settings, defense=dnf)) as client:
        again = client.get(f"{route}/profile", headers=admin).json()
        assert not again["verdict"]["flagged"]
        client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": user_secret})
        flagged = client.get(f"{route}/profile", headers=admin).json()
    assert flagged["verdict"]["flagged"] and flagged["profile"]["queries"] == 64
    # offline (server stopped): the CLI clears the stored flag
    res = CliRunner().invoke(cli_app, ["keys", "reset", user.key_id, "--keys", str(settings.keys_path)])
    assert res.exit_code == 0, res.output
    assert "cleared" in res.output
    shown = CliRunner().invoke(cli_app, ["keys", "show", user.key_id, "--keys", str(settings.keys_path)])
    assert "not flagged" in shown.output and "64" in shown.output
    bad = CliRunner().invoke(cli_app, ["keys", "reset", "nope", "--keys", str(settings.keys_path)])
    assert bad.exit_code != 0 and "nope" in bad.output
    store.close()


def test_served_exit_sprt_plus_dadd_from_one_bundle_flags_only_the_off_domain_key(tmp_path: Path) -> None:
    import json

    from fortress.monitor import calibrate_exit_sprt
    from fortress.monitor.calibrate import dadd_from_defense

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])  # every query leaves at the last exit: exit-sprt sees nothing
    dcal = dadd_from_defense(dnf, blob_images(600, 0), blob_images(200, 1), variants=2, horizon=200, streams=20)
    dcal.save(tmp_path / "d.json")
    calibrate_exit_sprt(torch.full((2000,), 3), 4, horizon=1000, simulations=100, seed=0).save(tmp_path / "e.json")
    bundle = tmp_path / "cal.json"
    bundle.write_text(json.dumps({"monitor": "bundle", "members": {"exit-sprt": "e.json", "dadd": "d.json"}}))
    settings = ServeSettings(
        tmp_path / "dnf",
        tmp_path / "keys.db",
        monitor="exit-sprt+dadd",
        monitor_calibration=bundle,
        monitor_response="degrade-label",
    )
    store = KeyStore(settings.keys_path, create=True)
    _, user = store.add("user")
    _, other = store.add("other-domain")
    benign, off = blob_images(200, 2), 1 - blob_images(200, 3)
    with TestClient(create_app(settings, defense=dnf)) as client:
        got = [
            client.post("/v1/predict", json=_npy_body(benign[i : i + 50]), headers={"X-API-Key": user}).json()
            for i in range(0, 200, 50)
        ]
        bad = [
            client.post("/v1/predict", json=_npy_body(off[i : i + 50]), headers={"X-API-Key": other}).json()
            for i in range(0, 200, 50)
        ]
    with torch.inference_mode():
        want = to_positive_probs(dnf(benign))
    assert all(r["probabilities"] is not None for r in got)  # never degraded: the defense's own answers
    assert torch.allclose(torch.cat([torch.tensor(r["probabilities"]) for r in got]), want, atol=1e-6)
    assert bad[-1]["probabilities"] is None and bad[-1]["output_mode"] == "hard"  # flagged by dadd: labels only
    store.close()


def test_admin_creates_keys_and_a_sybil_attacker_is_caught_across_keys(tmp_path: Path) -> None:
    from fortress.bench.sybil import SybilOracle
    from fortress.monitor.calibrate import dadd_from_defense
    from fortress.oracle import HttpOracle

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])
    dcal = dadd_from_defense(dnf, blob_images(600, 0), blob_images(200, 1), variants=2, horizon=200, streams=20)
    dcal.save(tmp_path / "d.json")
    settings = ServeSettings(
        tmp_path / "dnf",
        tmp_path / "keys.db",
        monitor="dadd",
        monitor_calibration=tmp_path / "d.json",
        monitor_response="degrade-exit0",
        population_window_s=3600.0,
        population_min_queries=200,
    )
    store = KeyStore(settings.keys_path, create=True)
    _, admin = store.add("ops", admin=True)
    _, user = store.add("user")
    with TestClient(create_app(settings, defense=dnf)) as client:
        refused = client.post("/v1/admin/keys", json={"name": "x"}, headers={"X-API-Key": user})
        assert refused.status_code == 403
        bad = client.post("/v1/admin/keys", json={"name": "x", "budget": -1}, headers={"X-API-Key": admin})
        assert bad.status_code == 422 and "budget" in bad.text
        sybil = SybilOracle("http://testserver", admin, keys=20, budget=400, client=client)
        attack = 1 - blob_images(400, 3)
        answers = torch.cat([sybil.query(attack[i : i + 20]) for i in range(0, 400, 20)])
        flags = sybil.flags()
        benign = blob_images(100, 4)
        clean = HttpOracle("http://testserver", user, client=client).query(benign)
    assert all(f["queries"] == 20 for f in flags)  # 20 queries per key: dadd alone never judges a key
    caught = [f for f in flags if f["flagged"]]
    assert len(caught) >= 18
    assert all(f["flagged_at_key_query"] == 20 for f in caught)  # each after its only batch
    with torch.inference_mode():
        exit0 = to_positive_probs(torch.softmax(dnf.net.forward_all(attack).mean_logits[0], dim=1))
        plain = to_positive_probs(dnf(attack))
    # the window is tested from 200 pooled queries on: the first 9 keys got the defense's answers,
    # the key that brought the pool to 200 and every later one got the response
    assert torch.allclose(answers[:180], plain[:180], atol=1e-6)
    assert torch.allclose(answers[180:], exit0[180:], atol=1e-6)
    assert torch.allclose(clean, to_positive_probs(dnf(benign)), atol=1e-6)  # another window's key: untouched
    store.close()


def test_served_step_monitor_degrades_a_key_that_queries_steps_of_its_own_images(tmp_path: Path) -> None:
    from fortress.monitor import StepCalibration

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])
    StepCalibration(threshold=0.1, min_queries=50, min_change=0.0).save(tmp_path / "s.json")
    settings = ServeSettings(
        tmp_path / "dnf",
        tmp_path / "keys.db",
        monitor="step",
        monitor_calibration=tmp_path / "s.json",
        monitor_response="degrade-label",
    )
    store = KeyStore(settings.keys_path, create=True)
    _, user = store.add("user")
    _, jbda = store.add("jbda")
    g = torch.Generator().manual_seed(0)
    seeds = torch.rand(100, 1, 28, 28, generator=g)
    steps = (seeds + 0.1 * (torch.randint(0, 2, seeds.shape, generator=g) * 2 - 1)).clamp(0, 1)
    with TestClient(create_app(settings, defense=dnf)) as client:

        def ask(key: str, x: torch.Tensor) -> list[dict[str, Any]]:
            return [
                client.post("/v1/predict", json=_npy_body(x[i : i + 50]), headers={"X-API-Key": key}).json()
                for i in range(0, x.shape[0], 50)
            ]

        benign = ask(user, torch.rand(200, 1, 28, 28, generator=g))
        attack = ask(jbda, torch.cat([seeds, steps]))
    assert all(r["probabilities"] is not None for r in benign)
    assert attack[1]["probabilities"] is not None  # the seeds: no step yet
    assert attack[-1]["probabilities"] is None and attack[-1]["output_mode"] == "hard"  # flagged: labels only
    store.close()


@pytest.mark.parametrize(
    ("threshold", "window_threshold"),
    [(0.1, None), (0.9, 0.05)],  # the all-steps test; the cross-key test alone (the per-key share out of reach)
)
def test_served_steps_spread_over_keys_of_one_window_are_caught_across_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, threshold: float, window_threshold: float | None
) -> None:
    import json
    import logging

    from fortress.monitor import StepCalibration
    from fortress.monitor.calibrate import dadd_from_defense

    dnf = sharp_random_dnf()
    dnf.set_thresholds([1.0, 1.0, 1.0])
    dadd_from_defense(dnf, blob_images(600, 0), blob_images(200, 1), variants=2, horizon=200, streams=20).save(
        tmp_path / "d.json"
    )
    StepCalibration(threshold=threshold, min_queries=50, min_change=0.0, window_threshold=window_threshold).save(
        tmp_path / "s.json"
    )
    bundle = tmp_path / "cal.json"
    bundle.write_text(json.dumps({"monitor": "bundle", "members": {"dadd": "d.json", "step": "s.json"}}))
    settings = ServeSettings(
        tmp_path / "dnf",
        tmp_path / "keys.db",
        monitor="dadd+step",
        monitor_calibration=bundle,
        monitor_response="degrade-label",
        population_window_s=3600.0,
        population_min_queries=100_000,  # the feature-drift part never tests: only the steps can flag
    )
    store = KeyStore(settings.keys_path, create=True)
    keys = [store.add(f"sybil-{i}")[1] for i in range(10)]
    _, user = store.add("user")  # created in the same window
    g = torch.Generator().manual_seed(0)
    seeds = [blob_images(10, 10 + i) for i in range(10)]
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(settings, defense=dnf)) as client:

        def ask(key: str, x: torch.Tensor) -> dict[str, Any]:
            return client.post("/v1/predict", json=_npy_body(x), headers={"X-API-Key": key}).json()

        for i, key in enumerate(keys):  # round 0: each key its own 10 seeds
            ask(key, seeds[i])
        for _ in range(2):  # rounds 1, 2: each key queries steps of the next key's images (JBDA over keys)
            seeds = [
                (seeds[(i + 1) % 10] + 0.1 * (torch.randint(0, 2, seeds[0].shape, generator=g) * 2 - 1)).clamp(0, 1)
                for i in range(10)
            ]
            last = [ask(key, seeds[i]) for i, key in enumerate(keys)]
        benign = ask(user, torch.rand(30, 1, 28, 28, generator=g))  # images of its own, far from the others
    assert all(r["probabilities"] is None and r["output_mode"] == "hard" for r in last)  # every sybil: labels only
    assert benign["probabilities"] is not None
    assert "flagged by population-step" in caplog.text and "flagged by dadd" not in caplog.text
    store.close()
