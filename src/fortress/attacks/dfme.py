"""DFME: data-free model extraction with a zeroth-order generator step (Truong et al., CVPR 2021).

A generator G synthesises queries; each iteration takes ``g_iter`` generator steps that *maximise*
the clone–victim disagreement (its gradient through the black-box victim is estimated by forward
differences) and then ``d_iter`` clone ("student") steps that minimise it on fresh samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks.base import Attack, AttackRun, count_labels
from fortress.attacks.common import (
    OptimizerName,
    centered_log_probs,
    check_generator_shape,
    check_lr_milestones,
    class_diversity_loss,
    keep_requires_grad,
    make_optimizer,
    milestone_schedulers,
    safe_log,
)
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError
from fortress.generative.dfme import DFMEGenerator, to_unit
from fortress.oracle import OutputMode

__all__ = ["DFME", "PAPER_MILESTONES", "DFMELoss", "zo_gradient"]

log = logging.getLogger(__name__)

#: Disagreement measures: DFME's L1 on mean-corrected logits, or MAZE's KL on probabilities.
DFMELoss = Literal["l1", "kl"]

#: The schedule of the DFME paper's CIFAR-10 runs, as fractions of the run (``lr_milestones``).
PAPER_MILESTONES = (0.1, 0.3, 0.5)


def zo_gradient(
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    m: int,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward-difference estimate of the gradient of ``mean_i objective(x)_i`` (DFME, Truong et al. 2021).

    For each of the ``N`` points, draw ``m`` directions ``u_j`` uniformly on the unit sphere of
    ``R^d`` (``d`` = values per point) and average ``d · [f(x + ε u_j) − f(x)] / ε · u_j``; the
    ``1/N`` of the batch mean is included. ``objective`` is called once, on all ``N·(m+1)`` points
    (the base point first, then its ``m`` perturbations), and must return one value per point.

    Args:
        x: base points ``(N, ...)`` (DFME: the generator's pre-tanh output).
        objective: maps ``(N·(m+1), ...)`` points to ``(N·(m+1),)`` values.
        m: random directions per point.
        epsilon: finite-difference step.
        generator: randomness of the directions.

    Returns:
        ``(grad, base_values)``: the estimate shaped like ``x`` and ``objective`` at the ``N`` base points.

    Example:
        >>> x = torch.randn(3, 5)
        >>> g, _ = zo_gradient(x, lambda p: (p**2).sum(1), m=400, epsilon=1e-4)
        >>> bool(torch.nn.functional.cosine_similarity(g.flatten(), (2 * x / 3).flatten(), dim=0) > 0.9)
        True
    """
    n = x.shape[0]
    d = x[0].numel()
    flat = x.detach().reshape(n, 1, d)
    u = torch.randn(n, m, d, generator=generator, dtype=x.dtype).to(x.device)
    u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
    points = torch.cat([flat, flat + epsilon * u], dim=1).reshape(n * (m + 1), *x.shape[1:])
    values = objective(points).reshape(n, m + 1)
    slopes = (values[:, 1:] - values[:, :1]) / epsilon  # (N, m)
    grad = (slopes.unsqueeze(2) * u).mean(dim=1) * (d / n)
    return grad.reshape(x.shape), values[:, 0]


def _disagreement(clone_logits: Tensor, victim_probs: Tensor, loss: DFMELoss) -> Tensor:
    """Per-sample disagreement ``(B,)``: L1 to the centred victim log-probs, or KL(victim ‖ clone)."""
    if loss == "l1":
        return (clone_logits - centered_log_probs(victim_probs)).abs().mean(dim=1)
    lp = safe_log(victim_probs)
    return (victim_probs * (lp - F.log_softmax(clone_logits, dim=1))).sum(dim=1)


class DFME(Attack):
    """Data-Free Model Extraction (Truong, Maini, Walls, Papernot, CVPR 2021); soft labels only.

    Per iteration: ``g_iter`` generator steps, each on ``batch_size`` fresh latents, whose gradient
    through the victim is the forward-difference estimate of :func:`zo_gradient` (``grad_m``
    unit-sphere directions in pre-tanh space, step ``grad_epsilon``, scaled by ``d``) of the negative
    disagreement, pushed into G with ``fake.backward(grad)`` so that G *maximises* disagreement; then
    ``d_iter`` student steps on fresh generator samples, each minimising the disagreement (L1
    between clone logits and the victim's mean-centred log-probabilities). Queries per iteration are
    exactly ``batch_size · (g_iter · (grad_m + 1) + d_iter)`` as in the original (minus one batch
    with ``reuse_base_queries``). Iterations = ``budget // cost``; the learning-rate milestones are
    fractions of that number. No batch ever passes the budget. When less than one iteration's cost
    is left, ``tail_student_steps`` spends what remains on student-only steps of a full batch (the
    original stops; fewer than ``batch_size`` queries stay unspent).

    Deviations and defaults, measured with ``benchmarks/dfme_mnist_sanity.py`` (LeNet-5 victim at
    97.1 % on the embedded MNIST test split, LeNet-5 clone, seed 0, one CPU thread). The paper
    values stay available as options:

    * generator images are mapped from [-1, 1] to [0, 1] before querying (the oracle contract;
      models normalise inside), see :class:`~fortress.generative.dfme.DFMEGenerator`;
    * ``ngf=16`` (paper 64): the generator dominates the cost of an iteration and the 16-channel
      one is about 7× faster at 28×28; it still reaches 94.6 % at 1M queries, so its capacity is
      not the bottleneck on MNIST;
    * student Adam at ``lr_s=1e-3`` (paper: SGD 0.1, momentum 0.9, weight decay 5e-4, which kills a
      LeNet-5 student within a few iterations: dead ReLUs, constant output);
    * generator Adam ``lr_g=5e-4`` (DFME's value before the CIFAR-10 change to 1e-4);
    * ``lr_milestones=()``, no decay (paper: 0.1, 0.3, 0.5 of the run, gamma 0.3). The student
      only starts learning after 50–100k queries, so at MNIST budgets those drops freeze it first:
      with them a 200k run ends at chance (10 %), without them at 72 %;
    * ``diversity_weight=20`` adds DFMS-HL's class-diversity term (Sanyal et al. 2022) to the
      generator loss, computed white-box through the clone (no queries). Plain DFME collapses onto
      a few classes (≈77 % of the victim's labels were 0 or 8, digits 1 and 9 never appeared) and
      plateaus at 77.5 % from 300k to 500k queries; with the term every class gets 6–14 % of the
      queries and the clone reaches 91.6 % at 500k and 94.6 % at 1M. Set 0 for the paper's DFME.
      The weight is relative to the ZO objective as scaled here (L1 averaged over classes, batch
      mean); 1 barely changed the coverage;
    * the per-point objective averages the L1 over classes; the original also divides the estimate
      by the number of classes, a constant Adam absorbs;
    * ``reuse_base_queries`` (off: it changes the paper's query accounting) trains the student on
      the victim's answers at the generator step's base points in place of one fresh student batch,
      saving ``batch_size`` queries per iteration. Measured with the diversity term: +4 points at
      200k–300k queries (76.7 % vs 72.8 % at 200k), no difference at 500k (91.8 % vs 91.6 %).

    Args:
        oracle: soft-label oracle (``OutputMode.SOFT``).
        budget: queries the attack may spend (paper: 2M for MNIST/SVHN, 20M for CIFAR-10).
        seed: seeds the generator's initialisation, latents and ZO directions.
        batch_size: ``B``, images per generator or student batch (paper 256).
        grad_m: ZO directions per image ``m`` (paper scripts 1; DNF uses 5).
        grad_epsilon: finite-difference step in pre-tanh space (paper 1e-3).
        g_iter: generator steps per iteration (paper 1).
        d_iter: student steps per iteration (paper 5).
        nz: latent dimension (paper 256).
        ngf: generator base channels (paper 64).
        loss: ``"l1"`` (paper) or ``"kl"`` (MAZE).
        lr_s: student learning rate (paper 0.1 with SGD).
        student_optimizer: ``"adam"`` or ``"sgd"`` (paper).
        momentum_s: student SGD momentum (paper 0.9; unused by Adam).
        weight_decay_s: student weight decay (paper 5e-4).
        lr_g: generator Adam learning rate (paper 1e-4 for CIFAR-10, 5e-5 for SVHN).
        lr_milestones: fractions of the iterations where both learning rates are multiplied by
            ``lr_gamma`` (paper ``(0.1, 0.3, 0.5)``, see :data:`PAPER_MILESTONES`).
        lr_gamma: learning-rate decay factor (paper 0.3).
        diversity_weight: weight of the class-diversity term in the generator loss (0: paper DFME).
        reuse_base_queries: train the student on the generator step's base-point answers.
        tail_student_steps: spend a remainder smaller than one iteration on student-only steps.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> result = DFME(oracle, budget=2 * 256 * 7).run(create_model("lenet5-half"))
        >>> result.queries_used, result.extras["iterations"]
        (3584, 2)
    """

    name = "dfme"
    output_modes = (OutputMode.SOFT,)
    cadence = "budget"

    batch_size: int = hp(default=256, ge=2, why="BatchNorm needs two samples")
    grad_m: int = hp(default=1, ge=1)
    grad_epsilon: float = hp(default=1e-3, gt=0)
    g_iter: int = hp(default=1, ge=1)
    d_iter: int = hp(default=5, ge=1)
    nz: int = hp(default=256, ge=1)
    ngf: int = hp(default=16, ge=1)
    loss: DFMELoss = hp(default="l1")
    lr_s: float = hp(default=1e-3, gt=0)
    student_optimizer: OptimizerName = hp(default="adam")
    momentum_s: float = hp(default=0.9, ge=0, lt=1)
    weight_decay_s: float = hp(default=0.0, ge=0)
    lr_g: float = hp(default=5e-4, gt=0)
    lr_milestones: Sequence[float] = hp(default=())
    lr_gamma: float = hp(default=0.3, gt=0, le=1)
    diversity_weight: float = hp(default=20.0, ge=0)
    reuse_base_queries: bool = hp(default=False)
    tail_student_steps: bool = hp(default=True)

    def _validate(self) -> None:
        check_lr_milestones(self.lr_milestones)
        check_generator_shape(self.oracle.input_shape, "DFME's generator")
        if self.budget < self.cost_per_iteration:
            raise ConfigError(
                f"budget {self.budget} is below the cost of one DFME iteration "
                f"({self.cost_per_iteration} queries = batch_size·(g_iter·(grad_m+1) + d_iter)); "
                "raise the budget or shrink batch_size"
            )

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``B·(g_iter·(m+1) + d_iter)``, less one batch if ``reuse_base_queries``."""
        student = self.d_iter - (1 if self.reuse_base_queries else 0)
        return self.batch_size * (self.g_iter * (self.grad_m + 1) + student)

    @property
    def iterations(self) -> int:
        """Full iterations the budget pays for."""
        return self.budget // self.cost_per_iteration

    # -- the two steps ---------------------------------------------------------------------------
    def _generator_step(
        self, run: AttackRun, generator: DFMEGenerator, opt_g: torch.optim.Optimizer
    ) -> tuple[Tensor, Tensor]:
        """One generator update; returns the base images and the victim's answers on them."""
        clone = run.clone
        clone.eval()
        generator.train()
        z = torch.randn(self.batch_size, self.nz, generator=run.rng).to(run.device)
        opt_g.zero_grad(set_to_none=True)
        x_pre = generator(z, pre_x=True)
        base_probs: list[Tensor] = []

        @torch.no_grad()
        def objective(points: Tensor) -> Tensor:
            images = to_unit(torch.tanh(points))
            probs = run.query(images, count=False)  # the label histogram covers the student steps
            base_probs.append(probs.view(self.batch_size, self.grad_m + 1, -1)[:, 0])
            return self._point_objective(self._clone_logits(clone, images), probs)

        grad, _ = zo_gradient(x_pre, objective, m=self.grad_m, epsilon=self.grad_epsilon, generator=run.rng)
        surrogate = (x_pre * grad).sum()  # d surrogate / d x_pre = grad, i.e. fake.backward(grad)
        if self.diversity_weight > 0:
            with keep_requires_grad(clone):
                clone.requires_grad_(False)  # white-box through the clone, but only G learns here
                div = class_diversity_loss(self._clone_logits(clone, to_unit(torch.tanh(x_pre))))
            surrogate = surrogate + self.diversity_weight * div
        torch.autograd.backward(surrogate)
        opt_g.step()
        return to_unit(torch.tanh(x_pre.detach())), base_probs[0]

    def _clone_logits(self, clone: nn.Module, images: Tensor) -> Tensor:
        """The clone's answer the generator step compares with the victim's (a hook for subclasses)."""
        out: Tensor = clone(images)
        return out

    def _point_objective(self, clone_logits: Tensor, probs: Tensor) -> Tensor:
        """Per-point value the generator step descends: the negative disagreement (a hook for subclasses)."""
        return -_disagreement(clone_logits, probs, self.loss)

    def _student_step(
        self, clone: nn.Module, opt_s: torch.optim.Optimizer, images: Tensor, probs: Tensor, hist: Tensor
    ) -> float:
        """One student update on the victim's answers ``probs``; their labels are counted into ``hist``."""
        clone.train()
        loss = self._student_loss(clone, images, probs)
        opt_s.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt_s.step()
        count_labels(hist, probs)
        return loss.item()

    def _student_loss(self, clone: nn.Module, images: Tensor, probs: Tensor) -> Tensor:
        """The student's loss on one batch (a hook for subclasses)."""
        logits = clone(images)
        if self.loss == "l1":
            return F.l1_loss(logits, centered_log_probs(probs))
        return F.kl_div(F.log_softmax(logits, dim=1), safe_log(probs), log_target=True, reduction="batchmean")

    def _student_query(self, run: AttackRun, x: Tensor) -> Tensor:
        """The victim's answers to a student batch (a hook for subclasses; the labels are counted by the step)."""
        return run.query(x, count=False)

    @torch.no_grad()
    def _sample(self, run: AttackRun, generator: DFMEGenerator) -> Tensor:
        # G stays in train mode (batch statistics), as in the original student step.
        generator.train()
        return to_unit(generator(torch.randn(self.batch_size, self.nz, generator=run.rng).to(run.device)))

    # -- the attack ------------------------------------------------------------------------------
    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Extract ``run.clone`` from the oracle (data-free: no pool).

        Extras of the result: ``iterations``, ``tail_student_steps`` (student-only steps after the
        last iteration), ``cost_per_iteration``, ``label_hist`` (victim top-1 counts over the
        student-step queries: class coverage), ``final_student_loss``, ``generator_s`` and
        ``student_s`` (wall time of each part, victim included).
        """
        c, s, _ = self.oracle.input_shape
        clone = run.clone
        generator = DFMEGenerator(nz=self.nz, ngf=self.ngf, out_channels=c, image_size=s).to(run.device)
        opt_s = make_optimizer(
            clone, self.student_optimizer, lr=self.lr_s, momentum=self.momentum_s, weight_decay=self.weight_decay_s
        )
        opt_g = torch.optim.Adam(generator.parameters(), lr=self.lr_g)
        n_iter = self.iterations
        scheds = milestone_schedulers((opt_s, opt_g), self.lr_milestones, n_iter, self.lr_gamma)
        t_gen = t_stu = 0.0
        last_loss = float("nan")
        log.info("DFME: %d iterations of %d queries (budget %d)", n_iter, self.cost_per_iteration, self.budget)

        for _ in range(n_iter):
            t0 = time.perf_counter()
            for _ in range(self.g_iter):
                base_x, base_p = self._generator_step(run, generator, opt_g)
            t1 = time.perf_counter()
            for j in range(self.d_iter):
                if j == 0 and self.reuse_base_queries:
                    x, p = base_x, base_p
                else:
                    x = self._sample(run, generator)
                    p = self._student_query(run, x)
                last_loss = self._student_step(clone, opt_s, x, p, run.label_hist)
            for sched in scheds:
                sched.step()
            t_gen += t1 - t0
            t_stu += time.perf_counter() - t1
            run.step_done()

        tail = 0
        while self.tail_student_steps and run.queries_left >= self.batch_size:
            t1 = time.perf_counter()
            x = self._sample(run, generator)
            last_loss = self._student_step(clone, opt_s, x, self._student_query(run, x), run.label_hist)
            t_stu += time.perf_counter() - t1
            tail += 1
            run.step_done()

        return {
            "iterations": n_iter,
            "tail_student_steps": tail,
            "cost_per_iteration": self.cost_per_iteration,
            "final_student_loss": last_loss,
            "generator_s": t_gen,
            "student_s": t_stu,
        }
