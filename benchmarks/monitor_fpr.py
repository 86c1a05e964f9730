"""Benign false positives and attack detection of every monitor, per key and across keys (Sybil).

Calibrates ``exit-sprt`` (held-out validation digits, its threshold holding under every shift and
for single classes, as ``fortress monitor calibrate``; ``--id-only``: the validation digits as given),
``dadd`` (reference: the defender's training features; threshold: validation digits under each
realistic shift and class mix) and ``step`` (validation digits under each shift and mix), then
replays, per benign scenario (every shift × class mix), ``--keys`` keys of ``--queries`` queries
drawn from the *test* digits under that scenario (images the calibration never saw) through the
real monitor classes in batches of ``--batch``, and reports the share of keys flagged with a
one-sided 95 % Clopper–Pearson upper bound. Attack traffic: keys replaying natural related pools
(another digit style, photo crops, Fashion-MNIST) and noise, with the query at which each detector
flags; and a Sybil attacker whose budget is split over many keys created in one window
(``PopulationDrift``), next to the same number of benign keys in other windows.

Usage:
    python benchmarks/monitor_fpr.py DNF_DIR --out DIR [--keys 300] [--queries 1000] [--prada-keys 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import beta

from fortress.bench.pipeline import data_for
from fortress.data.defaults import fitted_options
from fortress.data.registry import load_dataset
from fortress.defenses import load_defense
from fortress.monitor import ExitSPRT, Prada, calibrate_from_defense
from fortress.monitor.benign import benign_streams, owned_stream, shifted
from fortress.monitor.dadd import DADD, calibrate_dadd, fit_reference, log_prob_features
from fortress.monitor.population import PopulationDrift
from fortress.monitor.step import Step, WindowSteps, calibrate_step

#: dadd's feature space (set from --feature).
FEATURE = "penultimate"
SHIFTS = ("replay", "shift-rotate", "noise", "brightness", "all")
SCENARIOS = [(s, m) for s in SHIFTS for m in ("uniform", "one-class", "skewed")]
#: Monitors fed the raw images (the others read precomputed features).
IMAGE_MONITORS = ("prada", "step")


def upper95(k: int, n: int) -> float:
    """One-sided 95 % Clopper–Pearson upper bound of a rate ``k / n``."""
    return 1.0 if k == n else float(beta.ppf(0.95, k + 1, n - k))


@torch.no_grad()
def answer(defense: Any, x: torch.Tensor, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Features, probabilities, predicted classes and exits of ``x``."""
    parts: dict[str, list[torch.Tensor]] = {"feats": [], "probs": [], "exits": []}
    for i in range(0, x.shape[0], chunk):
        out = defense.respond(x[i : i + chunk])
        parts["feats"].append(
            defense.victim.penultimate(x[i : i + chunk]) if FEATURE == "penultimate" else log_prob_features(out.probs)
        )
        parts["probs"].append(out.probs)
        parts["exits"].append(out.exits)
    got = {k: torch.cat(v) for k, v in parts.items()}
    got["cls"] = got["probs"].argmax(1)
    return got


def run_key(
    monitors: dict[str, Any],
    key: str,
    bank: dict[str, torch.Tensor],
    idx: torch.Tensor,
    batch: int,
    images: torch.Tensor | None = None,
) -> dict[str, int | None]:
    """Feed one key's stream to every monitor; return each one's flag position."""
    for i in range(0, idx.numel(), batch):
        j = idx[i : i + batch]
        for name, mon in monitors.items():
            # dadd's feature function is the identity here: it is handed the precomputed features
            x = images[j] if name in IMAGE_MONITORS and images is not None else bank["feats"][j]
            mon.observe(key, x, bank["probs"][j], bank["exits"][j])
    return {name: mon.verdict(key).flagged_at for name, mon in monitors.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keys", type=int, default=300)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--prada-keys", type=int, default=50)
    ap.add_argument("--sybil-keys", type=int, default=100)
    ap.add_argument("--sybil-budget", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--windows", type=int, default=None, help="benign windows of --window-keys keys (default: --keys / 10)"
    )
    ap.add_argument("--window-keys", type=int, default=10, help="benign keys per window")
    ap.add_argument(
        "--population-min-queries",
        type=int,
        default=500,
        help="pooled queries of a window before the detector across keys tests it",
    )
    ap.add_argument(
        "--window-users",
        choices=["shared", "distinct"],
        default="shared",
        help="benign windows' keys draw from all test images (shared) or each from its own share (distinct)",
    )
    ap.add_argument(
        "--id-only", action="store_true", help="calibrate exit-sprt on the validation images only (no benign shifts)"
    )
    ap.add_argument("--feature", choices=["penultimate", "logits"], default="penultimate", help="dadd's feature space")
    args = ap.parse_args()
    global FEATURE
    FEATURE = args.feature
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    defense = load_defense(args.model_dir)
    d = data_for(defense.victim)
    gen = torch.Generator().manual_seed(0)
    # reference on the defender's training digits; calibration banks on the validation digits
    tr = answer(defense, d.train.x)
    ref = fit_reference(tr["feats"], tr["cls"], defense.num_classes, feature=args.feature)
    cal_banks = {}
    for s in SHIFTS:
        b = answer(defense, torch.cat([shifted(d.val.x, s, gen) for _ in range(10)]))
        cal_banks[s] = (b["feats"], b["cls"])
    dcal = calibrate_dadd(ref, cal_banks, streams=200, horizon=args.queries, seed=0, variants=10)
    ecal = calibrate_from_defense(
        defense, d.val.x, alpha=0.01, horizon=10_000, simulations=1000, seed=0, shifts=() if args.id_only else SHIFTS
    )
    early = ecal.early_share
    scal = calibrate_step(lambda x: defense.respond(x).probs, d.val.x, horizon=args.queries, seed=0)
    t_cal = time.perf_counter() - t0

    def monitors(with_prada: bool) -> dict[str, Any]:
        mons: dict[str, Any] = {
            "exit-sprt": ExitSPRT(ecal),
            "dadd": DADD(dcal, features=lambda f: f),
            "step": Step(scal),
        }
        if with_prada:
            mons["prada"] = Prada()
        return mons

    # benign test banks: test digits under each shift, several variants each
    test_images = {s: torch.cat([shifted(d.test.x, s, gen) for _ in range(args.variants)]) for s in SHIFTS}
    test_banks = {s: answer(defense, x) for s, x in test_images.items()}
    rows = []
    for shift, mix in SCENARIOS if args.keys > 0 else []:  # --keys 0: the windows only
        bank = test_banks[shift]
        idx = benign_streams(
            bank["cls"], args.keys, args.queries, mix, gen, num_classes=defense.num_classes, variants=args.variants
        )
        flags: dict[str, int] = dict.fromkeys(
            ["exit-sprt", "dadd", "step", "exit-sprt+dadd", "exit-sprt+dadd+step", "prada", "all four"], 0
        )
        prada_n = 0
        t = time.perf_counter()
        for k in range(args.keys):
            with_prada = k < args.prada_keys
            got = run_key(monitors(with_prada), f"b{k}", bank, idx[k], args.batch, test_images[shift])
            flags["exit-sprt"] += got["exit-sprt"] is not None
            flags["dadd"] += got["dadd"] is not None
            flags["step"] += got["step"] is not None
            flags["exit-sprt+dadd"] += got["exit-sprt"] is not None or got["dadd"] is not None
            flags["exit-sprt+dadd+step"] += any(got[m] is not None for m in ("exit-sprt", "dadd", "step"))
            if with_prada:
                prada_n += 1
                flags["prada"] += got["prada"] is not None
                flags["all four"] += any(v is not None for v in got.values())
        row = {
            "scenario": f"{shift}/{mix}",
            "keys": args.keys,
            "prada_keys": prada_n,
            "wall_s": time.perf_counter() - t,
        }
        for name, k in flags.items():
            n = prada_n if name in ("prada", "all four") else args.keys
            row[name] = {"flagged": k, "keys": n, "rate": k / max(n, 1), "upper95": upper95(k, n)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # attack traffic: natural related pools and noise, one key each (several keys per pool)
    pools = {
        "digits28": load_dataset("digits28", None, **fitted_options("digits28", (1, 28, 28))).x,
        "patches": load_dataset("patches", None, n=3000, seed=1, **fitted_options("patches", (1, 28, 28))).x,
        "fashion-mnist": load_dataset("fashion-mnist", None, **fitted_options("fashion-mnist", (1, 28, 28))).x[:3000],
        "noise": torch.rand(3000, 1, 28, 28, generator=gen),
    }
    attack_rows = []
    for name, x in pools.items():
        bank = answer(defense, x)
        firsts: dict[str, list[int | None]] = {"exit-sprt": [], "dadd": [], "step": [], "prada": []}
        for k in range(10):
            idx = torch.randint(0, x.shape[0], (args.queries,), generator=gen)
            got = run_key(monitors(True), f"a{k}", bank, idx, args.batch, x)
            for m, v in got.items():
                firsts[m].append(v)
        exits = torch.bincount(bank["exits"], minlength=defense.num_exits).tolist()
        row = {"pool": name, "exits": exits, "flagged_at": firsts}
        attack_rows.append(row)
        print(json.dumps(row), flush=True)

    def population() -> PopulationDrift:
        """A fresh detector across keys (one-hour windows) on this run's calibrations."""
        return PopulationDrift(
            dcal,
            id_early_share=early,
            num_exits=defense.num_exits,
            window_s=3600.0,
            min_queries=args.population_min_queries,
        )

    # Sybil: the budget split over many keys created in one window; benign keys fill other windows
    pop_rows = []
    for name in ("digits28", "patches", "fashion-mnist"):
        x = pools[name]
        bank = answer(defense, x)
        pop = population()
        per = args.sybil_budget // args.sybil_keys
        flag = None
        flagged_at = None
        sent = 0
        # round-robin: every key sends one batch of at most `batch` queries in turn
        order = torch.randint(0, x.shape[0], (args.sybil_keys, per), generator=gen)
        for start in range(0, per, args.batch):
            for k in range(args.sybil_keys):
                j = order[k, start : start + args.batch]
                f = pop.add(f"s{k}", 10.0, bank["feats"][j], bank["cls"][j], bank["exits"][j])
                sent += j.numel()
                if f is not None and flagged_at is None:
                    flagged_at = sent
                flag = f or flag
        row = {
            "pool": name,
            "keys": args.sybil_keys,
            "queries_per_key": per,
            "window_flagged_at_query": flagged_at,
            "by": None if flag is None else flag.by,
            "contributing": 0 if flag is None else len(flag.contributing),
        }
        pop_rows.append(row)
        print(json.dumps(row), flush=True)
    # benign windows: each of --windows windows holds --window-keys benign keys of mixed scenarios, their batches sent
    # in turn; --window-users shared: every key draws from all test images (two users may send the same
    # image under other noise), distinct: each key owns its own share of them (step's window calibration)
    pop = population()
    windows = args.keys // 10 if args.windows is None else args.windows
    flagged_windows, flagged_keys = 0, 0
    # the window-wide step detector (the closed loop's population_step), both of its tests
    step_windows, step_keys = 0, 0
    n_test = d.test.x.shape[0]
    wk = args.window_keys
    for w in range(windows):
        window_step = WindowSteps(scal)
        owner = torch.randperm(n_test, generator=gen) % wk
        streams = []
        for k in range(wk):
            shift, mix = SCENARIOS[(w * wk + k) % len(SCENARIOS)]
            cls = test_banks[shift]["cls"]
            if args.window_users == "distinct":
                mine = torch.nonzero(owner == k).flatten()
                idx = owned_stream(
                    cls, mine, args.queries, mix, gen, num_classes=defense.num_classes, variants=args.variants
                )
            else:
                idx = benign_streams(
                    cls, 1, args.queries, mix, gen, num_classes=defense.num_classes, variants=args.variants
                )[0]
            streams.append((shift, idx))
        contributing: set[str] = set()
        for i in range(0, args.queries, args.batch):
            for k, (shift, idx) in enumerate(streams):
                bank, j = test_banks[shift], idx[i : i + args.batch]
                pop.add(f"w{w}k{k}", 3600.0 * w + 1, bank["feats"][j], bank["cls"][j], bank["exits"][j])
                contributing.update(
                    window_step.add(f"w{w}k{k}", 3600.0 * w + 1, test_images[shift][j], bank["probs"][j])
                )
        step_windows += bool(contributing)
        step_keys += len(contributing)
    for w in range(windows):
        keys = [f"w{w}k{k}" for k in range(wk)]
        hit = sum(pop.flagged(k) for k in keys)
        flagged_windows += hit > 0
        flagged_keys += hit
    benign_pop = {
        "windows": windows,
        "window_users": args.window_users,
        "window_keys": wk,
        "keys": windows * wk,
        "flagged_windows": flagged_windows,
        "flagged_keys": flagged_keys,
        "key_rate_upper95": upper95(flagged_keys, windows * wk),
        "step_flagged_windows": step_windows,
        "step_flagged_keys": step_keys,
        "step_key_rate_upper95": upper95(step_keys, windows * wk),
    }
    print(json.dumps(benign_pop), flush=True)
    result = {
        "model": str(args.model_dir),
        "dadd_calibration": {"threshold": dcal.threshold, "m_ref": dcal.m_ref, "per_scenario": dcal.per_scenario},
        "exit_sprt_threshold": ecal.threshold,
        "step_calibration": {
            "threshold": scal.threshold,
            "per_scenario": scal.per_scenario,
            "window_threshold": scal.window_threshold,
            "window_per_scenario": scal.window_per_scenario,
        },
        "id_early_share": early,
        "calibration_s": t_cal,
        "benign": rows,
        "attacks": attack_rows,
        "sybil": pop_rows,
        "benign_population": benign_pop,
        "population_min_queries": args.population_min_queries,
        "wall_s": time.perf_counter() - t0,
    }
    (args.out / "monitor_fpr.json").write_text(json.dumps(result, indent=1))
    dcal.save(args.out / "dadd-cal.json")
    ecal.save(args.out / "exit-cal.json")
    scal.save(args.out / "step-cal.json")


if __name__ == "__main__":
    main()
