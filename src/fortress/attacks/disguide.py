"""DisGUIDE: disagreement-guided data-free model extraction (Rosenthal, Enouen, Pham, Tan, AAAI 2023).

Two clones learn the victim from the same generated queries; the generator is trained, white-box
through the clones and without any query, to produce images on which the clones *disagree* (and
that spread over the classes). Every query trains the clones and goes into an experience-replay
memory from which extra training batches are drawn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks.base import Attack, AttackRun
from fortress.attacks.common import (
    OptimizerName,
    centered_log_probs,
    check_generator_shape,
    check_lr_milestones,
    keep_requires_grad,
    make_optimizer,
    milestone_schedulers,
    safe_log,
)
from fortress.attacks.hparams import hp
from fortress.attacks.replay import ReplayMemory, reinitialised_copy
from fortress.errors import ConfigError
from fortress.generative.dfme import DFMEGenerator, to_unit
from fortress.oracle import OutputMode

__all__ = ["DisGUIDE", "DisGUIDELoss", "disagreement", "soft_vote"]

log = logging.getLogger(__name__)

#: Soft-label clone losses (DFME's L1 on mean-corrected log-probabilities, or KL); hard labels use CE.
DisGUIDELoss = Literal["l1", "kl"]


def disagreement(probs: Tensor) -> Tensor:
    """DisGUIDE's disagreement: the standard deviation across clones, averaged over samples and classes.

    Shape:
        ``(E, B, K)`` clone probabilities (``E >= 2`` clones) → scalar.

    Example:
        >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> round(float(disagreement(p)), 4)  # |1 - 0| / sqrt(2) for two clones
        0.7071
    """
    return probs.std(dim=0).mean()


def soft_vote(logits: Tensor) -> Tensor:
    """Mean of the clones' probability rows: ``(E, B, K)`` logits → ``(B, K)`` probabilities."""
    return F.softmax(logits, dim=2).mean(dim=0)


class _Ensemble(nn.Module):
    """The clones as one module whose output is the log of their soft vote (for scoring only)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return safe_log(soft_vote(torch.stack([m(x) for m in self.members])))


class DisGUIDE(Attack):
    """DisGUIDE (Rosenthal, Enouen, Pham, Tan, AAAI 2023): two clones, a generator steered to their disagreement.

    Per iteration:

    1. ``g_iter`` generator steps, **no query**: on ``batch_size`` fresh latents, the generator
       minimises ``−disagreement + λ_div·Σ_j ᾱ_j log ᾱ_j``, where the disagreement is the standard
       deviation of the clones' probabilities across clones (averaged over samples and classes,
       :func:`disagreement`) and ``ᾱ`` is the batch mean of the clones' mean probabilities
       (DFMS-HL's class-diversity term). The gradient flows white-box through the clones, whose
       weights stay fixed in this step.
    2. ``d_iter`` student batches: ``batch_size`` generator images (generator in eval mode) are
       queried, stored in the replay memory and used for one optimiser step of every clone.
       Soft labels: L1 between each clone's logits and the victim's mean-centred log-probabilities
       (DFME's loss; ``loss="kl"``: KL); hard labels (the paper's hard-label variant): cross-entropy
       on the victim's top-1 label. A soft or top-k oracle with ``hard_label=True`` is used the same way.
    3. ``replay_iter`` more steps of every clone on batches drawn uniformly from the replay memory
       (the paper's "classic" experience replay; ``replay_iter=0`` turns it off).

    Query accounting: only the student batches query the victim, ``batch_size · d_iter`` per
    iteration (the paper's count); the generator step and replay cost nothing. After the last full
    iteration one batch of the remaining queries (at least two, for BatchNorm) is queried and
    trained on, so the run spends its whole budget (up to one query).

    The clone returned is the given one (ensemble member 0); the result's extras give each member's
    accuracy and the soft-vote accuracy of the ensemble (what the paper reports) when an eval set
    is given.

    Deviations from the paper's CIFAR-10 script (batch 256, d_iter 1, replay 3 batches from 1M,
    λ_div 0.2, generator Adam 1e-4, student SGD 0.03 momentum 0.9 weight decay 5e-4, decay ×0.3 at
    40 % and 80 % of the run), all available as options:

    * student Adam at ``lr_s=1e-3`` and no decay (``lr_milestones=()``): DFME's MNIST deviations
      (:class:`~fortress.attacks.dfme.DFME`), for the same reasons: SGD at 0.1 kills a LeNet-5
      clone, and decays planned for 20M queries freeze the clones at MNIST budgets;
    * generator ``ngf=16`` (paper 64) and images mapped from [-1, 1] to [0, 1] before querying, as in
      fortress's DFME (see :class:`~fortress.generative.dfme.DFMEGenerator`);
    * no grey-scale conversion of every 8th image (a CIFAR-only trick; MNIST has one channel).

    Args:
        oracle: soft or hard oracle (top-k rows are used as top-1 labels).
        budget: queries (``batch_size · d_iter`` per iteration).
        seed: seeds the clones' second initialisation, the latents and the replay draws.
        ensemble_size: clones trained together (paper 2; more gives a wider disagreement estimate).
        batch_size: images per generator step, student batch and replay batch (paper 256).
        g_iter: generator steps per iteration (paper 1).
        d_iter: queried student batches per iteration (paper 1 in the released scripts).
        replay_iter: replay batches per iteration (paper 3).
        replay_size: rows the replay memory keeps (paper 1M).
        diversity_weight: λ_div, the class-diversity weight (paper 0.2 on CIFAR-10, 0.04 on CIFAR-100).
        nz: latent dimension (paper 256).
        ngf: generator base channels (paper 64).
        lr_g: generator Adam learning rate (paper 1e-4).
        lr_s: clone learning rate (paper 0.03 with SGD).
        student_optimizer: ``"adam"`` or ``"sgd"`` (paper).
        momentum_s: SGD momentum (paper 0.9).
        weight_decay_s: clone weight decay (paper 5e-4).
        lr_milestones: fractions of the iterations where both learning rates are multiplied by
            ``lr_gamma`` (paper ``(0.4, 0.8)``).
        lr_gamma: decay factor (paper 0.3).
        loss: soft-label clone loss, ``"l1"`` (paper default) or ``"kl"``.
        hard_label: use only the victim's top-1 label even when the oracle gives probabilities.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")))
        >>> result = DisGUIDE(oracle, budget=600, batch_size=64, ngf=4, nz=16).run(create_model("lenet5-half"))
        >>> result.queries_used, result.extras["iterations"]
        (600, 9)
    """

    name = "disguide"
    output_modes = (OutputMode.SOFT, OutputMode.HARD, OutputMode.TOPK)
    cadence = "budget"

    ensemble_size: int = hp(default=2, ge=2, why="disagreement needs two clones")
    batch_size: int = hp(default=256, ge=2, why="BatchNorm needs two samples")
    g_iter: int = hp(default=1, ge=1)
    d_iter: int = hp(default=1, ge=1)
    replay_iter: int = hp(default=3, ge=0)
    replay_size: int = hp(default=1_000_000, ge=1)
    diversity_weight: float = hp(default=0.2, ge=0)
    nz: int = hp(default=256, ge=1)
    ngf: int = hp(default=16, ge=1)
    lr_g: float = hp(default=1e-4, gt=0)
    lr_s: float = hp(default=1e-3, gt=0)
    student_optimizer: OptimizerName = hp(default="adam")
    momentum_s: float = hp(default=0.9, ge=0, lt=1)
    weight_decay_s: float = hp(default=0.0, ge=0)
    lr_milestones: Sequence[float] = hp(default=())
    lr_gamma: float = hp(default=0.3, gt=0, le=1)
    loss: DisGUIDELoss = hp(default="l1")
    hard_label: bool = hp(default=False)

    def _validate(self) -> None:
        check_lr_milestones(self.lr_milestones)
        check_generator_shape(self.oracle.input_shape)
        if self.budget < 2:
            raise ConfigError(f"budget must pay for one batch of at least 2 queries, got {self.budget}")

    @property
    def uses_hard_labels(self) -> bool:
        """Whether the clones learn from top-1 labels (a hard or top-k oracle, or ``hard_label``)."""
        return self.hard_label or self.oracle.output_mode is not OutputMode.SOFT

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``batch_size · d_iter``."""
        return self.batch_size * self.d_iter

    # -- steps -----------------------------------------------------------------------------------
    def _clone_loss(self, logits: Tensor, answers: Tensor) -> Tensor:
        """One clone's loss on a batch: CE on top-1 labels, or the soft-label L1 / KL."""
        if self.uses_hard_labels:
            return F.cross_entropy(logits, answers.argmax(dim=1))
        if self.loss == "l1":
            return F.l1_loss(logits, centered_log_probs(answers))
        return F.kl_div(F.log_softmax(logits, dim=1), safe_log(answers), log_target=True, reduction="batchmean")

    def _train_clones(self, clones: nn.ModuleList, opt: torch.optim.Optimizer, x: Tensor, answers: Tensor) -> float:
        """One optimiser step of every clone on ``(x, answers)``; returns the mean clone loss."""
        clones.train()
        loss = torch.stack([self._clone_loss(c(x), answers) for c in clones]).sum()
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        return loss.item() / len(clones)

    def _generator_step(
        self, run: AttackRun, clones: nn.ModuleList, generator: DFMEGenerator, opt_g: torch.optim.Optimizer
    ) -> float:
        """One generator update toward clone disagreement and class diversity (no query); returns the disagreement."""
        clones.eval()
        generator.train()
        z = torch.randn(self.batch_size, self.nz, generator=run.rng).to(run.device)
        with keep_requires_grad(clones):
            clones.requires_grad_(False)  # white-box through the clones; only the generator learns here
            probs = F.softmax(torch.stack([c(to_unit(generator(z))) for c in clones]), dim=2)
            spread = disagreement(probs)
            loss = -spread
            if self.diversity_weight > 0:
                mean = probs.mean(dim=(0, 1)) + 1e-6
                loss = loss + self.diversity_weight * (mean * mean.log()).sum()
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
        opt_g.step()
        return spread.item()

    @torch.no_grad()
    def _sample(self, run: AttackRun, generator: DFMEGenerator, n: int) -> Tensor:
        generator.eval()  # the paper samples the student batches with the generator in eval mode
        return to_unit(generator(torch.randn(n, self.nz, generator=run.rng).to(run.device)))

    # -- the attack ------------------------------------------------------------------------------
    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Extract ``run.clone`` (ensemble member 0) from the oracle (data-free: no pool).

        Extras of the result: ``iterations``, ``cost_per_iteration``, ``replay_rows``,
        ``final_clone_loss``, ``mean_disagreement`` (the clones' disagreement on the generator's
        batches, averaged over the generator steps), ``generator_s`` and ``student_s`` (wall
        time), and with an eval set ``member_accs`` (every clone) and ``ensemble_acc`` (soft vote).
        """
        c, s, _ = self.oracle.input_shape
        twins = [reinitialised_copy(run.clone, run.rng) for _ in range(self.ensemble_size - 1)]
        clones = nn.ModuleList([run.clone, *twins])
        clones = clones.to(run.device)
        generator = DFMEGenerator(nz=self.nz, ngf=self.ngf, out_channels=c, image_size=s).to(run.device)
        opt_s = make_optimizer(
            clones, self.student_optimizer, lr=self.lr_s, momentum=self.momentum_s, weight_decay=self.weight_decay_s
        )
        opt_g = torch.optim.Adam(generator.parameters(), lr=self.lr_g)
        n_iter = self.budget // self.cost_per_iteration
        scheds = milestone_schedulers((opt_s, opt_g), self.lr_milestones, n_iter, self.lr_gamma)
        memory = ReplayMemory(self.replay_size)
        t_gen = t_stu = 0.0
        s_loss = float("nan")
        spreads: list[float] = []
        log.info("DisGUIDE: %d iterations of %d queries (budget %d)", n_iter, self.cost_per_iteration, self.budget)

        def student_batch(n: int) -> float:
            x = self._sample(run, generator, n)
            answers = run.query(x)
            memory.add(x, answers)
            loss = self._train_clones(clones, opt_s, x, answers)
            return loss

        for _ in range(n_iter):
            t0 = time.perf_counter()
            for _ in range(self.g_iter):
                spreads.append(self._generator_step(run, clones, generator, opt_g))
            t1 = time.perf_counter()
            for _ in range(self.d_iter):
                s_loss = student_batch(self.batch_size)
            for _ in range(self.replay_iter):
                xr, yr = memory.sample(self.batch_size, run.rng)
                self._train_clones(clones, opt_s, xr.to(run.device), yr.to(run.device))
            for sched in scheds:
                sched.step()
            t_gen += t1 - t0
            t_stu += time.perf_counter() - t1
            run.step_done()
        if run.queries_left >= 2:  # the rest of the budget: one smaller student batch
            t1 = time.perf_counter()
            s_loss = student_batch(run.queries_left)
            t_stu += time.perf_counter() - t1
            run.step_done()

        extras: dict[str, Any] = {
            "iterations": n_iter,
            "cost_per_iteration": self.cost_per_iteration,
            "replay_rows": len(memory),
            "final_clone_loss": s_loss,
            "mean_disagreement": sum(spreads) / len(spreads) if spreads else float("nan"),
            "generator_s": t_gen,
            "student_s": t_stu,
        }
        if run.eval_set is not None:
            clones.eval()
            extras["member_accs"] = [run.eval_set.score(m)[0] for m in clones]
            extras["ensemble_acc"] = run.eval_set.score(_Ensemble(list(clones)))[0]
        return extras
