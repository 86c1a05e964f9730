"""Plain supervised training and evaluation of classifiers (victims, surrogates, clones).

Paper App. G: LeNet-5 victims train 20 epochs with Adam at lr 1e-3, which is what
:func:`train_classifier` does by default (cosine-annealed to 0, light random shifts for the small
embedded data set). Larger victims and data sets choose an optimiser, a learning-rate schedule,
label smoothing and horizontal flips (see :mod:`fortress.models.recipes` for the per-data-set
recipes and why each choice fits). Batches and augmentation are drawn from an explicit generator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.device import autocast, device_of
from fortress.errors import ConfigError
from fortress.tensors import check_labels

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerName",
    "ScheduleName",
    "TrainReport",
    "check_train_options",
    "evaluate_accuracy",
    "make_scheduler",
    "predict_logits",
    "random_hflip",
    "train_classifier",
]

log = logging.getLogger(__name__)

OptimizerName = Literal["adam", "sgd"]
ScheduleName = Literal["cosine", "onecycle", "step", "constant"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("adam", "sgd")
SCHEDULES: tuple[ScheduleName, ...] = ("cosine", "onecycle", "step", "constant")

#: OneCycle spends this fraction of the steps warming up from lr/25 to lr.
ONECYCLE_WARMUP = 0.25
#: The step schedule divides the learning rate by 10 after these fractions of the steps.
STEP_MILESTONES = (0.5, 0.75)


@dataclass
class TrainReport:
    """What a training run did: per-epoch loss/accuracy, wall time and per-epoch wall times (s)."""

    epochs: int
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    epoch_s: list[float] = field(default_factory=list)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched (restores the previous mode).

    Each batch runs on the model's device; the logits come back on ``x``'s device.
    """
    was = model.training
    model.eval()
    dev = device_of(model)
    try:
        outs = [model(x[i : i + batch_size].to(dev)).to(x.device) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs)


def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` as a fraction in [0, 1].

    Raises:
        InvalidInput: ``y`` breaks the label contract (:func:`~fortress.tensors.check_labels`).
    """
    y = check_labels(y, len(x))
    logits = predict_logits(model, x, batch_size)
    return float((logits.argmax(1) == check_labels(y, num_classes=logits.shape[1])).float().mean())


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left–right with probability 1/2 (one draw per image).

    Only for data whose classes survive a mirror image (clothes, photographs); never for digits
    or text, where a mirrored sample is not a sample of its class.

    Shape:
        ``(N, C, H, W)`` → ``(N, C, H, W)``.
    """
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


def _optimizer(
    model: nn.Module, name: OptimizerName, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    # Nesterov momentum: the usual choice for residual networks (He et al. 2016 recipes).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer, name: ScheduleName, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule ``name`` over ``steps`` optimiser steps peaking at ``lr``.

    ``"cosine"`` anneals from ``lr`` to 0; ``"onecycle"`` warms up from ``lr/25`` over the first
    quarter, then anneals (cosine) to nearly 0; ``"step"`` divides by 10 at 50 % and 75 % of the
    steps; ``"constant"`` keeps ``lr``.
    """
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=ONECYCLE_WARMUP, cycle_momentum=False
        )
    if name == "step":
        milestones = [max(1, int(f * steps)) for f in STEP_MILESTONES]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def check_train_options(
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    max_shift: int,
    optimizer: str,
    momentum: float,
    schedule: str,
    label_smoothing: float,
) -> None:
    """Validate training options (see :func:`train_classifier`), raising :class:`ConfigError` naming the bad one."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if weight_decay < 0 or max_shift < 0:
        raise ConfigError(f"need weight_decay >= 0 and max_shift >= 0; got {weight_decay}, {max_shift}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    max_shift: int = 2,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    optimizer: OptimizerName = "adam",
    momentum: float = 0.9,
    schedule: ScheduleName = "cosine",
    hflip: bool = False,
    label_smoothing: float = 0.0,
    milestones: tuple[int, ...] | None = None,
    amp: bool = False,
) -> TrainReport:
    """Train ``model`` with cross-entropy (defaults: Adam at 1e-3 as in paper App. G for LeNet-5).

    The defaults reproduce the original training exactly (same seed, same weights); every other
    option only changes anything when set.

    Args:
        model: any classifier taking [0, 1] images.
        x: training images ``(N, C, H, W)``.
        y: integer labels ``(N,)``.
        epochs: passes over the data.
        lr: learning rate (Adam's, SGD's, or OneCycle's peak).
        batch_size: mini-batch size.
        weight_decay: L2 weight decay of the optimiser.
        max_shift: random translation augmentation in pixels (0 turns it off).
        seed: seeds batch order and augmentation.
        val: optional validation set evaluated after each epoch.
        on_epoch: called as ``on_epoch(epoch, train_loss, val_acc)`` after each epoch.
        optimizer: ``"adam"`` or ``"sgd"`` (Nesterov momentum).
        momentum: SGD momentum (unused by Adam).
        schedule: per-step learning rate: ``"cosine"`` (annealed to 0), ``"onecycle"`` (warm-up to
            ``lr`` over the first quarter, then cosine down), ``"step"`` (÷10 at 50 % and 75 % of
            the run) or ``"constant"``.
        hflip: mirror half the images left–right (only for data whose classes are mirror-symmetric).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        milestones: ``"step"`` schedule only: the epochs after which the learning rate is divided
            by 10 (paper App. G, ResNet-34-8x: ``(80, 120)`` of 200); ``None``: at 50 % and 75 % of the run.
        amp: bf16 autocast for the forward passes on a GPU (no effect on the CPU).

    The model trains on its own device (:func:`fortress.device.device_of`); ``x`` and ``y`` may stay
    on the CPU, each batch is moved (the random draws stay on the CPU, so seeds mean the same everywhere).

    Returns:
        A :class:`TrainReport`.

    Raises:
        ConfigError: an option is out of range, or no images.
        InvalidInput: ``y`` (or ``val``'s labels) breaks the label contract: integer class indices
            ``(N,)`` or ``(N, 1)``, one per image, in ``[0, K)``.
    """
    check_train_options(epochs, lr, batch_size, weight_decay, max_shift, optimizer, momentum, schedule, label_smoothing)
    if x.shape[0] == 0:
        raise ConfigError("no training images (x is empty)")
    k = int(predict_logits(model, x[:1]).shape[1])  # the model's class count, for the label range
    y = check_labels(y, len(x), k, name="training labels")
    if val is not None:
        val = (val[0], check_labels(val[1], len(val[0]), k, name="validation labels"))
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, optimizer, lr, weight_decay, momentum)
    steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    if milestones is not None and schedule == "step":
        per_epoch = (x.shape[0] + batch_size - 1) // batch_size
        if any(m < 1 or m >= epochs for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ConfigError(f"milestones must be increasing epochs in [1, {epochs}), got {list(milestones)}")
        opt_sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[m * per_epoch for m in milestones], gamma=0.1
        )
        sched = opt_sched
    else:
        sched = make_scheduler(opt, schedule, lr, steps)
    dev = device_of(model)
    report = TrainReport(epochs=epochs)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(x[idx], max_shift, gen)
            if hflip:  # drawn after the shifts, so runs without flips keep their random stream
                xb = random_hflip(xb, gen)
            with autocast(dev, amp):
                logits = model(xb.to(dev))
            loss = F.cross_entropy(logits.float(), y[idx].to(dev), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        report.train_loss.append(total / count)
        report.epoch_s.append(time.perf_counter() - t_epoch)
        acc = evaluate_accuracy(model, *val) if val is not None else None
        if acc is not None:
            report.val_acc.append(acc)
        log.info("epoch %d/%d loss %.4f val_acc %s", epoch + 1, epochs, total / count, acc)
        if on_epoch is not None:
            on_epoch(epoch, total / count, acc)
    model.eval()
    report.wall_s = time.perf_counter() - t0
    return report
