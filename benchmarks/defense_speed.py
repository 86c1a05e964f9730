"""Cost of answering queries under each output-perturbation baseline, relative to the undefended victim.

Paper Table 11 reports P-poison and GRAD² at 30–60× an undefended query; the batched exact forms in
``fortress.defenses`` (MAD's last-layer closed form, GRAD²'s forward-mode JVP) aim at ≤ 5× on CPU.
All defenses answer the same batch, interleaved within every repeat (the order rotates), so machine
load hits them alike; the figure is the median over repeats of seconds per 1,000 queries, and the
ratio divides it by the undefended victim's median.

Usage::

    .venv/bin/python benchmarks/defense_speed.py                      # LeNet-5 from /tmp/fx/victim if present
    .venv/bin/python benchmarks/defense_speed.py --threads 1 2 --repeats 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fortress.data.embedded import mnist_splits
from fortress.defenses import MAD, Defense, Grad2, MADArgmax, RandP, ReverseSigmoid, Undefended
from fortress.models import create_model, load_model
from fortress.models.staged import StagedBackbone


def _victim(path: Path | None) -> tuple[StagedBackbone, str]:
    if path is not None and (path / "model.json").exists():
        return load_model(path), str(path)
    if path is not None and (path / "victim" / "model.json").exists():
        return load_model(path / "victim"), str(path)
    torch.manual_seed(0)
    return create_model("lenet5").eval(), "random LeNet-5 (seed 0)"


def _defenses(victim: StagedBackbone) -> dict[str, Defense]:
    return {
        "undefended": Undefended(victim),
        "randp": RandP(victim, seed=0),
        "randp-logit": RandP(victim, mode="logit-noise", seed=0),
        "mad": MAD(victim, seed=0),
        "mad-argmax": MADArgmax(victim, seed=0),
        "grad2": Grad2(victim, seed=0),
        "reverse-sigmoid": ReverseSigmoid(victim),
    }


def measure(victim: StagedBackbone, x: torch.Tensor, threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per 1,000 queries and the ratio to undefended, for every defense at ``threads``."""
    torch.set_num_threads(threads)
    defs = _defenses(victim)
    names = list(defs)
    for d in defs.values():  # warm-up: allocator, JVP tracing, first-call overheads
        for _ in range(3):
            d.respond(x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            defs[n].respond(x)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["undefended"])
    return {
        n: {
            "s_per_1k": statistics.median(ts) / x.shape[0] * 1000,
            "ratio": statistics.median(ts) / base,
            "min_ratio": min(ts) / min(times["undefended"]),
        }
        for n, ts in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victim", type=Path, default=Path("/tmp/fx/victim"), help="saved victim or defense directory")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    victim, source = _victim(args.victim)
    x = mnist_splits().test.x[: args.batch].contiguous()
    out: dict[str, object] = {"victim": source, "batch": x.shape[0], "repeats": args.repeats, "results": {}}
    print(f"victim: {source}; batch {x.shape[0]}; median of {args.repeats} interleaved repeats")
    for t in args.threads:
        res = measure(victim, x, t, args.repeats)
        out["results"][str(t)] = res  # type: ignore[index]
        print(f"\n{t} thread(s)\n{'defense':<16} {'ms / 1k queries':>16} {'× undefended':>13} {'(min-based)':>12}")
        for n, r in res.items():
            print(f"{n:<16} {r['s_per_1k'] * 1000:>16.2f} {r['ratio']:>13.2f} {r['min_ratio']:>12.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
