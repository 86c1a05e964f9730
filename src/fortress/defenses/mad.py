"""Prediction Poisoning / MAD (Orekondy et al., ICLR 2020): the DNF paper's "P-poison" baseline.

MAD returns ŷ on the simplex with ‖ŷ − y‖₁ ≤ ε that maximises the angular deviation between the
attacker's cross-entropy update for ŷ and for the victim's own y, as seen through a surrogate F_A:
max ‖Gᵀŷ/‖Gᵀŷ‖ − Gᵀy/‖Gᵀy‖‖², G = ∇_W[−log F_A(x)] for the surrogate's last linear weight W.

Exact fast form (defense fact sheet §3.7): ∇_W[−log p_k] = (p − e_k)hᵀ, so for any ỹ on the simplex
Gᵀỹ = vec((p − ỹ)hᵀ) and the feature h cancels in every angle. The objective becomes
‖a/‖a‖ − b/‖b‖‖² with a = p − ỹ, b = p − y: K-dimensional, one surrogate forward per batch, no
backward pass. The target-vertex heuristics and the line search are the original ones:

* ``mad`` (oracle "extreme"): the best one-hot vertex e_k.
* ``mad-argmax``: the best uniform "multi-hot" vertex over a class set S ∋ k* = argmax y, with
  k* up-weighted by 1e-5 so it stays the unique argmax; all 2^{K−1} sets for K ≤ 10, else greedy
  growth of S up to 1024 evaluated sets (stopping when S holds every class). The mixture keeps top-1.

Then ŷ = (1 − α)y + αy* with α = min(1, ε/(‖y − y*‖₁ + 1e-7)), so the realised ℓ1 is min(ε, ‖y − y*‖₁).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fortress.defenses._perturb import SurrogateDefense, check_budget, finish
from fortress.defenses.base import DefenseOutput
from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone

__all__ = ["MAD", "MADArgmax", "mad_target"]

Oracle = Literal["extreme", "argmax"]

#: Up-weighting of the argmax class inside a multi-hot vertex (Orekondy et al.'s constant).
ARGMAX_BOOST = 1e-5
#: Largest K for which every class set containing the argmax is enumerated (the original's limit).
EXACT_MAX_K = 10


class MAD(SurrogateDefense):
    """Maximizing Angular Deviation output poisoning (Orekondy et al., 2020), batched and exact.

    Args:
        victim: the trained victim.
        epsilon: ℓ1 budget in output space (paper §5: 1.0).
        surrogate: the defender's stand-in for the attacker's model; ``None`` uses a seeded, randomly
            initialised copy of the victim's architecture, as in the original experiments. Only its
            softmax is used; any network with the victim's classes works.
        max_candidates: candidate-set budget of the greedy argmax search (K > 10 only).
        seed: seeds the surrogate's initialisation (and :meth:`fit`).

    Example:
        >>> from fortress.models import create_model
        >>> out = MAD(create_model("lenet5")).respond(torch.rand(4, 1, 28, 28))
        >>> bool((out.l1 <= 1.0 + 1e-4).all())
        True
    """

    name = "mad"
    oracle: ClassVar[Oracle] = "extreme"

    def __init__(
        self,
        victim: StagedBackbone,
        *,
        epsilon: float = 1.0,
        surrogate: StagedBackbone | None = None,
        max_candidates: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(victim, surrogate=surrogate, seed=seed)
        self.epsilon = check_budget(epsilon)
        if int(max_candidates) < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {max_candidates!r}")
        self.max_candidates = int(max_candidates)

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)
        p = torch.softmax(self.surrogate(x), dim=1)
        y_star = mad_target(p, y, self.oracle, max_candidates=self.max_candidates)
        return finish(y, line_search(y, y_star, self.epsilon))

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "oracle": self.oracle}


class MADArgmax(MAD):
    """MAD restricted to top-1-preserving vertices (Orekondy et al.'s "MAD-argmax"); same arguments."""

    name = "mad-argmax"
    oracle: ClassVar[Oracle] = "argmax"


def line_search(y: Tensor, y_star: Tensor, epsilon: float) -> Tensor:
    """Move from ``y`` towards the vertex ``y_star`` until the ℓ1 budget is spent (closed form)."""
    dist = (y - y_star).abs().sum(dim=1, keepdim=True)
    alpha = (epsilon / (dist + 1e-7)).clamp(0.0, 1.0)
    return (1 - alpha) * y + alpha * y_star


def _deviation(a_dot_b: Tensor, a_sq: Tensor) -> Tensor:
    """‖a/‖a‖ − b̂‖² = 2 − 2⟨a, b̂⟩/‖a‖ for unit b̂ (zero-norm vectors count as orthogonal)."""
    return 2 - 2 * a_dot_b / a_sq.clamp_min(1e-300).sqrt()


def mad_target(p: Tensor, y: Tensor, oracle: Oracle, *, max_candidates: int = 1024) -> Tensor:
    """The MAD target vertex y* for every row (Orekondy et al.'s oracles, last-layer closed form).

    Args:
        p: surrogate probabilities ``(B, K)``.
        y: victim probabilities ``(B, K)``.
        oracle: ``"extreme"`` (one-hot vertices) or ``"argmax"`` (top-1-preserving multi-hot vertices).
        max_candidates: greedy search budget for ``"argmax"`` when K > 10.

    Returns:
        ``(B, K)`` vertices in ``y``'s dtype. Ties go to the first candidate in the original order.
    """
    k = y.shape[1]
    if oracle == "argmax" and k > EXACT_MAX_K:
        # The original greedy search works on y lifted by 1e-8 against underflow.
        y = (y + 1e-8) / (y + 1e-8).sum(dim=1, keepdim=True)
    p64, y64 = p.double(), y.double()
    b = p64 - y64
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    p_sq = (p64 * p64).sum(dim=1, keepdim=True)
    if oracle == "extreme":
        # a_k = p − e_k: ⟨a_k, b̂⟩ = ⟨p, b̂⟩ − b̂_k and ‖a_k‖² = ‖p‖² − 2p_k + 1.
        obj = _deviation((p64 * b).sum(1, keepdim=True) - b, p_sq - 2 * p64 + 1)
        return torch.nn.functional.one_hot(obj.argmax(dim=1), k).to(y.dtype)
    if oracle != "argmax":
        raise ConfigError(f"oracle must be 'extreme' or 'argmax', got {oracle!r}")
    top = y.argmax(dim=1)
    if k <= EXACT_MAX_K:
        return _argmax_exact(p64, b, p_sq, top).to(y.dtype)
    return _argmax_greedy(p64, b, p_sq, top, max_candidates).to(y.dtype)


def _multi_hot_scores(
    p: Tensor, b: Tensor, p_sq: Tensor, top: Tensor, mask_dot_p: Tensor, mask_dot_b: Tensor, size: Tensor
) -> Tensor:
    """Objective of c = (mask + 1e-5·e_top)/(|S| + 1e-5) for sets S ∋ top, from the masks' inner products."""
    z = size + ARGMAX_BOOST
    p_top = p.gather(1, top[:, None])
    b_top = b.gather(1, top[:, None])
    c_dot_p = (mask_dot_p + ARGMAX_BOOST * p_top) / z
    c_dot_b = (mask_dot_b + ARGMAX_BOOST * b_top) / z
    c_sq = (size + 2 * ARGMAX_BOOST + ARGMAX_BOOST**2) / (z * z)
    a_dot_b = (p * b).sum(1, keepdim=True) - c_dot_b
    return _deviation(a_dot_b, p_sq - 2 * c_dot_p + c_sq)


def _all_masks(k: int, device: torch.device) -> Tensor:
    """All 2^K class sets as 0/1 rows, in ``itertools.product([0, 1], repeat=K)`` order."""
    n = torch.arange(2**k, device=device)
    shifts = torch.arange(k - 1, -1, -1, device=device)
    return ((n[:, None] >> shifts) & 1).double()


def _argmax_exact(p: Tensor, b: Tensor, p_sq: Tensor, top: Tensor) -> Tensor:
    k = p.shape[1]
    masks = _all_masks(k, p.device)  # (M, K)
    size = masks.sum(dim=1)[None, :]  # (1, M)
    obj = _multi_hot_scores(p, b, p_sq, top, p @ masks.T, b @ masks.T, size)
    valid = masks[:, top].T > 0  # (B, M): the set must contain the argmax
    obj = obj.masked_fill(~valid, float("-inf"))
    chosen = masks[obj.argmax(dim=1)]  # first maximum in enumeration order
    chosen = chosen + ARGMAX_BOOST * torch.nn.functional.one_hot(top, k).double()
    return chosen / chosen.sum(dim=1, keepdim=True)


def _argmax_greedy(p: Tensor, b: Tensor, p_sq: Tensor, top: Tensor, max_candidates: int) -> Tensor:
    bsz, k = p.shape
    rows = torch.arange(bsz, device=p.device)
    in_set = torch.nn.functional.one_hot(top, k).bool()
    best_val = torch.full((bsz,), -1.0, dtype=p.dtype, device=p.device)
    best = in_set.double()
    evaluated, size = 0, 1
    # One step per class added to S (at most K − 1); each step scores every S ∪ {k} for the whole batch.
    while evaluated < max_candidates and size < k:
        s = in_set.double()
        set_p = (s * p).sum(1, keepdim=True)
        set_b = (s * b).sum(1, keepdim=True)
        size_t = torch.full((1, 1), float(size + 1), dtype=p.dtype, device=p.device)
        obj = _multi_hot_scores(p, b, p_sq, top, set_p + p, set_b + b, size_t)
        obj = obj.masked_fill(in_set, float("-inf"))
        val, pick = obj.max(dim=1)
        better = val > best_val
        cand = in_set.clone()
        cand[rows, pick] = True
        best = torch.where(better[:, None], cand.double(), best)
        best_val = torch.where(better, val, best_val)
        in_set = cand
        evaluated += k - size
        size += 1
    best = best + ARGMAX_BOOST * torch.nn.functional.one_hot(top, k).double()
    return best / best.sum(dim=1, keepdim=True)
