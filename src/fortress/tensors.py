"""The one tensor contract: images are float32 NCHW in [0, 1]; outputs are probability rows.

Every public entry point that takes images (defenses, oracles, the server) validates them here, so
a bad batch gets the same clear :class:`~fortress.errors.InvalidInput` wherever it enters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fortress.errors import InvalidInput

__all__ = ["PROB_EPS", "RANGE_TOL", "check_images", "check_labels", "check_probs", "to_positive_probs"]

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


def check_labels(
    y: object, n: int | None = None, num_classes: int | None = None, *, name: str = "labels"
) -> Tensor:
    """Validate class labels against the one label contract and return them as int64 ``(N,)``.

    The contract: integer class indices, one per image, in ``[0, K)``. Any integer dtype (``int8``
    … ``int64``, ``uint8``) is accepted and converted to ``int64``; a column ``(N, 1)`` is accepted
    and flattened to ``(N,)``. Everything else is refused — floats, bools, one-hot or probability
    rows ``(N, K)``, labels out of range — so ``(N,)`` and ``(N, 1)`` are never broadcast against
    each other into an ``N × N`` comparison.

    Args:
        y: the candidate labels.
        n: the number of images they label (``None``: any).
        num_classes: ``K`` (``None``: only non-negativity is checked).
        name: how to call the labels in error messages.

    Returns:
        ``y`` as an int64 ``(N,)`` tensor (no copy when it already is one).

    Raises:
        InvalidInput: naming the bad shape, dtype, count or range and what was expected.

    Example:
        >>> check_labels(torch.tensor([[1], [0]], dtype=torch.int32), 2, 10)
        tensor([1, 0])
    """
    if not isinstance(y, Tensor):
        raise InvalidInput(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise InvalidInput(
            f"{name} must have an integer dtype (class indices), got {y.dtype}; "
            "convert one-hot or probability rows with .argmax(1)"
        )
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.dim() != 1:
        raise InvalidInput(f"{name} must have shape (N,) (or (N, 1)) of class indices, got shape {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise InvalidInput(f"{name} hold {y.shape[0]} entries for {n} images; expected one label per image")
    y = y.to(torch.int64)
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            expected = f"[0, {num_classes - 1}]" if num_classes is not None else "non-negative"
            raise InvalidInput(f"{name} are in [{lo}, {hi}], expected class indices in {expected}")
    return y


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
