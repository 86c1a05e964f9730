"""The defender's extraction probe: a short data-free extraction run against its own trained DNF.

How well a DNF protects depends on the luck of its training: two trainings that pass the same
acceptance check can let a 300k-query DFME reach 10 % or 40 % (``benchmarks/results/dnf-seeds``).
The probe estimates this before deployment with what the defender has — the trained DNF, white-box,
and its own validation split — and nothing of the attacker's (no pool, no test data):

a DFME-style loop (Truong et al., CVPR 2021) of ``iterations`` rounds, each a generator step that
*maximises* the disagreement between a small student and the DNF's answers, with the gradient taken
exactly through the exit that answers (the defender owns the network, so no zeroth-order estimate
is needed), and ``student_steps`` student steps that minimise it on fresh generator images. The
score is the student's accuracy on the defender's validation split: the lower, the less the DNF
gave away. :func:`fortress.defenses.dnf.recipe.protect` trains several DNFs and keeps the one with
the lowest score (``ProtectConfig.select``).

Example:
    >>> result = extraction_probe(dnf, data.x_val, data.y_val, ProbeConfig(iterations=10))  # doctest: +SKIP
    >>> result.student_acc  # doctest: +SKIP
    0.12
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.defenses.dnf.defense import DNF
from fortress.errors import ConfigError
from fortress.exits.network import select_exits
from fortress.generative.dfme import DFMEGenerator, to_unit
from fortress.models import create_model
from fortress.tensors import check_labels

__all__ = ["ProbeConfig", "ProbeResult", "extraction_probe"]


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the extraction probe (a white-box, shortened DFME; defaults measured on LeNet-5/MNIST).

    Attributes:
        iterations: generator + student rounds.
        batch_size: generated images per step.
        student_steps: student steps per round (DFME's ``d_iter``).
        student: the student's architecture (model registry name).
        nz: generator latent size.
        ngf: generator width.
        lr_g: generator Adam learning rate.
        lr_s: student Adam learning rate.
        diversity_weight: weight of the class-diversity term of the generator loss (as in the DFME
            attack here: it keeps the generator from collapsing onto a few classes).
        seed: seeds the generator, the student and the latents; the same for every candidate, so
            candidates are compared under the same probe.
    """

    iterations: int = 120
    batch_size: int = 128
    student_steps: int = 5
    student: str = "lenet5-half"
    nz: int = 64
    ngf: int = 16
    lr_g: float = 5e-4
    lr_s: float = 1e-3
    diversity_weight: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        for label, value in (
            ("iterations", self.iterations),
            ("batch_size", self.batch_size - 1),
            ("student_steps", self.student_steps),
            ("nz", self.nz),
            ("ngf", self.ngf),
        ):
            if value < 1:
                raise ConfigError(f"invalid probe settings: {label} too small ({self})")
        if self.lr_g <= 0 or self.lr_s <= 0 or self.diversity_weight < 0:
            raise ConfigError(
                f"probe learning rates must be > 0 and diversity_weight >= 0, got lr_g={self.lr_g}, "
                f"lr_s={self.lr_s}, diversity_weight={self.diversity_weight}"
            )


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured.

    Attributes:
        student_acc: the student's accuracy on the defender's validation split (lower: better protected).
        exit_hist: share of the probe's generated images per exit over the last quarter of the run.
        wall_s: seconds the probe took.
    """

    student_acc: float
    exit_hist: tuple[float, ...]
    wall_s: float


def _centered_log_probs(p: Tensor) -> Tensor:
    lp = torch.log(p.clamp_min(1e-8))
    return lp - lp.mean(dim=1, keepdim=True)


def _diversity(logits: Tensor) -> Tensor:
    alpha = F.softmax(logits, dim=1).mean(dim=0)
    return (alpha * torch.log(alpha.clamp_min(1e-8))).sum()


def _answer(dnf: DNF, x: Tensor) -> tuple[Tensor, Tensor]:
    """The DNF's probabilities (differentiable in ``x`` through the answering exit) and exits."""
    logits = dnf.net.forward_all(x).logits  # (E, B, K)
    exits = select_exits(logits.detach(), dnf.net.thresholds)
    chosen = logits[exits, torch.arange(x.shape[0], device=x.device)]
    return F.softmax(chosen, dim=1), exits


def extraction_probe(dnf: DNF, x_val: Tensor, y_val: Tensor, config: ProbeConfig | None = None) -> ProbeResult:
    """Run the probe against ``dnf`` and score the student on the defender's validation split.

    Args:
        dnf: a trained DNF (left unchanged: its weights are frozen during the probe and restored).
        x_val: the defender's validation images ``(N, C, H, W)`` in [0, 1].
        y_val: their labels ``(N,)``.
        config: probe settings (default :class:`ProbeConfig`).

    Returns:
        The student's validation accuracy and the exit histogram of the probe's images.

    Raises:
        InvalidInput: ``y_val`` breaks the label contract.
        ConfigError: the victim's images are not square with a side divisible by 4 (the generator's shape).
    """
    cfg = config or ProbeConfig()
    y_val = check_labels(y_val, len(x_val), dnf.num_classes, name="y_val")
    c, h, w = dnf.victim.input_shape
    if h != w or h % 4:
        raise ConfigError(f"the probe's generator needs square images with a side divisible by 4, got {h}×{w}")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = DFMEGenerator(nz=cfg.nz, ngf=cfg.ngf, out_channels=c, image_size=h).to(dnf.device)
        student = create_model(cfg.student, num_classes=dnf.num_classes, in_channels=c, image_size=h).to(dnf.device)
    rng = torch.Generator().manual_seed(cfg.seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_s)
    counts = torch.zeros(dnf.num_exits)
    frozen = [(p, p.requires_grad) for p in dnf.net.parameters()]
    dnf.net.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for it in range(cfg.iterations):
            # generator: maximise the student-DNF disagreement, exactly through the DNF
            gen.train()
            student.eval()
            for p in student.parameters():
                p.requires_grad_(False)
            x = to_unit(gen(torch.randn(cfg.batch_size, cfg.nz, generator=rng).to(dnf.device)))
            probs, _ = _answer(dnf, x)
            s_logits = student(x)
            disagreement = (s_logits - _centered_log_probs(probs)).abs().mean()
            loss_g = -disagreement + cfg.diversity_weight * _diversity(s_logits)
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_g)
            opt_g.step()
            for p in student.parameters():
                p.requires_grad_(True)
            # student: fit the DNF's answers on fresh generator images
            student.train()
            for _ in range(cfg.student_steps):
                with torch.no_grad():
                    x = to_unit(gen(torch.randn(cfg.batch_size, cfg.nz, generator=rng).to(dnf.device)))
                    probs, exits = _answer(dnf, x)
                loss_s = F.l1_loss(student(x), _centered_log_probs(probs))
                opt_s.zero_grad(set_to_none=True)
                torch.autograd.backward(loss_s)
                opt_s.step()
                if it >= cfg.iterations - max(1, cfg.iterations // 4):
                    counts += torch.bincount(exits, minlength=dnf.num_exits).float().cpu()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    student.eval()
    with torch.no_grad():
        acc = float((student(x_val.to(dnf.device)).argmax(1).cpu() == y_val.cpu()).float().mean())
    hist = tuple(float(v) for v in counts / counts.sum().clamp_min(1))
    return ProbeResult(student_acc=acc, exit_hist=hist, wall_s=time.perf_counter() - t0)
