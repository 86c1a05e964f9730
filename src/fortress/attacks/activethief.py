"""ActiveThief: pool-based active learning for model extraction (Pal et al., AAAI 2020).

Label a random seed set, then repeatedly train the clone and let it choose the next queries from
the unlabelled pool: at random, by uncertainty (entropy), by greedy k-center core-set, by DFAL
(smallest DeepFool perturbation) or by DFAL followed by k-center.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from fortress.attacks.base import Attack, AttackResult, EvalSet, ProgressFn
from fortress.attacks.common import safe_log, train_clone
from fortress.errors import ConfigError
from fortress.oracle import Oracle, OutputMode

__all__ = ["ActiveThief", "ActiveThiefStrategy", "deepfool_norms", "k_center_greedy"]

log = logging.getLogger(__name__)

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


class ActiveThief(Attack):
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
    output_modes = (OutputMode.SOFT, OutputMode.HARD, OutputMode.TOPK)

    def __init__(
        self,
        oracle: Oracle,
        *,
        budget: int,
        seed: int = 0,
        strategy: ActiveThiefStrategy = "uncertainty",
        seed_size: int | None = None,
        rounds: int = 10,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 50,
        retrain_from_scratch: bool = True,
        deepfool_iters: int = 20,
        overshoot: float = 0.02,
        dfal_candidates: int | None = None,
        dfal_shortlist: int | None = None,
    ) -> None:
        super().__init__(oracle, budget=budget, seed=seed)
        if strategy not in get_args(ActiveThiefStrategy):
            valid = ", ".join(get_args(ActiveThiefStrategy))
            raise ConfigError(f"activethief strategy must be one of {valid}, got {strategy!r}")
        for label, value in (
            ("rounds", rounds),
            ("epochs", epochs),
            ("batch_size", batch_size),
            ("deepfool_iters", deepfool_iters),
        ):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        seed_n = max(1, self.budget // (rounds + 1)) if seed_size is None else seed_size
        if not 1 <= seed_n <= self.budget:
            raise ConfigError(f"seed_size must be in [1, budget={self.budget}], got {seed_n}")
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        if overshoot < 0:
            raise ConfigError(f"overshoot must be >= 0, got {overshoot}")
        for label, opt in (("dfal_candidates", dfal_candidates), ("dfal_shortlist", dfal_shortlist)):
            if opt is not None and opt < 1:
                raise ConfigError(f"{label} must be >= 1 or None, got {opt}")
        self.strategy: ActiveThiefStrategy = strategy
        self.seed_size = seed_n
        self.rounds = rounds
        self.epochs = epochs
        self.lr = float(lr)
        self.batch_size = batch_size
        self.retrain_from_scratch = bool(retrain_from_scratch)
        self.deepfool_iters = deepfool_iters
        self.overshoot = float(overshoot)
        self.dfal_candidates = dfal_candidates
        self.dfal_shortlist = dfal_shortlist

    def hparams(self) -> dict[str, Any]:
        return {
            **super().hparams(),
            "strategy": self.strategy,
            "seed_size": self.seed_size,
            "rounds": self.rounds,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "retrain_from_scratch": self.retrain_from_scratch,
            "deepfool_iters": self.deepfool_iters,
            "overshoot": self.overshoot,
            "dfal_candidates": self.dfal_candidates,
            "dfal_shortlist": self.dfal_shortlist,
        }

    def round_sizes(self) -> list[int]:
        """Queries of each round: the seed set, then ``budget − seed_size`` split over the rounds."""
        rest = self.budget - self.seed_size
        base, extra = divmod(rest, self.rounds)
        steps = [base + (1 if r < extra else 0) for r in range(self.rounds)]
        return [self.seed_size] + [s for s in steps if s > 0]

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

    def run(
        self,
        clone: nn.Module,
        pool: Tensor | None = None,
        *,
        eval_set: EvalSet | None = None,
        eval_every: int | None = None,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Query a random seed set from ``pool``, then alternate clone training and active selection.

        Args:
            clone: the clone network (trained in place).
            pool: the attacker's unlabelled images ``(N, C, H, W)`` in [0, 1], ``N >= budget``.
            eval_set: scored after each training whenever ``eval_every`` queries have passed since
                the last checkpoint (never charged to the budget).
            eval_every: queries between checkpoints (``None``: after every training).
            progress: called after every oracle call.

        Extras of the result: ``rounds`` (selection rounds done), ``round_sizes`` (labelled-set
        size at each training), ``selected`` (pool indices in query order), ``label_hist`` (oracle
        top-1 counts over the queries) and ``train_loss`` (last epoch's loss of each training).

        Raises:
            ConfigError: ``pool`` is missing, has the wrong image shape or fewer than ``budget``
                images (no image is queried twice); ``eval_every < 1``.
            BudgetExceeded: the oracle's own budget is smaller than this attack's.
        """
        pool = self._require_pool(
            pool,
            who="activethief",
            min_rows=self.budget,
            what=f"the budget of {self.budget} (activethief queries each pool image at most once)",
        )
        if eval_every is not None and eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1 query or None, got {eval_every}")
        self._begin()
        rng = torch.Generator().manual_seed(self.seed)
        init_state = {k: v.detach().clone() for k, v in clone.state_dict().items()}
        n_pool = pool.shape[0]
        sizes = self.round_sizes()
        chosen = torch.randperm(n_pool, generator=rng)[: sizes[0]]
        unlabelled_mask = torch.ones(n_pool, dtype=torch.bool)
        unlabelled_mask[chosen] = False
        y = self.oracle.query(pool[chosen])
        if progress is not None:
            progress(self.queries_used, self.budget)
        losses: list[float] = []
        trained_sizes: list[int] = []
        last_cp: int | None = None
        for step in [*sizes[1:], 0]:
            if self.retrain_from_scratch:
                clone.load_state_dict(init_state)
            losses.append(
                train_clone(
                    clone,
                    pool[chosen],
                    y,
                    epochs=self.epochs,
                    batch_size=self.batch_size,
                    lr=self.lr,
                    generator=rng,
                )[-1]
            )
            trained_sizes.append(int(chosen.shape[0]))
            if eval_every is None or last_cp is None or self.queries_used - last_cp >= eval_every:
                self._checkpoint(clone, eval_set)
                last_cp = self.queries_used
            if step == 0:
                break
            free = unlabelled_mask.nonzero().squeeze(1)
            new = free[self.select(clone, pool[chosen], pool[free], step, rng)]
            answers = self.oracle.query(pool[new])
            if progress is not None:
                progress(self.queries_used, self.budget)
            unlabelled_mask[new] = False
            chosen, y = torch.cat([chosen, new]), torch.cat([y, answers])
            log.debug(
                "activethief round %d: %d labelled, %d queries used", len(trained_sizes), len(chosen), self.queries_used
            )
        hist = torch.bincount(y.argmax(dim=1), minlength=y.shape[1])
        return self._finish(
            clone,
            eval_set,
            rounds=len(trained_sizes) - 1,
            round_sizes=trained_sizes,
            selected=chosen.tolist(),
            label_hist=hist.tolist(),
            train_loss=losses,
        )
