"""Train victims on the real Fashion-MNIST with their default recipes; measure accuracy and cost.

Usage:
    python benchmarks/victim_recipes.py [--arch lenet5 resnet14-s] [--data-dir DIR] [--threads 2]
        [--val 5000] [--train-size N] [--seed 0] [--no-test] [--out results.jsonl]
        [--stages [--repeats 30] [--stage-batch 256]] [--no-train]
        [--epochs N] [--lr LR] [--optimizer adam|sgd] [--schedule cosine|onecycle|step|constant]
        [--max-shift PX] [--hflip | --no-hflip] [--batch-size B] [--weight-decay WD] [--label-smoothing E]

The 60,000 training images are split stratified into a training split (55,000) and a held-out
validation split (``--val``, 5,000); the victim trains on the first with
``recipe_for(arch, "fashion-mnist")`` (any option overridden on the command line), prints the
validation accuracy after every epoch, and the accuracy on the 10,000 test images once at the end
(``--no-test`` leaves the test images alone, for choosing a recipe on validation only).

``--stages`` also measures, per stage of each architecture, the FLOPs of one image
(``torch.utils.flop_counter``) and the median CPU time of a 256-image batch in eval mode, with
the cumulative share up to each exit. Every result is one JSON line on stdout (and in ``--out``).

On a machine shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``: with the default
(spinning) wait policy an OpenMP thread whose partner is descheduled burns its time slice
waiting, which made a 2-thread LeNet-5 step more than 10× slower in CPU time under load.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from fortress.data.registry import load_dataset
from fortress.models import StagedBackbone, create_model, evaluate_accuracy, train_classifier
from fortress.models.recipes import TrainRecipe, recipe_for

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def stratified_split(y: Tensor, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` with ``n_val`` validation rows spread evenly over the classes."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per_class = n_val // classes.numel()
    train_parts, val_parts = [], []
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        val_parts.append(idx[:per_class])
        train_parts.append(idx[per_class:])
    train = torch.cat(train_parts)
    val = torch.cat(val_parts)
    return train[torch.randperm(train.numel(), generator=gen)], val[torch.randperm(val.numel(), generator=gen)]


def stage_costs(model: StagedBackbone, batch: int = 256, repeats: int = 30) -> dict[str, Any]:
    """FLOPs per image and median CPU seconds per batch of every stage (and the classifier)."""
    model.eval()
    x = torch.rand(batch, *model.input_shape, generator=torch.Generator().manual_seed(0))
    parts: list[torch.nn.Module] = [*model.stages, model.classifier]
    inputs: list[Tensor] = []
    with torch.no_grad():
        h = model.preprocess(x)
        for part in parts:
            inputs.append(h)
            h = part(h)
        flops = []
        for part, inp in zip(parts, inputs, strict=True):
            with FlopCounterMode(display=False) as counter:
                part(inp[:1])
            flops.append(int(counter.get_total_flops()))
        times: list[list[float]] = [[] for _ in parts]
        for _ in range(3):  # warm-up
            for part, inp in zip(parts, inputs, strict=True):
                part(inp)
        for _ in range(repeats):  # round-robin, so load from other processes spreads over all parts
            for i, (part, inp) in enumerate(zip(parts, inputs, strict=True)):
                t0 = time.perf_counter()
                part(inp)
                times[i].append(time.perf_counter() - t0)
    med = [sorted(t)[len(t) // 2] for t in times]
    total_f, total_t = sum(flops), sum(med)
    n = model.num_stages
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "stage_shapes": model.stage_shapes,
        "flops_per_image": total_f,
        "stage_flops": flops[:n],
        "classifier_flops": flops[n],
        "stage_flop_share": [round(f / total_f, 4) for f in flops[:n]],
        "cum_flop_share": [round(sum(flops[: k + 1]) / total_f, 4) for k in range(n)],
        "stage_cpu_s_per_batch": [round(t, 6) for t in med[:n]],
        "stage_cpu_share": [round(t / total_t, 4) for t in med[:n]],
        "cum_cpu_share": [round(sum(med[: k + 1]) / total_t, 4) for k in range(n)],
        "cpu_s_per_batch": round(total_t, 6),
        "batch": batch,
    }


def train_one(
    arch: str, recipe: TrainRecipe, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], seed: int
) -> dict[str, Any]:
    """Train ``arch`` on ``train`` with ``recipe``, printing validation accuracy per epoch."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, in_channels=1, image_size=28)
    cpu_marks = [time.process_time()]

    def on_epoch(epoch: int, loss: float, acc: float | None) -> None:
        cpu_marks.append(time.process_time())
        cpu = cpu_marks[-1] - cpu_marks[-2]
        print(
            f"# {arch} epoch {epoch + 1}/{recipe.epochs} loss {loss:.4f} val_acc {acc:.4f} cpu_s {cpu:.0f}", flush=True
        )

    report = train_classifier(model, *train, seed=seed, val=val, on_epoch=on_epoch, **recipe.as_kwargs())
    return {
        "kind": "train",
        "arch": arch,
        "model": model,
        "recipe": dataclasses.asdict(recipe),
        "seed": seed,
        "n_train": int(train[0].shape[0]),
        "n_val": int(val[0].shape[0]),
        "val_acc": report.val_acc,
        "train_loss": [round(v, 5) for v in report.train_loss],
        "epoch_s": [round(v, 1) for v in report.epoch_s],
        "train_wall_s": round(report.wall_s, 1),
        # CPU seconds of this process (all threads), incl. the per-epoch validation: on a machine
        # shared with other jobs the wall time overstates what training costs.
        "epoch_cpu_s": [round(b - a, 1) for a, b in itertools.pairwise(cpu_marks)],
        "train_cpu_s": round(cpu_marks[-1] - cpu_marks[0], 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe fields given on the command line."""
    names = [f.name for f in dataclasses.fields(recipe_for("lenet5", "fashion-mnist"))]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["lenet5", "resnet14-s"])
    ap.add_argument("--data-dir", default=FASHION_DIR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, help="train on only this many images (quick checks)")
    ap.add_argument("--no-test", action="store_true")
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--repeats", type=int, default=30, help="timed batches per stage")
    ap.add_argument("--stage-batch", type=int, default=256, help="images per timed batch")
    ap.add_argument("--no-train", action="store_true", help="only measure the stages")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--optimizer", choices=["adam", "sgd"])
    ap.add_argument("--schedule", choices=["cosine", "onecycle", "step", "constant"])
    ap.add_argument("--max-shift", type=int)
    ap.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--label-smoothing", type=float)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")

    env = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if args.stages:
        for arch in args.arch:
            torch.manual_seed(args.seed)
            model = create_model(arch, num_classes=10, in_channels=1, image_size=28)
            emit(
                {
                    "kind": "stages",
                    "arch": arch,
                    **stage_costs(model, batch=args.stage_batch, repeats=args.repeats),
                    **env,
                }
            )
    if args.no_train:
        return
    full = load_dataset("mnist-idx", args.data_dir, split="train")
    tr_idx, val_idx = stratified_split(full.targets, args.val, args.seed)
    tr_idx = tr_idx[: args.train_size]
    x_tr, y_tr = full.x[tr_idx], full.targets[tr_idx]
    x_val, y_val = full.x[val_idx], full.targets[val_idx]
    test = None if args.no_test else load_dataset("mnist-idx", args.data_dir, split="test")
    for arch in args.arch:
        recipe = dataclasses.replace(recipe_for(arch, "fashion-mnist"), **overrides(args))
        record = train_one(arch, recipe, (x_tr, y_tr), (x_val, y_val), args.seed)
        if test is not None:
            record["test_acc"] = evaluate_accuracy(record.pop("model"), test.x, test.targets)
        record.pop("model", None)
        emit({**record, **env})


if __name__ == "__main__":
    main()
