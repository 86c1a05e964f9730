"""The one tensor contract: images are float32 NCHW in [0, 1]; outputs are probability rows.

Every public entry point that takes images (defenses, oracles, the server) validates them here, so
a bad batch gets the same clear :class:`~fortress.errors.InvalidInput` wherever it enters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fortress.errors import InvalidInput

__all__ = ["PROB_EPS", "RANGE_TOL", "check_images", "check_probs", "to_positive_probs"]

#: Floor applied to probabilities that cross the oracle, so attacks that take logs stay finite.
PROB_EPS = 1e-8
#: Slack allowed on the [0, 1] pixel range (rounding in resizes and decoders).
RANGE_TOL = 1e-5


def check_images(x: object, shape: Sequence[int] | None = None, *, name: str = "images") -> Tensor:
    """Validate an image batch against the contract and return it.

    Args:
        x: the candidate batch.
        shape: expected per-image shape ``(C, H, W)``; ``None`` accepts any 3-d image shape.
        name: how to call the batch in error messages.

    Returns:
        ``x`` itself (no copy), known to be a float32 ``(N, C, H, W)`` tensor with ``N >= 1``,
        finite values in ``[0, 1]``.

    Raises:
        InvalidInput: the message names the bad property, its value and what was expected.

    Example:
        >>> check_images(torch.rand(2, 1, 28, 28), (1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """
    if not isinstance(x, Tensor):
        raise InvalidInput(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise InvalidInput(f"{name} must have dtype float32, got {x.dtype}")
    if x.dim() != 4:
        raise InvalidInput(f"{name} must be 4-d (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInput(f"{name} is an empty batch (shape {tuple(x.shape)}); send at least one image")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise InvalidInput(f"{name} have per-image shape {tuple(x.shape[1:])}, expected {tuple(shape)} (C, H, W)")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidInput(f"{name} contain {bad} NaN or infinite values; expected finite values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_TOL or hi > 1.0 + RANGE_TOL:
        raise InvalidInput(f"{name} have values in [{lo:.4g}, {hi:.4g}], expected [0, 1] (scale 0-255 images by 1/255)")
    return x


def check_probs(p: Tensor, *, atol: float = 1e-4, name: str = "probabilities") -> Tensor:
    """Check that ``p`` is a batch of probability rows (finite, non-negative, rows sum to 1)."""
    if p.dim() != 2:
        raise InvalidInput(f"{name} must be 2-d (B, K), got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise InvalidInput(f"{name} contain NaN or infinite values")
    if float(p.min()) < 0:
        raise InvalidInput(f"{name} contain negative values (min {float(p.min()):.3g})")
    err = float((p.sum(dim=1) - 1).abs().max())
    if err > atol:
        raise InvalidInput(f"{name} rows do not sum to 1 (max deviation {err:.3g})")
    return p


def to_positive_probs(p: Tensor, eps: float = PROB_EPS) -> Tensor:
    """Clamp probability rows to at least ``eps`` and renormalise (keeps rows on the simplex)."""
    q = p.clamp_min(eps)
    return q / q.sum(dim=1, keepdim=True)
