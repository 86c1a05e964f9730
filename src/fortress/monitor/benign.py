"""Benign traffic for calibrating monitors and measuring their false positives.

A benign key replays held-out ID images as a real user would send them: with small shifts and
rotations, sensor noise, other brightness and contrast, and from a sub-population of the classes
(one class only, or a skewed class mix). :func:`shifted` makes the per-image variants,
:func:`benign_streams` the per-key index streams; everything is vectorised and seeded.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.errors import ConfigError

__all__ = ["IMAGE_SHIFTS", "STREAM_MIXES", "benign_streams", "owned_stream", "shifted"]

ImageShift = Literal["replay", "shift-rotate", "noise", "brightness", "all"]
#: Per-image shifts: none, ≤ 2 px and ≤ 10°, Gaussian noise σ = 0.05, brightness/contrast ×[0.8, 1.2] ± 0.1.
IMAGE_SHIFTS: tuple[str, ...] = ("replay", "shift-rotate", "noise", "brightness", "all")
StreamMix = Literal["uniform", "one-class", "skewed"]
#: Class mixes of a key: the held-out mix, one class only, Zipf-skewed class shares (s = 1.5).
STREAM_MIXES: tuple[str, ...] = ("uniform", "one-class", "skewed")


def _shift_rotate(x: Tensor, gen: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    tx = torch.randint(-2, 3, (n,), generator=gen).float() * 2 / w
    ty = torch.randint(-2, 3, (n,), generator=gen).float() * 2 / h
    cos, sin = ang.cos(), ang.sin()
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _brightness(x: Tensor, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    bias = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.1
    return x * gain + bias


def shifted(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """Images ``(N, C, H, W)`` under one realistic shift (:data:`IMAGE_SHIFTS`; ``"all"``: all three in turn).

    Raises:
        ConfigError: unknown shift.
    """
    if kind not in IMAGE_SHIFTS:
        raise ConfigError(f"benign shift must be one of {', '.join(IMAGE_SHIFTS)}, got {kind!r}")
    out = x
    if kind in ("shift-rotate", "all"):
        out = _shift_rotate(out, gen)
    if kind in ("brightness", "all"):
        out = _brightness(out, gen)
    if kind in ("noise", "all"):
        out = out + 0.05 * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def benign_streams(
    labels: Tensor,
    keys: int,
    queries: int,
    mix: str,
    gen: torch.Generator,
    *,
    num_classes: int | None = None,
    variants: int = 1,
) -> Tensor:
    """Indices ``(keys, queries)`` into a bank of ``variants`` shifted copies of ``N`` images, one row per key.

    The bank's row ``v * N + i`` is variant ``v`` of image ``i``; ``labels`` ``(variants * N,)`` are
    the rows' classes. A key sends distinct images as long as its sub-population has any left (a
    random order of the images, each as a random variant; the order restarts once all are sent):
    ``uniform`` over all images; ``one-class`` over one class (drawn uniformly per key); ``skewed``
    with Zipf class shares (s = 1.5) over a random order of the classes.

    Raises:
        ConfigError: unknown mix, an empty bank, or a bank size that is not a multiple of ``variants``.
    """
    if mix not in STREAM_MIXES:
        raise ConfigError(f"benign class mix must be one of {', '.join(STREAM_MIXES)}, got {mix!r}")
    if labels.numel() == 0 or keys < 1 or queries < 1 or variants < 1 or labels.numel() % variants:
        raise ConfigError(
            f"need a non-empty bank of variants x images and keys, queries >= 1; got {labels.numel()} rows, "
            f"{variants} variants, {keys} keys, {queries} queries"
        )
    n = labels.numel() // variants
    base = labels[:n]
    k = int(base.max()) + 1 if num_classes is None else num_classes
    by_class = [torch.nonzero(base == c).flatten() for c in range(k)]
    present = [c for c in range(k) if by_class[c].numel()]
    zipf = 1.0 / torch.arange(1, len(present) + 1, dtype=torch.float64) ** 1.5
    out = torch.empty(keys, queries, dtype=torch.long)
    for key in range(keys):
        if mix == "uniform":
            order = torch.randperm(n, generator=gen)
            images = order.repeat(queries // n + 1)[:queries]
        else:
            if mix == "one-class":
                cls = torch.full((queries,), present[int(torch.randint(0, len(present), (1,), generator=gen))])
            else:
                ranked = torch.tensor(present)[torch.randperm(len(present), generator=gen)]
                cls = ranked[torch.multinomial(zipf, queries, replacement=True, generator=gen)]
            images = torch.empty(queries, dtype=torch.long)
            for c in cls.unique().tolist():
                sel = cls == c
                rows = by_class[c][torch.randperm(by_class[c].numel(), generator=gen)]
                m = int(sel.sum())
                images[sel] = rows.repeat(m // rows.numel() + 1)[:m]
        out[key] = images + n * torch.randint(0, variants, (queries,), generator=gen)
    return out


def owned_stream(
    labels: Tensor,
    images: Tensor,
    queries: int,
    mix: str,
    gen: torch.Generator,
    *,
    num_classes: int | None = None,
    variants: int = 1,
) -> Tensor:
    """One benign key's stream over the images it owns: indices ``(queries,)`` into the whole bank.

    A user sends its own images (and variants of them), not other users' ones: this is
    :func:`benign_streams` for one key on the sub-bank of ``images`` (indices of the bank's ``N``
    images), mapped back to the bank's rows ``v * N + i``.

    Raises:
        ConfigError: as :func:`benign_streams`, or ``images`` empty.
    """
    n = labels.numel() // max(variants, 1)
    if images.numel() == 0:
        raise ConfigError("a key must own at least one image")
    sub = labels.view(variants, n)[:, images].flatten()
    local = benign_streams(sub, 1, queries, mix, gen, num_classes=num_classes, variants=variants)[0]
    return (local // images.numel()) * n + images[local % images.numel()]
