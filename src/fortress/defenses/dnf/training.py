"""DNF training (paper Alg. 1): frozen backbone, heads trained on ID + OOD batches with Eq. 8.

Training runs in the shared resumable epoch loop (:class:`fortress.training.EpochLoop`): after
every epoch the trainable weights, the optimiser state and the history are written atomically to a
checkpoint directory (safetensors + JSON). Batches and latent samples of epoch ``e`` come from a
generator seeded by ``(seed, e)``, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.defenses.dnf.losses import DNFLossWeights, LossTerms, id_loss, ood_loss, pseudo_labels
from fortress.device import device_of
from fortress.errors import ConfigError
from fortress.exits.network import EarlyExitNet
from fortress.generative.ood import OODSource
from fortress.tensors import check_labels
from fortress.training import EpochCallback, EpochLoop, History, RunOptions

__all__ = ["DNFTrainConfig", "DNFTrainReport", "StepInfo", "train_dnf", "trainable_parts"]

log = logging.getLogger(__name__)

#: Loss options beyond the paper, with the values that keep Eq. 6 as written.
EARLY_EXIT_DEFAULTS: dict[str, Any] = {"id_confident_from": None, "distill": 0.0, "id_kl_until": None}
#: Checkpoint files: ``dnf-checkpoint.json`` naming ``dnf-checkpoint-e<epoch>.safetensors``.
CKPT_NAME = "dnf-checkpoint"
CKPT_STATE = f"{CKPT_NAME}.json"


@dataclass(frozen=True)
class DNFTrainConfig:
    """Hyper-parameters of DNF training (defaults: paper App. D unless noted).

    Attributes:
        epochs: passes over the ID training set (paper: 10).
        optimizer: ``"sgd"`` (paper) or ``"adam"``.
        lr: learning rate. Default 0.01, not the paper's 0.001 (App. D): measured on LeNet-5/MNIST
            over seeds 0–3, lr 0.001 for 10 epochs left exit 0 silent on OOD data for half of the
            seeds (the OOD objective stalls with two classes tied), lr 0.1 collapsed, and lr 0.01
            sent 100 % of noise and DFME-generator images to exit 0 for every seed. The authors'
            released code also overrides its nominal 0.001 (to 0.01 data-based, 0.1 data-free).
        momentum: SGD momentum.
        weight_decay: weight decay.
        batch_size: ID rows per step.
        ood_batch_size: OOD rows per step.
        weights: loss weights (α = 0.1, τ = 1, KL weight 1, bounds of Eq. 7).
        ood_labels: where the OOD pseudo-labels ŷ of Eq. 7 come from: ``"current"`` (default, as
            in the authors' code) — exit 0's top-1 at each step; ``"initial"`` — exit 0 as it was
            before training (labels fixed when the OOD data are generated). With the reversed
            likelihood kept off exit 0 (``DNFLossWeights.ood_likelihood_at_first``), "current" sent
            100 % of noise and DFME-generator images to exit 0 for each of seeds 0–3; "initial"
            left exit 0 on a two-class tie for about half of the seeds.
        max_grad_norm: gradient-norm clipping of each step (``None``: off). Not in the paper: the OOD
            objective rewards confident, far-from-prior latents, so without a bound the shared head
            weights can grow until the ID KL overflows float32 (measured: NaN heads after 2 epochs
            at lr 0.01 on LeNet-5/MNIST with the 30-epoch DCGAN).
        seed: seeds batches, OOD samples and VIB noise.
    """

    epochs: int = 10
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    ood_batch_size: int = 128
    weights: DNFLossWeights = field(default_factory=DNFLossWeights)
    ood_labels: Literal["initial", "current"] = "current"
    max_grad_norm: float | None = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.ood_batch_size < 1:
            raise ConfigError(
                f"need lr > 0 and batch sizes >= 1, got lr={self.lr}, batch_size={self.batch_size}, "
                f"ood_batch_size={self.ood_batch_size}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.ood_labels not in ("initial", "current"):
            raise ConfigError(f"ood_labels must be 'initial' or 'current', got {self.ood_labels!r}")
        w = self.weights
        if w.alpha < 0 or w.tau < 0 or w.kl_weight < 0 or not 0 < w.ood_prob_floor < 1 or w.ood_kl_cap <= 0:
            raise ConfigError(f"invalid loss weights {w}")
        if w.distill < 0 or (w.id_confident_from is not None and w.id_confident_from < 1):
            raise ConfigError(
                f"loss weights need distill >= 0 and id_confident_from >= 1 (exit 0 stays uncertain on ID data), "
                f"got distill={w.distill}, id_confident_from={w.id_confident_from}"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form. Loss options left at the paper's values are not written, so a config
        without them is recorded (and matched by checkpoints) as before the options existed."""
        data = asdict(self)
        for key, default in EARLY_EXIT_DEFAULTS.items():
            if data["weights"][key] == default:
                del data["weights"][key]
        return data


@dataclass
class DNFTrainReport(History):
    """History of a DNF training run (per epoch, besides the mean loss of :class:`~fortress.training.History`).

    Attributes:
        id_loss: mean ID loss (Eq. 6).
        ood_loss: mean OOD loss (Eq. 7).
        val_acc: defended accuracy on the ID validation data.
        val_exit_hist: share of ID validation queries per exit.
        ood_exit_hist: share of 512 fixed OOD samples per exit.
        skipped_steps: steps skipped because their loss was not finite (whole run).
    """

    id_loss: list[float] = field(default_factory=list)
    ood_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_exit_hist: list[list[float]] = field(default_factory=list)
    ood_exit_hist: list[list[float]] = field(default_factory=list)
    skipped_steps: int = 0


@dataclass(frozen=True)
class StepInfo:
    """Progress of one training step (for progress bars)."""

    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    id_terms: LossTerms
    ood_terms: LossTerms


def _make_optimizer(params: list[torch.nn.Parameter], cfg: DNFTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def trainable_parts(net: EarlyExitNet) -> dict[str, torch.nn.Module]:
    """The modules DNF trains, by name: ``heads`` (and ``final_head`` when the final exit trains)."""
    parts: dict[str, torch.nn.Module] = {"heads": net.heads}
    if net.train_final_exit:
        parts["final_head"] = net.final_head
    return parts


@torch.no_grad()
def _exit_hist(net: EarlyExitNet, x: Tensor) -> list[float]:
    _, exits = net.forward_dynamic(x.to(device_of(net)))
    counts = torch.bincount(exits, minlength=net.num_exits).float()
    return (counts / counts.sum()).tolist()


def train_dnf(
    net: EarlyExitNet,
    x_id: Tensor,
    y_id: Tensor,
    ood: OODSource,
    *,
    config: DNFTrainConfig | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: EpochCallback | None = None,
) -> DNFTrainReport:
    """Train the exit heads of ``net`` with the DNF objective (Eq. 8, Alg. 1).

    Args:
        net: the early-exit network (its backbone stays frozen).
        x_id: ID training images ``(N, C, H, W)`` in [0, 1] (the victim's training data).
        y_id: their labels.
        ood: the OOD source (generator, proxy set, noise or mixture).
        config: hyper-parameters (paper defaults).
        val: ID validation data; defended accuracy and exit histogram are logged per epoch.
        checkpoint_dir: where to write the per-epoch checkpoint (``None``: no checkpoints).
        resume: continue from a checkpoint in ``checkpoint_dir`` if its config matches.
        on_step: progress callback after every step.
        on_epoch: progress callback after every epoch, ``on_epoch(epoch, mean_loss)``.

    Returns:
        The :class:`DNFTrainReport` (including epochs restored from a checkpoint).

    Raises:
        ArtifactError: the checkpoint is corrupt, or was written with a different configuration.
        InvalidInput: labels break the contract (:func:`~fortress.tensors.check_labels`).
        TrainingDiverged: the exit-head weights became non-finite.
    """
    y_id = check_labels(y_id, len(x_id), net.num_classes, name="y_id")
    val = None if val is None else (val[0], check_labels(val[1], len(val[0]), net.num_classes, name="val labels"))
    cfg = config or DNFTrainConfig()
    params = net.trainable_parameters()
    if not params:
        raise ConfigError("the early-exit network has no trainable parameters")
    opt = _make_optimizer(params, cfg)
    labeler = copy.deepcopy(net.heads[0]).eval()  # exit 0 before training (ood_labels="initial")
    for p in labeler.parameters():
        p.requires_grad_(False)
    trained_exits = list(range(net.num_exits if net.train_final_exit else net.num_exits - 1))
    n = x_id.shape[0]
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    report = DNFTrainReport()
    dev = device_of(net)  # the data stay where they are; each batch moves to the network

    def train_epoch(epoch: int, gen: torch.Generator) -> list[float]:
        perm = torch.randperm(n, generator=gen)
        net.train()
        sums = [0.0, 0.0, 0.0]
        for s in range(steps):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb, yb = x_id[idx].to(dev), y_id[idx].to(dev)
            xo = ood.sample(cfg.ood_batch_size, gen).to(dev)
            out = net.forward_all(torch.cat([xb, xo]), sample=True, generator=gen)
            b = xb.shape[0]
            out_id = _slice(out, 0, b)
            out_ood = _slice(out, b, None)
            t_id = id_loss(out_id, yb, cfg.weights, trained_exits)
            y_ood = _initial_labels(net, labeler, xo) if cfg.ood_labels == "initial" else pseudo_labels(out_ood)
            t_ood = ood_loss(out_ood, y_ood, cfg.weights, trained_exits)
            loss = t_id.total + cfg.weights.tau * t_ood.total
            opt.zero_grad(set_to_none=True)
            if not bool(torch.isfinite(loss)):
                report.skipped_steps += 1  # never let one overflowing batch poison the weights
                log.warning("DNF step %d of epoch %d: non-finite loss, step skipped", s, epoch)
                continue
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sums[0] += loss.item()
            sums[1] += t_id.total.item()
            sums[2] += t_ood.total.item()
            if on_step is not None:
                on_step(StepInfo(epoch, s, steps, loss.item(), t_id, t_ood))
        net.eval()
        return sums

    def record_epoch(epoch: int, sums: list[float]) -> None:
        report.loss.append(sums[0] / steps)
        report.id_loss.append(sums[1] / steps)
        report.ood_loss.append(sums[2] / steps)
        if val is not None:
            with torch.no_grad():
                logits, _ = net.forward_dynamic(val[0].to(dev))
            report.val_acc.append(float((logits.argmax(1) == val[1].to(dev)).float().mean()))
            report.val_exit_hist.append(_exit_hist(net, val[0]))
        report.ood_exit_hist.append(_exit_hist(net, ood.sample(512, torch.Generator().manual_seed(cfg.seed + 7))))

    loop = EpochLoop(
        "DNF",
        epochs=cfg.epochs,
        seed=cfg.seed,
        config=cfg.as_dict(),
        parts={**trainable_parts(net), "labeler": labeler},
        optimizer=opt,
        guarded=params,
        diverged_hint="lower the learning rate or max_grad_norm",
        prefix=CKPT_NAME,
    )
    loop.run(report, train_epoch, record_epoch, RunOptions(checkpoint_dir, resume, on_epoch))
    net.eval()
    return report


def _slice(out: Any, start: int, stop: int | None) -> Any:
    from fortress.exits.heads import HeadOutput
    from fortress.exits.network import AllExits

    sl = slice(start, stop)
    heads = tuple(
        HeadOutput(h.logits[sl], None if h.mu is None else h.mu[sl], None if h.logvar is None else h.logvar[sl])
        for h in out.heads
    )
    return AllExits(out.logits[:, sl], heads)


@torch.no_grad()
def _initial_labels(net: EarlyExitNet, labeler: torch.nn.Module, x: Tensor) -> Tensor:
    """Top-1 of the pre-training exit-0 head on ``x`` (the fixed OOD pseudo-labels)."""
    h = net.backbone.preprocess(x)
    for stage in net.backbone.stages[: net.exit_after[0] + 1]:
        h = stage(h)
    out: Tensor = labeler(h).logits.argmax(dim=1)
    return out
