"""Sanity experiment: DFME against an undefended LeNet-5 trained on the embedded MNIST digits.

Trains the victim (20 epochs Adam 1e-3, the default shift augmentation; paper App. G), runs DFME at
``--budget`` queries and prints the clone accuracy at each checkpoint on the embedded test split,
the victim's label histogram over the student queries and the wall time. Not a test: use it to
check and tune DFME's defaults (Truong et al., CVPR 2021).

Example:
    PYTHONPATH=src python benchmarks/dfme_mnist_sanity.py --budget 200000 --seed 0 --clone lenet5

Measured (victim 97.1 %, seed 0, one thread on a shared 2-core CPU, DFME defaults):
    lenet5 clone, 1M queries: 35.6 % at 100k, 72.8 % at 200k, 82.3 % at 300k (173 s), 91.6 % at
    500k, 94.6 % at 1M (best 95.1 %), 587 s in all. lenet5-half clone, 150k: 41.8 % (66 s).
    With ``--set diversity_weight=0`` (the paper's DFME) the clone plateaus at 77.5 % (500k).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fortress.attacks import DFME, EvalSet
from fortress.data.embedded import mnist_splits
from fortress.defenses.undefended import Undefended
from fortress.models import (
    create_model,
    evaluate_accuracy,
    load_model,
    predict_logits,
    save_model,
    train_classifier,
)
from fortress.oracle import LocalOracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clone", choices=["lenet5", "lenet5-half"], default="lenet5")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is best on a shared 2-core machine: 2 threads spin against other jobs)",
    )
    parser.add_argument("--victim-cache", type=Path, default=None, help="directory to save/load the victim")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON", help="DFME hyper-parameter override")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}

    splits = mnist_splits()
    assert splits.train.y is not None
    assert splits.test.y is not None
    t0 = time.perf_counter()
    if args.victim_cache is not None and (args.victim_cache / "model.json").exists():
        victim = load_model(args.victim_cache)
    else:
        torch.manual_seed(0)
        victim = create_model("lenet5")
        train_classifier(victim, splits.train.x, splits.train.y, epochs=20, lr=1e-3, seed=0)
        if args.victim_cache is not None:
            save_model(victim, args.victim_cache)
    victim_acc = evaluate_accuracy(victim, splits.test.x, splits.test.y)
    print(f"victim lenet5 test acc {victim_acc:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    eval_set = EvalSet(splits.test.x, splits.test.y, predict_logits(victim, splits.test.x).argmax(1))
    oracle = LocalOracle(Undefended(victim), output_mode="soft")
    attack = DFME(oracle, budget=args.budget, seed=args.seed, **overrides)
    print("dfme", json.dumps(attack.hparams()), flush=True)
    torch.manual_seed(args.seed)
    clone = create_model(args.clone)

    start = time.perf_counter()
    seen = 0

    def report(queries: int, budget: int) -> None:
        nonlocal seen
        while seen < len(attack._checkpoints):  # print checkpoints as they arrive
            cp = attack._checkpoints[seen]
            fid = f"{cp.clone_fidelity:.4f}" if cp.clone_fidelity is not None else "-"
            print(
                f"  {cp.queries:>9d} queries  acc {cp.clone_acc:.4f}  fid {fid}  {cp.wall_s:7.1f} s",
                flush=True,
            )
            seen += 1

    result = attack.run(clone, eval_set=eval_set, eval_every=args.eval_every, progress=report)
    report(result.queries_used, args.budget)
    wall = time.perf_counter() - start
    hist = result.extras["label_hist"]
    total = max(1, sum(hist))
    print("label histogram (%):", " ".join(f"{c}:{100 * n / total:.1f}" for c, n in enumerate(hist)))
    pred = predict_logits(result.clone, splits.test.x).argmax(1)
    per_class = [float((pred[splits.test.y == c] == c).float().mean()) for c in range(10)]
    print("per-class clone acc (%):", " ".join(f"{c}:{100 * a:.0f}" for c, a in enumerate(per_class)))
    print(
        f"final acc {result.clone_acc:.4f} best {result.best_clone_acc:.4f} queries {result.queries_used} "
        f"iterations {result.extras['iterations']} tail {result.extras['tail_student_steps']} "
        f"wall {wall:.1f} s (generator {result.extras['generator_s']:.1f} s, "
        f"student {result.extras['student_s']:.1f} s, victim {oracle.log.time_s:.1f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
