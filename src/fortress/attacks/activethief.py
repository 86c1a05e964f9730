"""ActiveThief: pool-based active learning for model extraction (Pal et al., AAAI 2020).

Label a random seed set, then repeatedly train the clone and let it choose the next queries from
the unlabelled pool: at random, by uncertainty (entropy), by greedy k-center core-set, by DFAL
(smallest DeepFool perturbation) or by DFAL followed by k-center.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from fortress.attacks.base import AttackRun, PoolKind
from fortress.attacks.common import safe_log
from fortress.attacks.growing_set import GrowingSetAttack
from fortress.attacks.hparams import hp
from fortress.errors import ConfigError

__all__ = ["ActiveThief", "ActiveThiefStrategy", "deepfool_norms", "k_center_greedy"]

#: Selection strategies of ActiveThief (the original's names, ``dfal+k-center`` for "DFAL + k-center").
ActiveThiefStrategy = Literal["random", "uncertainty", "k-center", "dfal", "dfal+k-center"]

#: Rows per clone forward pass over the pool (bounds memory, stays batched).
_CHUNK = 1024


@torch.no_grad()
def _softmax_outputs(clone: nn.Module, x: Tensor) -> Tensor:
    """The clone's softmax rows on ``x``, computed in chunks (eval mode)."""
    clone.eval()
    device = next(clone.parameters()).device
    outs = [torch.softmax(clone(x[i : i + _CHUNK].to(device)).float(), 1).cpu() for i in range(0, x.shape[0], _CHUNK)]
    return torch.cat(outs) if outs else torch.zeros(0)


def k_center_greedy(candidates: Tensor, centers: Tensor, k: int) -> Tensor:
    """Greedy k-center core-set selection (Sener & Savarese 2018; ActiveThief's ``k-center``).

    Keeps the minimum L2 distance of every candidate to the chosen set, starting from ``centers``,
    and ``k`` times adds the candidate farthest from it (then lowers the running minimum with the
    distances to the new centre): ``O(N·(M + k))`` work in ``k`` vectorised steps.

    Args:
        candidates: feature rows ``(N, D)`` to choose from.
        centers: feature rows ``(M, D)`` already chosen (``M`` may be 0).
        k: rows to choose (``k <= N``).

    Returns:
        Indices into ``candidates`` ``(k,)``, in the order chosen (distinct).

    Example:
        >>> k_center_greedy(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([[0.0]]), 2).tolist()
        [2, 1]
    """
    n = candidates.shape[0]
    if not 0 <= k <= n:
        raise ConfigError(f"k-center needs 0 <= k <= {n} candidates, got k={k}")
    if centers.shape[0]:
        dist = torch.full((n,), float("inf"))
        for i in range(0, centers.shape[0], _CHUNK):
            dist = torch.minimum(dist, torch.cdist(candidates, centers[i : i + _CHUNK]).min(1).values)
    else:
        dist = torch.full((n,), float("inf"))
    chosen = torch.empty(k, dtype=torch.long)
    for j in range(k):
        # with no centres yet every distance is inf and argmax picks row 0 (deterministic)
        pick = int(dist.argmax())
        chosen[j] = pick
        dist = torch.minimum(dist, (candidates - candidates[pick]).norm(dim=1))
        dist[pick] = -1.0  # never picked twice, even among duplicates
    return chosen


def deepfool_norms(
    clone: nn.Module, x: Tensor, *, max_iter: int = 20, overshoot: float = 0.02, chunk: int = 256
) -> Tensor:
    """L2 norm of the DeepFool perturbation (Moosavi-Dezfooli et al. 2016) of every row, batched.

    Per iteration, the gradients of all ``K`` logits come from one backward pass over ``K``
    stacked copies of the still-unflipped rows. Each row then steps toward its closest linearised
    boundary ``min_k |f_k − f_ŷ| / ‖∇f_k − ∇f_ŷ‖``; the accumulated step is scaled by
    ``1 + overshoot`` and the image clipped to [0, 1]. Rows still unflipped after ``max_iter``
    iterations get ``inf`` (they are the farthest from a boundary).

    Args:
        clone: the model to attack (used in eval mode).
        x: images ``(N, C, H, W)`` in [0, 1].
        max_iter: DeepFool iterations (ActiveThief: 20).
        overshoot: DeepFool overshoot.
        chunk: rows per batch (memory is ``K·chunk`` images).

    Returns:
        ``(N,)`` perturbation norms ``‖x_adv − x‖₂``.
    """
    clone.eval()
    device = next(clone.parameters()).device
    norms: list[Tensor] = []
    for s in range(0, x.shape[0], chunk):
        x0 = x[s : s + chunk].to(device).float()
        b = x0.shape[0]
        with torch.no_grad():
            label = clone(x0).argmax(1)
        k = int(clone(x0[:1]).shape[1]) if b else 0
        r_tot = torch.zeros_like(x0)
        x_adv = x0.clone()
        active = torch.ones(b, dtype=torch.bool, device=device)
        rows = torch.arange(b, device=device)
        for _ in range(max_iter):
            idx = rows[active]
            if idx.numel() == 0:
                break
            m = idx.numel()
            xr = x_adv[idx].repeat(k, 1, 1, 1).requires_grad_(True)  # copy c of row i at c·m + i
            logits = clone(xr).float().view(k, m, k)
            (grads,) = torch.autograd.grad(logits.diagonal(dim1=0, dim2=2).sum(), xr)
            grads = grads.view(k, m, -1).transpose(0, 1)  # (m, K, D): ∇ of each logit
            f = logits.detach()[0]  # (m, K): every copy gives the same logits
            lab = label[idx]
            w = grads - grads[torch.arange(m), lab].unsqueeze(1)
            fd = (f - f.gather(1, lab.unsqueeze(1))).abs()
            wn = w.norm(dim=2).clamp_min(1e-12)
            ratio = (fd / wn).scatter(1, lab.unsqueeze(1), float("inf"))
            best = ratio.argmin(1)
            wb = w[torch.arange(m), best]
            step = ((fd[torch.arange(m), best] + 1e-4) / wn[torch.arange(m), best].square()).unsqueeze(1) * wb
            r_tot[idx] += step.view_as(x0[idx])
            x_adv[idx] = (x0[idx] + (1 + overshoot) * r_tot[idx]).clamp(0.0, 1.0)
            with torch.no_grad():
                flipped = clone(x_adv[idx]).argmax(1) != lab
            active[idx[flipped]] = False
        norm = (x_adv - x0).flatten(1).norm(dim=1)
        norms.append(torch.where(active, torch.full_like(norm, float("inf")), norm).cpu())
    return torch.cat(norms) if norms else torch.zeros(0)


class ActiveThief(GrowingSetAttack):
    """ActiveThief (Pal, Gupta, Shukla, Kanade, Shevade, Ganapathy, AAAI 2020).

    ``seed_size`` random pool images are queried; then each of ``rounds`` rounds (1) trains the
    clone on every labelled image (from its initial weights when ``retrain_from_scratch``, as the
    original does; otherwise fine-tuning the previous round's clone), (2) runs it over the
    unlabelled rest of the pool and (3) queries the ``k`` images the strategy picks:

    * ``"random"``: uniformly at random;
    * ``"uncertainty"``: the highest entropy of the clone's softmax;
    * ``"k-center"``: greedy core-set in the clone's softmax space, the labelled images' outputs
      as initial centres (:func:`k_center_greedy`);
    * ``"dfal"``: the smallest DeepFool perturbation on the clone (:func:`deepfool_norms`), i.e.
      the images nearest its decision boundary;
    * ``"dfal+k-center"``: the ``dfal_shortlist`` images with the smallest DeepFool perturbation
      (original: the total budget), then k-center among them.

    The queried images are the pool images themselves (never the adversarial versions), and no
    image is ever queried twice. The clone is trained once more on the final labelled set. The
    budget is spent exactly: ``budget − seed_size`` is split over the rounds as evenly as
    possible (the first rounds take the remainder), so the pool must hold ``budget`` images.
    DeepFool over the whole unlabelled pool costs ``K`` clone passes per image and iteration; with
    ``dfal_candidates`` it runs on that many unlabelled images drawn at random each round.

    Deviations from the original: no validation split (the original labels 1,000 extra pool images
    for early stopping, charged to the budget); the clone trains for a fixed ``epochs`` with Adam
    (the original: Adam with TensorFlow defaults, up to 1,000 epochs with early stopping). Soft
    answers are used as soft targets (the original's default returns the softmax too); a hard
    oracle gives one-hot targets, the paper's headline setting.

    Args:
        oracle: soft, hard or top-k oracle.
        budget: queries to spend (seed set included).
        seed: seeds the seed set, random picks, DFAL candidates, batch order and torch's RNG.
        strategy: selection strategy (see above).
        seed_size: random images labelled first (``None``: ``max(1, budget // (rounds + 1))``, so the
            seed set and every round have about the same size).
        rounds: selection rounds (original README: 10).
        epochs: clone training epochs per round.
        lr: Adam learning rate of the clone.
        batch_size: training mini-batch size (original: 50).
        retrain_from_scratch: reset the clone to its initial weights before each training (original).
        top1: train on the top-1 label of every answer only (the attacker's counter to output perturbation).
        deepfool_iters: DeepFool iterations (original: 20).
        overshoot: DeepFool overshoot.
        dfal_candidates: unlabelled images DeepFool scores per round (``None``: all of them).
        dfal_shortlist: DFAL shortlist for ``"dfal+k-center"`` (``None``: the budget, as the original).

    Example:
        >>> from fortress.defenses import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")), output_mode="hard")
        >>> attack = ActiveThief(oracle, budget=50, strategy="k-center", rounds=2, epochs=1)
        >>> result = attack.run(create_model("lenet5"), torch.rand(80, 1, 28, 28))
        >>> result.queries_used, result.extras["round_sizes"]
        (50, [16, 33, 50])
    """

    name = "activethief"
    pool_kind = PoolKind.NATURAL
    default_pool = "patches"

    strategy: ActiveThiefStrategy = hp(default="uncertainty")
    seed_size: int | None = hp(default=None, ge=1)
    rounds: int = hp(default=10, ge=1)
    epochs: int = hp(default=30, ge=1)
    batch_size: int = hp(default=50, ge=1)
    deepfool_iters: int = hp(default=20, ge=1)
    overshoot: float = hp(default=0.02, ge=0)
    dfal_candidates: int | None = hp(default=None, ge=1)
    dfal_shortlist: int | None = hp(default=None, ge=1)

    def _validate(self) -> None:
        if self.seed_size is None:  # the seed set and every round about the same size
            self.seed_size = max(1, self.budget // (self.rounds + 1))
        if not 1 <= self.seed_size <= self.budget:
            raise ConfigError(f"seed_size must be in [1, budget={self.budget}], got {self.seed_size}")
        self._chosen = torch.zeros(0, dtype=torch.long)
        self._free = torch.zeros(0, dtype=torch.bool)

    def _seed_count(self) -> int:
        assert self.seed_size is not None  # derived in _validate
        return self.seed_size

    def _epochs(self) -> int:
        return self.epochs

    def _pool_minimum(self) -> tuple[int, str]:
        return self.budget, f"the budget of {self.budget} (activethief queries each pool image at most once)"

    def round_sizes(self) -> list[int]:
        """Queries of each round: the seed set, then ``budget − seed_size`` split over the rounds."""
        rest = self.budget - self._seed_count()
        base, extra = divmod(rest, self.rounds)
        steps = [base + (1 if r < extra else 0) for r in range(self.rounds)]
        return [self._seed_count()] + [s for s in steps if s > 0]

    def select(
        self, clone: nn.Module, labelled: Tensor, unlabelled: Tensor, k: int, generator: torch.Generator
    ) -> Tensor:
        """Indices into ``unlabelled`` ``(k,)`` of the next queries, per :attr:`strategy`."""
        n = unlabelled.shape[0]
        if self.strategy == "random":
            return torch.randperm(n, generator=generator)[:k]
        if self.strategy == "uncertainty":
            p = _softmax_outputs(clone, unlabelled)
            entropy = -(p * safe_log(p)).sum(1)
            return entropy.topk(k).indices
        if self.strategy == "k-center":
            return k_center_greedy(_softmax_outputs(clone, unlabelled), _softmax_outputs(clone, labelled), k)
        cand = torch.arange(n)
        if self.dfal_candidates is not None and self.dfal_candidates < n:
            cand = torch.randperm(n, generator=generator)[: max(self.dfal_candidates, k)]
        norms = deepfool_norms(clone, unlabelled[cand], max_iter=self.deepfool_iters, overshoot=self.overshoot)
        order = cand[torch.sort(norms, stable=True).indices]
        if self.strategy == "dfal":
            return order[:k]
        short = order[: max(k, self.budget if self.dfal_shortlist is None else self.dfal_shortlist)]
        picks = k_center_greedy(_softmax_outputs(clone, unlabelled[short]), _softmax_outputs(clone, labelled), k)
        return short[picks]

    def _seeded(self, run: AttackRun, indices: Tensor) -> None:
        self._chosen = indices
        self._free = torch.ones(run.pool.shape[0], dtype=torch.bool)
        self._free[indices] = False

    def _grow(self, run: AttackRun, x: Tensor, y: Tensor, round_index: int) -> Tensor | None:
        """The next round's picks among the pool images not yet queried (``None`` after the last round)."""
        sizes = self.round_sizes()
        if round_index + 1 >= len(sizes):
            return None
        free = self._free.nonzero().squeeze(1)
        new = free[self.select(run.clone, x, run.pool[free], sizes[round_index + 1], run.rng)]
        self._free[new] = False
        self._chosen = torch.cat([self._chosen, new])
        return run.pool[new]

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Query a random seed set from the pool, then alternate clone training and active selection.

        The pool holds the attacker's unlabelled images ``(N, C, H, W)`` in [0, 1], ``N >= budget``
        (no image is queried twice). Checkpoints are scored after a training whenever
        ``eval_every`` queries have passed since the last one (``None``: after every training).

        Extras of the result: ``rounds`` (selection rounds done), ``round_sizes`` (labelled-set
        size at each training), ``selected`` (pool indices in query order), ``label_hist`` (oracle
        top-1 counts over the queries) and ``train_loss`` (last epoch's loss of each training).
        """
        extras = super()._extract(run)
        return {**extras, "selected": self._chosen.tolist()}
