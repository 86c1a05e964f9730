"""Plain supervised training and evaluation of classifiers (victims, surrogates, clones).

Paper App. G: LeNet-5 victims train 20 epochs with Adam at lr 1e-3. Batches are drawn with an
explicit generator; light random shifts are on by default for the small embedded data set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.errors import ConfigError
from fortress.tensors import check_labels

__all__ = ["TrainReport", "evaluate_accuracy", "predict_logits", "train_classifier"]

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What a training run did: per-epoch loss/accuracy and wall time."""

    epochs: int
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    wall_s: float = 0.0


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched (restores the previous mode)."""
    was = model.training
    model.eval()
    try:
        outs = [model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
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
) -> TrainReport:
    """Train ``model`` with Adam and cross-entropy (paper App. G defaults for LeNet-5).

    Args:
        model: any classifier taking [0, 1] images.
        x: training images ``(N, C, H, W)``.
        y: integer labels ``(N,)``.
        epochs: passes over the data.
        lr: Adam learning rate (cosine-annealed to 0 over the run).
        batch_size: mini-batch size.
        weight_decay: Adam weight decay.
        max_shift: random translation augmentation in pixels (0 turns it off).
        seed: seeds batch order and augmentation.
        val: optional validation set evaluated after each epoch.
        on_epoch: called as ``on_epoch(epoch, train_loss, val_acc)`` after each epoch.

    Returns:
        A :class:`TrainReport`.

    Raises:
        ConfigError: bad hyper-parameters or no images.
        InvalidInput: ``y`` (or ``val``'s labels) breaks the label contract: integer class indices
            ``(N,)`` or ``(N, 1)``, one per image, in ``[0, K)``.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if x.shape[0] == 0:
        raise ConfigError("no training images (x is empty)")
    k = int(predict_logits(model, x[:1]).shape[1])  # the model's class count, for the label range
    y = check_labels(y, len(x), k, name="training labels")
    if val is not None:
        val = (val[0], check_labels(val[1], len(val[0]), k, name="validation labels"))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    report = TrainReport(epochs=epochs)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(x[idx], max_shift, gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        report.train_loss.append(total / count)
        acc = evaluate_accuracy(model, *val) if val is not None else None
        if acc is not None:
            report.val_acc.append(acc)
        log.info("epoch %d/%d loss %.4f val_acc %s", epoch + 1, epochs, total / count, acc)
        if on_epoch is not None:
            on_epoch(epoch, total / count, acc)
    model.eval()
    report.wall_s = time.perf_counter() - t0
    return report
