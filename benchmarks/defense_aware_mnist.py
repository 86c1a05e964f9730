"""Defense-aware attacks against a saved defense on the embedded MNIST digits, with the facts behind the figure.

Runs one registered attack against ``--target`` (a saved defense or victim directory), scores the
clone on the 1,000 embedded test digits (off-budget) and prints one JSON line: clone accuracy and
fidelity, checkpoints, queries, wall time, the oracle's log and the attack's extras.

* ``ddae`` gets its ``perturb_factory`` from the saved defense (``fortress.bench.shadow``): the
  attacker knows the algorithm and parameters; a surrogate's ``seed`` is replaced by ``--shadow-seed``
  (the attacker does not know the defender's);
* ``exit-aware`` also reports how its learnt detector does on the run's own confident answers,
  against the exit DNF really took (read from the oracle's observer, never shown to the attack):
  ``detector_audit`` gives the share flagged among confident exit-0 answers and among confident
  later-exit answers;
* ``--serve dynamic|full`` serves the target with ``fortress serve --compute MODE`` on a loopback
  port and attacks it over HTTP (the timing side channel); the true exits then come from the same
  defense run locally on the images sent, and each answer's latency from the client's own clock.

Example:
    PYTHONPATH=src python benchmarks/defense_aware_mnist.py ddae --target /tmp/x/mad --budget 5000 --pool patches
    PYTHONPATH=src python benchmarks/defense_aware_mnist.py exit-aware --target /tmp/x/dnf --budget 300000
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fortress.attacks import ATTACKS, EvalSet
from fortress.bench.shadow import perturb_factory_for
from fortress.bench.timing import _server
from fortress.data.embedded import mnist_splits
from fortress.data.registry import load_dataset
from fortress.defenses import load_defense
from fortress.defenses.base import DefenseOutput
from fortress.models import create_model, predict_logits
from fortress.oracle import HttpOracle, LocalOracle, Oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clone", default="lenet5")
    parser.add_argument("--pool", default=None)
    parser.add_argument("--output-mode", default="soft")
    parser.add_argument("--shadow-seed", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--serve", choices=["dynamic", "full"], default=None, help="attack a served copy over HTTP")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON", help="attack hyper-parameter")
    args = parser.parse_args()
    params: dict[str, Any] = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}

    defense = load_defense(args.target)
    test = mnist_splits().test
    victim_labels = predict_logits(defense.victim, test.x).argmax(1)
    eval_set = EvalSet(test.x, test.targets, victim_labels)
    answered: list[tuple[Any, ...]] = []

    def observe(_: Tensor, out: DefenseOutput) -> None:
        if out.exits is not None:
            answered.append((out.probs.detach().clone(), out.exits.detach().clone()))

    with ExitStack() as stack:
        if args.serve is None:
            oracle: Oracle = LocalOracle(defense, output_mode=args.output_mode, observer=observe)
        else:
            url, key, _ = stack.enter_context(_server(args.target, args.serve, workers=1, threads=1))
            oracle = RecordingHttpOracle(url, key)
            stack.callback(oracle.close)
        out = run(args, params, defense, oracle, eval_set)
        if isinstance(oracle, RecordingHttpOracle):  # true exits from the same defense, locally
            for x, latency in zip(oracle.images, oracle.latency, strict=True):
                answered.append((*_local(defense, x), latency))
        if args.attack == "exit-aware" and answered:
            out["detector_audit"] = audit(out.pop("_attack"), answered)
        out.pop("_attack", None)
    print(json.dumps(out, default=str), flush=True)


class RecordingHttpOracle(HttpOracle):
    """An HTTP oracle that keeps every batch it sent and the client-side time of each call."""

    def __init__(self, url: str, api_key: str) -> None:
        super().__init__(url, api_key)
        self.images: list[Tensor] = []
        self.latency: list[float] = []

    def query(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        answers = super().query(x)
        self.latency.append(time.perf_counter() - t0)
        self.images.append(x.detach().cpu().clone())
        return answers


@torch.no_grad()
def _local(defense: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    out = defense.respond(x)
    return out.probs, out.exits


def audit(attack: Any, answered: list[tuple[Any, ...]]) -> dict[str, Any]:
    """How the attack's final detector flags confident answers, by the exit that really answered."""
    probs = torch.cat([a[0] for a in answered])
    exits = torch.cat([a[1] for a in answered])
    latency = None
    if attack.signal == "timing":
        if any(len(a) < 3 for a in answered):
            return {"skipped": "the timing audit needs --serve (client-side latencies)"}
        latency = torch.cat([torch.full((a[0].shape[0],), float(a[2]), dtype=torch.float64) for a in answered])
    confident = probs.amax(1) >= min(attack.thresholds)
    flagged = attack.exit0_score(probs, latency) >= 0.5
    early, late = confident & (exits == 0), confident & (exits > 0)
    return {
        "confident_exit0": int(early.sum()),
        "confident_later": int(late.sum()),
        "flagged_among_exit0": float(flagged[early].float().mean()) if early.any() else None,
        "flagged_among_later": float(flagged[late].float().mean()) if late.any() else None,
    }


def run(args: Any, params: dict[str, Any], defense: Any, oracle: Oracle, eval_set: EvalSet) -> dict[str, Any]:
    cls = ATTACKS.get(args.attack)
    if args.attack == "ddae":
        params["perturb_factory"] = perturb_factory_for(args.target, seed=args.shadow_seed)
    attack = cls(oracle, budget=args.budget, seed=args.seed, **params)
    pool_name = args.pool or cls.default_pool
    pool = None if pool_name is None else load_dataset(pool_name).x
    torch.manual_seed(args.seed)
    clone = create_model(args.clone)
    t0 = time.perf_counter()
    result = attack.run(clone, pool, eval_set=eval_set, eval_every=args.eval_every)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "attack": args.attack,
        "target": str(args.target),
        "defense": defense.name,
        "budget": args.budget,
        "queries_used": result.queries_used,
        "clone_acc": result.clone_acc,
        "best_clone_acc": result.best_clone_acc,
        "clone_fidelity": result.clone_fidelity,
        "wall_s": wall,
        "hparams": attack.hparams(),
        "pool": pool_name,
        "checkpoints": [(c.queries, round(c.clone_acc, 4)) for c in result.checkpoints],
        "oracle_log": oracle.log.as_dict(),
        "extras": {k: v for k, v in result.extras.items() if k not in ("train_loss",)},
    }
    out["_attack"] = attack
    return out


if __name__ == "__main__":
    main()
