"""What extraction monitoring adds to serving a batch: the server's monitoring step next to the answer itself.

The server answers a batch with ``defense.respond`` and then, with monitoring on, runs one
``Watch.observe`` (profile update, the detector, a throttled ledger write). This script times both,
interleaved, on the same batches, for profiles only and for each detector, and reports medians and
the ratio of the monitoring step to the answer. End-to-end request latency also includes decoding,
validation, the ledger charge and the HTTP round trip (``benchmarks/serve_load.py --monitor``), so
the ratio here is an upper bound of the share monitoring adds to a request.

Usage:
    python benchmarks/monitor_overhead.py DNF_DIR [--batch 64] [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fortress.data.embedded import mnist_splits
from fortress.defenses import load_defense
from fortress.monitor import calibrate_from_defense, create_monitor
from fortress.monitor.calibrate import dadd_from_defense
from fortress.monitor.closed_loop import find_member
from fortress.monitor.dadd import DADD
from fortress.monitor.exit_sprt import ExitSPRT
from fortress.monitor.population import PopulationDrift
from fortress.monitor.service import Watch
from fortress.monitor.step import Step, WindowSteps, calibrate_step
from fortress.monitor.tap import PenultimateTap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    defense = load_defense(args.model_dir)
    data = mnist_splits()
    gen = torch.Generator().manual_seed(0)
    traffic = {
        "ID test": data.test.x,
        "noise": torch.rand((2048, *data.test.x.shape[1:]), generator=gen),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cal = calibrate_from_defense(defense, data.val.x, alpha=0.01, horizon=10_000, simulations=500, seed=0)
        cal.save(Path(tmp) / "exit.json")
        dadd_from_defense(defense, data.train.x, data.val.x, streams=20).save(Path(tmp) / "dadd.json")
        calibrate_step(lambda q: defense.respond(q).probs, data.val.x, streams=20).save(Path(tmp) / "step.json")
        cal_path = Path(tmp) / "cal.json"
        members = {"exit-sprt": "exit.json", "dadd": "dadd.json", "step": "step.json"}
        cal_path.write_text(json.dumps({"monitor": "bundle", "members": members}))
        setups = {
            "profiles only": None,
            "exit-sprt": "exit-sprt",
            "prada": "prada",
            "exit-sprt+prada": "exit-sprt+prada",
            "dadd": "dadd",
            "exit-sprt+dadd": "exit-sprt+dadd",
            "step": "step",
            "exit-sprt+dadd+step": "exit-sprt+dadd+step",
            "exit-sprt+dadd+step, across keys": "exit-sprt+dadd+step",
        }

        def make_watch(i: int, name: str, spec: str | None) -> Watch:
            mon = None if spec is None else create_monitor(spec, calibration=cal_path, features=PenultimateTap(defense))
            across: dict[str, Any] = {}
            if name.endswith("across keys"):  # population drift and the window-wide step, all keys in one window
                dadd, step = find_member(mon, DADD), find_member(mon, Step)
                sprt = find_member(mon, ExitSPRT)
                assert dadd is not None and step is not None and sprt is not None
                across = {
                    "population": PopulationDrift(
                        dadd.calibration, id_early_share=sprt.calibration.early_share, num_exits=defense.num_exits
                    ),
                    "window_steps": WindowSteps(step.calibration),
                    "created_at": lambda key: 0.0,
                }
            return Watch(Path(tmp) / f"{i}.db", num_exits=defense.num_exits or 0, monitor=mon, **across)

        watches = {name: make_watch(i, name, spec) for i, (name, spec) in enumerate(setups.items())}
        print(f"{'traffic':<9} {'monitoring':<33} {'answer ms':>10} {'monitor ms':>11} {'ratio':>7}")
        for label, pool in traffic.items():
            answer_ms: list[float] = []
            monitor_ms: dict[str, list[float]] = {name: [] for name in watches}
            for r in range(args.repeats):
                idx = torch.randint(0, pool.shape[0], (args.batch,), generator=gen)
                x = pool[idx]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = defense.respond(x)
                answer_ms.append(1e3 * (time.perf_counter() - t0))
                for name, watch in watches.items():  # one key per repeat block of 50: keys grow like real ones
                    t0 = time.perf_counter()
                    watch.observe(f"{label}-{r // 50}", x, out.probs, out.exits)
                    monitor_ms[name].append(1e3 * (time.perf_counter() - t0))
            base = statistics.median(answer_ms)
            for name, times in monitor_ms.items():
                med = statistics.median(times)
                print(f"{label:<9} {name:<33} {base:>10.3f} {med:>11.3f} {med / base:>7.3f}")
        for watch in watches.values():
            watch.close()


if __name__ == "__main__":
    main()
