"""The victim's penultimate features for ``dadd``, taken from the answer's own forward pass.

``dadd`` reads each query's input to the victim's last linear layer. Computing it again costs a
whole backbone pass per batch (as much as the answer). DNF already computes it for every row that
reaches the final exit, which is nearly all benign traffic: :class:`PenultimateTap` keeps what that
layer received during the answer (per thread, so concurrent inference workers never mix batches)
and computes the features anew only for rows that left earlier, or when what it kept does not
belong to the batch (checked against the answer's own probabilities).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

from fortress.defenses import DNF

__all__ = ["PenultimateTap"]


class PenultimateTap:
    """``images → (B, F)`` penultimate features of ``dnf``'s victim, reusing the answer's pass (module docstring).

    Args:
        dnf: the served DNF (its final exit must be the victim's classifier, the default).

    Example:
        >>> tap = PenultimateTap(dnf)  # doctest: +SKIP
        >>> out = dnf.respond(x); feats = tap.features(x, out.probs, out.exits)  # doctest: +SKIP
    """

    def __init__(self, dnf: DNF) -> None:
        self.victim = dnf.victim
        self.last_exit = dnf.net.num_exits - 1
        linears = [m for m in dnf.net.final_head.modules() if isinstance(m, nn.Linear)]
        self._last_linear = linears[-1] if linears and dnf.net.final_head is dnf.victim.classifier else None
        self._local = threading.local()
        if self._last_linear is not None:
            self._last_linear.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        if not getattr(self._local, "computing", False):
            self._local.kept = inputs[0].detach().flatten(1)

    def __call__(self, images: Tensor) -> Tensor:
        """The features computed anew (one backbone pass)."""
        self._local.computing = True
        try:
            with torch.inference_mode():
                return self.victim.penultimate(images)
        finally:
            self._local.computing = False

    def features(self, images: Tensor, probs: Tensor, exits: Tensor | None) -> Tensor:
        """The batch's features, from the answer's pass where it reached the final exit."""
        kept: Tensor | None = getattr(self._local, "kept", None)
        self._local.kept = None
        b = images.shape[0]
        if kept is None or exits is None or self._last_linear is None:
            return self(images)
        final = exits == self.last_exit
        if kept.shape[0] not in (b, int(final.sum())) or not self._belongs(kept, probs, final):
            return self(images)
        if kept.shape[0] == b:  # every stage ran on every row (full or padded compute)
            return kept
        out = kept.new_empty(b, kept.shape[1])
        out[final] = kept
        if bool((~final).any()):
            out[~final] = self(images[~final])
        return out

    def _belongs(self, kept: Tensor, probs: Tensor, final: Tensor) -> bool:
        """The kept rows give the answer's own probabilities at the final exit (else they are another batch's)."""
        assert self._last_linear is not None
        sub = kept[final] if kept.shape[0] == final.numel() else kept
        if sub.shape[0] == 0:
            return True
        with torch.inference_mode():
            mine = torch.softmax(self._last_linear(sub), dim=1)
        return bool(torch.allclose(mine, probs[final].to(mine.dtype), atol=1e-5))

    def describe(self) -> dict[str, Any]:
        """What the tap reads."""
        return {"feature": "penultimate", "reuses_answer": self._last_linear is not None}
