"""The closed loop in process: DNF + monitor + response, attacked with one key and with N keys (Sybil).

Calibrates the monitors (``exit-sprt``, ``dadd`` and ``step``; ``--monitor`` picks the per-key
union) on the model's held-out validation images, then runs each attack against
:class:`fortress.monitor.closed_loop.Monitored` (the same per-key monitor and response the server
applies, plus the population detector across keys created in one window; built by
:func:`fortress.monitor.closed_loop.closed_loop`, as a grid's ``monitor`` row does) with one key and
with ``--sybil-keys`` keys in round-robin, and appends one result record per run
(clone accuracy, the flags: key, detector, query) to ``OUT/closed_loop.jsonl``.

With ``--served`` the same runs go through a real ``fortress serve`` process on a loopback port
(``--monitor`` as given, ``--population-window``, the response): one key is made with the
admin API and attacked through :class:`~fortress.oracle.HttpOracle`; ``N`` keys through
:class:`~fortress.bench.sybil.SybilOracle`, and the flags are the server's own verdicts.

Usage:
    python benchmarks/closed_loop.py DNF_DIR --out DIR [--attacks knockoff:digits28:3000 jbda::2000 ...] [--served]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch

from fortress.bench.pipeline import data_for, run_attack
from fortress.bench.sybil import SybilOracle
from fortress.config import AttackConfig
from fortress.defenses import DNF, Undefended, load_defense
from fortress.monitor.closed_loop import LOOP_RESPONSES, LoopConfig, closed_loop, loop_calibration
from fortress.serve import KeyStore


@contextlib.contextmanager
def served(
    model: Path, cal: Path, out: Path, response: str, monitor: str, min_queries: int = 500
) -> Iterator[tuple[str, str]]:
    """A ``fortress serve`` process with ``monitor`` and the population detector; yields (url, admin key)."""
    keys = out / "keys.db"
    keys.unlink(missing_ok=True)
    store = KeyStore(keys, create=True)
    _, admin = store.add("ops", admin=True)
    store.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "fortress", "serve", str(model), "--keys", str(keys), "--port", str(port)]
    cmd += ["--monitor", monitor, "--monitor-calibration", str(cal), "--monitor-response", response]
    cmd += ["--population-window", "3600", "--population-min-queries", str(min_queries), "--threads", "1"]
    log = (out / "server.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {out / 'server.log'}")
            time.sleep(0.5)
        yield url, admin
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def compare_answers(oracle: Any, dnf: DNF) -> dict[str, Any]:
    """Wrap ``oracle.query`` to compare every served answer with DNF's own; return the live tally.

    ``unchanged``: answers equal to DNF's (to float32 rounding over JSON); ``first_changed``: the
    attacker's query index (1-based) of the first answer the response changed (``None``: none).
    A key flagged by the detectors across keys after its last query has its flag stored at its last
    query, so the served ledger cannot say when the flag came; this tally can.
    """
    tally: dict[str, Any] = {"unchanged": 0, "changed": 0, "first_changed": None}
    inner = oracle.query

    def query(x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = inner(x)
        with torch.inference_mode():
            ref = dnf.respond(x).probs
        same = torch.isclose(y.float().cpu(), ref.float().cpu(), rtol=1e-4, atol=1e-6).all(1)
        if tally["first_changed"] is None and not bool(same.all()):
            tally["first_changed"] = tally["unchanged"] + tally["changed"] + int(torch.nonzero(~same)[0]) + 1
        tally["unchanged"] += int(same.sum())
        tally["changed"] += int((~same).sum())
        return y

    oracle.query = query
    return tally


def record(path: Path, row: dict[str, object], shown: tuple[str, ...]) -> None:
    """Append ``row`` to the JSON-lines file ``path`` and print its ``shown`` fields as one line."""
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in shown}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--attacks",
        nargs="+",
        default=["knockoff:digits28:3000", "knockoff:patches:3000", "jbda::2000", "dfms-hl::5000"],
        help="NAME:POOL:BUDGET (empty POOL: the attack's default)",
    )
    ap.add_argument("--sybil-keys", type=int, nargs="+", default=[1, 100])
    ap.add_argument(
        "--response",
        nargs="+",
        default=["degrade-exit0"],
        help=f"responses to flagged keys, each run side by side ({', '.join(LOOP_RESPONSES)})",
    )
    ap.add_argument("--monitor", default="exit-sprt+dadd+step", help="per-key monitors joined by + (LoopConfig)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--population-min-queries",
        type=int,
        default=500,
        help="pooled queries of a window before the detector across keys tests it",
    )
    ap.add_argument("--served", action="store_true", help="attack a real fortress serve process over HTTP")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dnf = load_defense(args.model_dir)
    if not isinstance(dnf, DNF):
        raise SystemExit(f"{args.model_dir} holds {dnf.name!r}; the closed loop needs a saved DNF")
    data = data_for(dnf.victim)
    t0 = time.perf_counter()
    base = LoopConfig(monitor=args.monitor, response=args.response[0])
    for response in args.response:  # every response checked before any work
        replace(base, response=response)
    cals = loop_calibration(dnf, data.train.x, data.val.x, base, args.out / "calibration")
    t_cal = time.perf_counter() - t0
    ecal, dcal = cals.exit_sprt, cals.dadd
    if args.served:
        members = {m: f"calibration/cal.{m}.json" for m in ("exit-sprt", "dadd", "step") if m in base.members}
        members.setdefault("dadd", "calibration/cal.dadd.json")  # the population detector reads it
        bundle = {"monitor": "bundle", "members": members}
        (args.out / "cal.json").write_text(json.dumps(bundle))
        for spec, response, keys in itertools.product(args.attacks, args.response, args.sybil_keys):
            name, pool, budget = spec.split(":")
            # a fresh server (and ledger) per run: one run's keys never share a window with another's
            with served(
                args.model_dir, args.out / "cal.json", args.out, response, args.monitor, args.population_min_queries
            ) as (
                url,
                admin,
            ):
                t = time.perf_counter()
                sybil = SybilOracle(url, admin, keys=keys, budget=int(budget), name=f"{name}-{keys}")
                cfg = AttackConfig(name=name, budget=int(budget), pool=pool or None, seed=0)
                oracle = sybil if keys > 1 else sybil.oracles[0]
                answers = compare_answers(oracle, dnf)
                rec = run_attack(oracle, cfg, reference=dnf)
                flags = sybil.flags()
            row = {
                "served": True,
                "attack": name,
                "pool": rec.config.get("pool"),
                "budget": int(budget),
                "keys": keys,
                "response": response,
                "clone_acc": rec.clone_acc,
                "clone_fidelity": rec.clone_fidelity,
                "defended_acc": rec.defended_acc,
                "keys_flagged": sum(f["flagged"] for f in flags),
                # answers equal to DNF's own (what the response left alone) and the first one it changed
                "answers_unchanged": answers["unchanged"],
                "first_changed_answer": answers["first_changed"],
                "first_flag": min(
                    (f["flagged_at_attacker_query"] for f in flags if f["flagged_at_attacker_query"]), default=None
                ),
                "flags": flags,
                "wall_s": time.perf_counter() - t,
            }
            record(
                args.out / "closed_loop_served.jsonl",
                row,
                ("attack", "pool", "keys", "response", "clone_acc", "keys_flagged", "first_changed_answer"),
            )
        return
    for spec in args.attacks:
        name, pool, budget = spec.split(":")
        cfg = AttackConfig(name=name, budget=int(budget), pool=pool or None, seed=0)
        # the same attack against the undefended victim and against DNF alone (no monitor), for the ratios
        alone = {
            "undefended": run_attack(Undefended(dnf.victim), cfg).clone_acc,
            "dnf": run_attack(dnf, cfg).clone_acc,
        }
        for response, keys in itertools.product(args.response, args.sybil_keys):
            guarded = closed_loop(
                dnf,
                replace(base, keys=keys, response=response),
                cals,
                budget=int(budget),
                population_min_queries=args.population_min_queries,
            )
            t = time.perf_counter()
            rec = run_attack(guarded, cfg, reference=dnf)
            row = {
                "attack": name,
                "pool": rec.config.get("pool"),
                "budget": int(budget),
                "keys": keys,
                "response": response,
                "monitor_members": base.members,
                "population_min_queries": args.population_min_queries,
                "clone_acc": rec.clone_acc,
                "undefended_clone_acc": alone["undefended"],
                "dnf_alone_clone_acc": alone["dnf"],
                "ratio_to_undefended": None
                if not alone["undefended"]
                else (rec.clone_acc or 0.0) / alone["undefended"],
                "clone_fidelity": rec.clone_fidelity,
                "defended_acc": rec.defended_acc,
                "victim_acc": rec.victim_acc,
                "exit_hist_attack": rec.exit_hist_attack,
                "first_flag": min((f["query"] for f in guarded.log.flags), default=None),
                "monitor": guarded.records(),
                "calibration": {
                    "dadd_h": dcal.threshold,
                    "exit_sprt_h": ecal.threshold,
                    "step_h": None if cals.step is None else cals.step.threshold,
                    "seconds": t_cal,
                },
                "wall_s": time.perf_counter() - t,
            }
            record(
                args.out / "closed_loop.jsonl",
                row,
                ("attack", "pool", "budget", "keys", "response", "clone_acc", "undefended_clone_acc", "first_flag"),
            )


if __name__ == "__main__":
    main()
