"""Helpers shared by the extraction attacks: log-prob targets, soft losses, clone training.

* :func:`safe_log` and :func:`centered_log_probs` turn oracle probabilities into DFME's
  "mean-corrected logits" (Truong et al., CVPR 2021, §3.3): ``log p`` minus its per-row mean equals
  the victim's logits minus their per-row mean.
* :func:`soft_cross_entropy` is the knockoff loss (Orekondy et al., CVPR 2019).
* :func:`class_diversity_loss` is DFMS-HL's class-diversity term (Sanyal et al., CVPR 2022).
* :func:`keep_requires_grad` lets a generator learn through a clone that must not.
* :func:`train_clone` trains a clone on a labelled transfer set (knockoff-style attacks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.errors import ConfigError

__all__ = [
    "OptimizerName",
    "centered_log_probs",
    "check_generator_shape",
    "check_lr_milestones",
    "class_diversity_loss",
    "keep_requires_grad",
    "make_optimizer",
    "milestone_schedulers",
    "safe_log",
    "soft_cross_entropy",
    "train_clone",
    "train_transfer_set",
]

log = logging.getLogger(__name__)

#: Optimisers the attacks accept for their clones and generators.
OptimizerName = Literal["adam", "sgd"]


def safe_log(p: Tensor, eps: float = 1e-8) -> Tensor:
    """``log(p)`` with ``p`` clamped to at least ``eps`` (finite for zero probabilities)."""
    return p.clamp_min(eps).log()


def centered_log_probs(p: Tensor, eps: float = 1e-8) -> Tensor:
    """DFME's logit recovery ("mean correction", Truong et al. 2021): ``log p`` minus its row mean.

    Log-softmax is the logits minus a per-row constant, so centring it gives the victim's logits
    centred per row, whatever the softmax normaliser was.

    Shape:
        ``(B, K)`` probabilities → ``(B, K)`` centred log-probabilities.

    Example:
        >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
        >>> torch.allclose(centered_log_probs(logits.softmax(1)), logits - logits.mean(1, keepdim=True), atol=1e-6)
        True
    """
    lp = safe_log(p, eps)
    return lp - lp.mean(dim=1, keepdim=True)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Batch mean of ``-Σ_k y_k log softmax(logits)_k`` (Knockoff Nets' loss; one-hot ``y`` gives CE).

    Shape:
        ``(B, K)`` logits and ``(B, K)`` target rows → scalar.
    """
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def class_diversity_loss(logits: Tensor) -> Tensor:
    """Negative entropy of the batch-mean softmax, ``Σ_j α_j log α_j`` (DFMS-HL, Sanyal et al. 2022).

    Minimising it spreads a batch over the classes; it is ``-log K`` when the batch covers all ``K``
    classes evenly and 0 when every sample falls in one class.
    """
    alpha = F.softmax(logits, dim=1).mean(dim=0)
    return (alpha * safe_log(alpha)).sum()


@contextmanager
def keep_requires_grad(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag of ``module`` when the block ends.

    Inside, the block may freeze the module (``module.requires_grad_(False)``) to back-propagate
    through it into something else, e.g. a generator trained through the clone, white-box, while
    only the generator learns (DFME's diversity term, DFMS-HL's generator step).
    """
    flags = [p.requires_grad for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def make_optimizer(
    params: nn.Module, name: OptimizerName, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam (default betas) or SGD with ``momentum`` over ``params``' parameters."""
    if name == "adam":
        return torch.optim.Adam(params.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_clone(
    clone: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: OptimizerName = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_step: int | None = None,
    lr_gamma: float = 0.1,
    max_shift: int = 0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train ``clone`` on a labelled transfer set with :func:`soft_cross_entropy` (Orekondy et al. 2019).

    Args:
        clone: the clone, trained in place (left in eval mode).
        x: images ``(N, C, H, W)`` in [0, 1].
        targets: victim answers ``(N, K)``: probability rows, top-k rows or one-hot rows.
        epochs: passes over the set.
        batch_size: mini-batch size (the last, smaller batch is kept).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_step: StepLR period in epochs (``None``: constant learning rate).
        lr_gamma: StepLR factor.
        max_shift: random-translation augmentation in pixels (0: none, as in the original).
        generator: batch order and augmentation randomness.

    Returns:
        The mean training loss of every epoch.
    """
    if x.shape[0] != targets.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"transfer set has {x.shape[0]} images but {targets.shape[0]} target rows")
    opt = make_optimizer(clone, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    device = next(clone.parameters()).device
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=lr_gamma) if lr_step is not None else None
    losses: list[float] = []
    n = x.shape[0]
    for epoch in range(epochs):
        clone.train()
        perm = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if idx.numel() == 1 and n > 1:
                continue  # a 1-row batch breaks BatchNorm clones; it skips one sample per epoch at most
            xb = random_shift(x[idx], max_shift, generator).to(device)
            loss = soft_cross_entropy(clone(xb), targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        if sched is not None:
            sched.step()
        losses.append(total / max(count, 1))
        log.debug("clone epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    clone.eval()
    return losses


#: The clone-training hyper-parameters :func:`train_transfer_set` reads from an attack (those it declares).
TRANSFER_TRAINING = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "lr_step", "lr_gamma")


def train_transfer_set(
    attack: object, clone: nn.Module, x: Tensor, targets: Tensor, *, max_shift: int = 0, generator: torch.Generator
) -> list[float]:
    """:func:`train_clone` with the clone-training hyper-parameters ``attack`` declares.

    The data-based attacks (Knockoff Nets, smoothing, D-DAE) train their clone on the transfer set
    the same way; each declares ``epochs``, ``batch_size``, ``lr`` and ``optimizer`` and, where it
    tunes them, the others in :data:`TRANSFER_TRAINING` (the rest keep :func:`train_clone`'s defaults).
    """
    options = {name: getattr(attack, name) for name in TRANSFER_TRAINING if hasattr(attack, name)}
    return train_clone(clone, x, targets, max_shift=max_shift, generator=generator, **options)


def check_lr_milestones(milestones: Sequence[float]) -> None:
    """Raise :class:`ConfigError` unless ``milestones`` are increasing fractions in (0, 1)."""
    if any(not 0 < f < 1 for f in milestones) or list(milestones) != sorted(set(milestones)):
        raise ConfigError(f"lr_milestones must be increasing fractions in (0, 1), got {milestones}")


def check_generator_shape(shape: tuple[int, int, int], who: str = "the generator") -> None:
    """Raise :class:`ConfigError` unless ``(C, H, W)`` is square with a side divisible by 4 (DCGAN-style upsampling)."""
    _, h, w = shape
    if h != w or h % 4:
        raise ConfigError(f"{who} needs square images with a side divisible by 4, got {h}×{w}")


def milestone_schedulers(
    optimizers: Sequence[torch.optim.Optimizer], milestones: Sequence[float], iterations: int, gamma: float
) -> list[torch.optim.lr_scheduler.MultiStepLR]:
    """One MultiStepLR per optimiser, decaying by ``gamma`` at the ``milestones`` fractions of ``iterations``."""
    steps = sorted({max(1, round(f * iterations)) for f in milestones})
    return [torch.optim.lr_scheduler.MultiStepLR(o, steps, gamma=gamma) for o in optimizers]
