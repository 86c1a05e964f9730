"""The closed loop in process: DNF + monitor + response, attacked with one key and with N keys (Sybil).

Calibrates ``exit-sprt`` and ``dadd`` on the model's held-out validation images, then runs each
attack against :class:`fortress.monitor.closed_loop.Monitored` (the same per-key monitor and
response the server applies, plus the population detector across keys created in one window) with
one key and with ``--sybil-keys`` keys in round-robin, and appends one result record per run
(clone accuracy, the flags: key, detector, query) to ``OUT/closed_loop.jsonl``.

Usage:
    python benchmarks/closed_loop.py DNF_DIR --out DIR [--attacks knockoff:digits28:3000 jbda::2000 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fortress.bench.pipeline import data_for, run_attack
from fortress.config import AttackConfig
from fortress.defenses import load_defense
from fortress.monitor import AnyOf, ExitSPRT, Response, calibrate_from_defense
from fortress.monitor.calibrate import dadd_from_defense
from fortress.monitor.closed_loop import KeyPlan, Monitored
from fortress.monitor.dadd import DADD
from fortress.monitor.population import PopulationDrift


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
    ap.add_argument("--response", default="degrade-exit0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dnf = load_defense(args.model_dir)
    data = data_for(dnf.victim)
    t0 = time.perf_counter()
    ecal = calibrate_from_defense(dnf, data.val.x, alpha=0.01, horizon=10_000, simulations=1000, seed=0)
    dcal = dadd_from_defense(dnf, data.train.x, data.val.x, streams=100)
    t_cal = time.perf_counter() - t0
    early = 1 - ecal.id_counts[-1] / sum(ecal.id_counts)
    for spec in args.attacks:
        name, pool, budget = spec.split(":")
        for keys in args.sybil_keys:
            monitor = AnyOf([ExitSPRT(ecal), DADD(dcal, features=dnf.victim.penultimate)])
            population = (
                PopulationDrift(dcal, id_early_share=early, num_exits=dnf.num_exits, min_queries=500)
                if keys > 1
                else None
            )
            guarded = Monitored(
                dnf, monitor=monitor, population=population, response=Response(args.response), plan=KeyPlan(keys=keys)
            )
            cfg = AttackConfig(name=name, budget=int(budget), pool=pool or None, seed=0)
            t = time.perf_counter()
            rec = run_attack(guarded, cfg, reference=dnf)
            row = {
                "attack": name,
                "pool": rec.config.get("pool"),
                "budget": int(budget),
                "keys": keys,
                "response": args.response,
                "clone_acc": rec.clone_acc,
                "clone_fidelity": rec.clone_fidelity,
                "defended_acc": rec.defended_acc,
                "victim_acc": rec.victim_acc,
                "exit_hist_attack": rec.exit_hist_attack,
                "first_flag": min((f["query"] for f in guarded.log.flags), default=None),
                "monitor": guarded.records(),
                "calibration": {"dadd_h": dcal.threshold, "exit_sprt_h": ecal.threshold, "seconds": t_cal},
                "wall_s": time.perf_counter() - t,
            }
            with (args.out / "closed_loop.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(
                json.dumps({k: row[k] for k in ("attack", "pool", "budget", "keys", "clone_acc", "first_flag")}),
                flush=True,
            )


if __name__ == "__main__":
    main()
