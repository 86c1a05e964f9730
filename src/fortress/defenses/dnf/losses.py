"""DNF training losses: the ID loss (Eq. 6), the OOD loss (Eq. 7) and their sum (Eq. 8).

For exit ``i`` of ``E`` (the last one is the final exit), with logits from a sampled VIB latent:

* ID (Eq. 6): ``CE(y) + w_kl·KL(P(Z|x) ‖ N(0, I)) + α·K(i)·H``, with ``K(i) = +1`` at the final exit
  (confident there) and ``−1`` before it (uncertain early, so ID queries travel deep);
* OOD (Eq. 7): ``log q(ŷ|·) − w_kl·KL + α·J(i)·H`` with ``J = −K``: the likelihood of the exit-0
  pseudo-labels ``ŷ`` is *minimised*, the latent is pushed *away* from the prior, early exits
  become confident (so OOD queries leave early) and the final exit uncertain;
* total (Eq. 8, with the weight τ of App. Table 15): ``L_id + τ·L_ood``.

Terms are averaged over the exits that have trainable parameters and over the batch.

Where the terms are evaluated: inference answers with the VIB latent *mean*, but Eqs. 6–7 write
every term as an expectation over sampled latents. Taken literally, the heads can satisfy the OOD
objective ("confident", "far from the prior") by inflating the latent *variance* alone, which
vanishes at inference — measured on LeNet-5/MNIST, exit 0 then fires on OOD data for some seeds
and never for others. By default (``mean_terms=True``) the entropy terms and the OOD likelihood
term are therefore evaluated on the mean's logits, while the ID cross-entropy and both KL terms
keep the sampled latent, as in the VIB of Alemi et al.; ``mean_terms=False`` is the literal form.

Two terms of Eq. 7 are unbounded below (``log q → −∞``, ``−KL → −∞``) and would let the OOD loss
swamp everything; the paper does not say how it kept them finite. Here they are bounded: the
likelihood term is clamped at ``log(ood_prob_floor)`` and the KL term at ``ood_kl_cap`` nats per
sample (no gradient past the bound). Both bounds are options recorded with the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.exits.heads import gaussian_kl
from fortress.exits.network import AllExits
from fortress.functional import entropy

__all__ = ["DNFLossWeights", "LossTerms", "entropy", "id_loss", "ood_loss", "pseudo_labels"]


@dataclass(frozen=True)
class DNFLossWeights:
    """Weights of the DNF loss (paper defaults: α = 0.1, τ = 1, KL weight 1).

    Attributes:
        alpha: entropy weight α_i (same for every exit, App. D).
        tau: weight of the OOD loss in Eq. 8.
        kl_weight: weight of the KL terms (the paper uses 1).
        ood_prob_floor: lower bound on q(ŷ|x) in the OOD likelihood term.
        ood_kl_cap: upper bound (nats per sample) on the KL the OOD term rewards.
        mean_terms: evaluate the entropy and OOD likelihood terms on the latent mean's logits
            (see the module docstring); ``False`` evaluates them on the sampled latent.
        ood_likelihood_at_first: also apply the reversed likelihood at exit 0. The pseudo-labels
            *are* exit 0's answers, so reversing them there fights its own entropy term: measured
            on LeNet-5/MNIST, exit 0 then settles on a two-class tie (max probability ≈ 0.5) and
            never fires for about half of the seeds. Default ``False``: exits 1… are pushed away
            from exit 0's labels, exit 0 itself only becomes confident and far from the prior.
        id_confident_from: the first exit at which ID data are made *confident* (``K(i) = +1`` in
            Eq. 6; exits before it keep ``K(i) = −1``, so exit 0 stays uncertain on ID data and keeps
            catching attack queries). ``None``: the paper's Eq. 6, only the final exit confident,
            which sends every ID query to the final exit (no compute saved on benign traffic).
        distill: weight of a distillation term on ID data at the exits from ``id_confident_from``
            on (from 1 if ``None``): ``KL(p_final ‖ p_i)`` with the final exit's (frozen) answers as
            targets, so early answers agree with the model's own final answers. 0: off (the paper).
        id_kl_until: the ID KL term of Eq. 6 applies at exits before this one only (``None``: at
            every exit, the paper). With one linear layer per head the VIB latent is the logits, and
            the KL to ``N(0, I)`` keeps ID logits small, so ID answers stay flat at every head.
    """

    alpha: float = 0.1
    tau: float = 1.0
    kl_weight: float = 1.0
    ood_prob_floor: float = 1e-4
    ood_kl_cap: float = 20.0
    mean_terms: bool = True
    ood_likelihood_at_first: bool = False
    id_confident_from: int | None = None
    distill: float = 0.0
    id_kl_until: int | None = None


@dataclass(frozen=True)
class LossTerms:
    """A loss and its parts (for progress displays and logs)."""

    total: Tensor
    ce: Tensor
    kl: Tensor
    entropy: Tensor


def _sign(i: int, num_exits: int, confident_from: int | None = None) -> float:
    """``K(i)``: +1 at the final exit (and from ``confident_from`` on), −1 before it."""
    first = num_exits - 1 if confident_from is None else min(confident_from, num_exits - 1)
    return 1.0 if i >= first else -1.0


def _kl(out: AllExits, i: int) -> Tensor | None:
    if i < len(out.heads):
        h = out.heads[i]
        if h.mu is not None and h.logvar is not None:
            return gaussian_kl(h.mu, h.logvar)
    return None


def id_loss(out: AllExits, y: Tensor, w: DNFLossWeights, exits: list[int]) -> LossTerms:
    """Eq. 6 averaged over ``exits`` (indices into ``out.logits``) and the batch."""
    e = out.logits.shape[0]
    reg = out.mean_logits if w.mean_terms else out.logits
    ce = kl = ent = out.logits.new_zeros(())
    distill = out.logits.new_zeros(())
    first = 1 if w.id_confident_from is None else w.id_confident_from
    target = F.softmax(reg[e - 1].detach(), dim=1) if w.distill > 0 else None
    for i in exits:
        ce = ce + F.cross_entropy(out.logits[i], y)
        k = _kl(out, i) if w.id_kl_until is None or i < w.id_kl_until else None
        if k is not None:
            kl = kl + k.mean()
        ent = ent + _sign(i, e, w.id_confident_from) * entropy(reg[i]).mean()
        if target is not None and first <= i < e - 1:
            distill = distill + F.kl_div(F.log_softmax(reg[i], dim=1), target, reduction="batchmean")
    n = max(len(exits), 1)
    total = (ce + w.kl_weight * kl + w.alpha * ent) / n
    if target is not None:
        total = total + w.distill * distill / n
    return LossTerms(total, ce / n, kl / n, ent / n)


def pseudo_labels(out: AllExits) -> Tensor:
    """OOD labels "obtained through the first exit" (§4.1): exit 0's top-1, without gradient."""
    return out.mean_logits[0].detach().argmax(dim=1)


def ood_loss(out: AllExits, y_ood: Tensor, w: DNFLossWeights, exits: list[int]) -> LossTerms:
    """Eq. 7 (with the bounds described in the module docstring), averaged over ``exits`` and the batch."""
    e = out.logits.shape[0]
    floor = float(torch.log(torch.tensor(w.ood_prob_floor)))
    reg = out.mean_logits if w.mean_terms else out.logits
    ll = kl = ent = out.logits.new_zeros(())
    for i in exits:
        logits = reg[i]
        if i > 0 or w.ood_likelihood_at_first:
            logq = F.log_softmax(logits, dim=1).gather(1, y_ood.view(-1, 1)).squeeze(1)
            ll = ll + logq.clamp_min(floor).mean()
        k = _kl(out, i)
        if k is not None:
            kl = kl + k.clamp_max(w.ood_kl_cap).mean()
        ent = ent - _sign(i, e) * entropy(logits).mean()  # J(i) = -K(i)
    n = max(len(exits), 1)
    total = (ll - w.kl_weight * kl + w.alpha * ent) / n
    return LossTerms(total, ll / n, kl / n, ent / n)
