"""Near-distribution OOD images: the defender's own ID images with their meaning destroyed.

DNF trained on noise and DCGAN samples (paper §4.1) learns to send *far* OOD queries to exit 0,
but natural images from a related domain (another digit style, photo crops) exit like ID data and
get the victim's answers. Outlier exposure closer to the ID data (Hendrycks et al., ICLR 2019:
the closer the outliers, the tighter the boundary) narrows that gap. Each image here starts as a
defender ID image and goes through one transform that keeps its low-level statistics (strokes,
contrast, ink mass) but destroys its class:

* ``patch-shuffle``: the image cut into a ``grid × grid`` mosaic whose tiles are permuted;
* ``blur``: resampled down to a few pixels a side and back up (only the blob survives);
* ``elastic``: a strong, smooth random displacement field (Simard et al. 2003, amplified well past
  augmentation strength until strokes tear);
* ``mix``: two images of different classes blended half and half (cross-class mixing).

Every draw comes from an explicit ``torch.Generator``; :meth:`NearIDOOD.describe` records the
transforms and their strengths with the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.errors import ConfigError
from fortress.generative.ood import OODSource

__all__ = ["NEAR_TRANSFORMS", "NearIDOOD"]

#: The semantics-destroying transforms, by name.
NEAR_TRANSFORMS = ("patch-shuffle", "blur", "elastic", "mix")


def _patch_shuffle(x: Tensor, grid: int, gen: torch.Generator) -> Tensor:
    """Permute the ``grid × grid`` tiles of each image (each image its own permutation)."""
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    core = x[:, :, : th * grid, : tw * grid]
    tiles = core.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=gen), dim=1)
    tiles = tiles[torch.arange(n)[:, None], perm]
    out = x.clone()
    out[:, :, : th * grid, : tw * grid] = (
        tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * grid, tw * grid)
    )
    return out


def _blur(x: Tensor, sizes: tuple[int, int], gen: torch.Generator) -> Tensor:
    """Resample each image down to ``s × s`` (``s`` drawn in ``sizes``) and back with bilinear interpolation."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    side = torch.randint(sizes[0], sizes[1] + 1, (x.shape[0],), generator=gen)
    for s in side.unique().tolist():
        sel = side == s
        low = F.interpolate(x[sel], size=(s, s), mode="area")
        out[sel] = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _elastic(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Warp each image by a smooth random field whose displacements reach ``strength`` of the image side."""
    n, _, h, w = x.shape
    coarse = torch.randn(n, 2, 4, 4, generator=gen) * strength
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xs, ys], dim=-1).expand(n, h, w, 2)
    return F.grid_sample(x, base + 2 * flow, mode="bilinear", padding_mode="zeros", align_corners=True)


def _mix(x: Tensor, y: Tensor, pool: Tensor, pool_y: Tensor, gen: torch.Generator) -> Tensor:
    """Blend each image with one of another class (weights in [0.4, 0.6])."""
    n = x.shape[0]
    partner = torch.randint(0, pool.shape[0], (n,), generator=gen)
    # redraw partners of the same class a few times; a single-class pool keeps what it has
    for _ in range(8):
        same = pool_y[partner] == y
        if not bool(same.any()):
            break
        partner[same] = torch.randint(0, pool.shape[0], (int(same.sum()),), generator=gen)
    lam = 0.4 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
    return lam * x + (1 - lam) * pool[partner]


class NearIDOOD(OODSource):
    """OOD images made from the defender's ID images by semantics-destroying transforms.

    Each sampled image is a random ID image put through one transform drawn uniformly from
    ``transforms`` (see the module docstring).

    Args:
        images: the defender's ID images ``(N, C, H, W)`` in [0, 1].
        labels: their class labels ``(N,)`` (cross-class mixing pairs different classes).
        transforms: names among :data:`NEAR_TRANSFORMS`.
        grid: tiles per side of ``patch-shuffle``.
        blur_sizes: smallest and largest side ``blur`` resamples to.
        elastic_strength: ``elastic``'s displacement scale, as a share of the image side.

    Raises:
        ConfigError: unknown transform, bad strengths, or images and labels that do not match.

    Example:
        >>> src = NearIDOOD(torch.rand(8, 1, 28, 28), torch.arange(8) % 2)
        >>> src.sample(4, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        transforms: Sequence[str] = NEAR_TRANSFORMS,
        grid: int = 4,
        blur_sizes: tuple[int, int] = (3, 5),
        elastic_strength: float = 0.12,
    ) -> None:
        if images.dim() != 4 or images.shape[0] == 0:
            raise ConfigError(f"near-ID OOD needs a non-empty (N, C, H, W) image tensor, got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ConfigError(f"near-ID OOD needs one label per image, got {tuple(labels.shape)} for {images.shape[0]}")
        bad = [t for t in transforms if t not in NEAR_TRANSFORMS]
        if bad or not transforms:
            raise ConfigError(f"near-ID transforms must be among {NEAR_TRANSFORMS}, got {list(transforms)}")
        h, w = images.shape[-2:]
        if not 2 <= grid <= min(h, w):
            raise ConfigError(f"patch-shuffle grid must be in [2, {min(h, w)}], got {grid}")
        if not 1 <= blur_sizes[0] <= blur_sizes[1] < min(h, w):
            raise ConfigError(f"blur sizes must satisfy 1 <= low <= high < {min(h, w)}, got {blur_sizes}")
        if not elastic_strength > 0:
            raise ConfigError(f"elastic strength must be > 0, got {elastic_strength}")
        self.images = images
        self.labels = labels.long()
        self.transforms = tuple(transforms)
        self.grid = grid
        self.blur_sizes = (int(blur_sizes[0]), int(blur_sizes[1]))
        self.elastic_strength = float(elastic_strength)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator)
        x, y = self.images[idx], self.labels[idx]
        which = torch.randint(0, len(self.transforms), (n,), generator=generator)
        out = torch.empty_like(x)
        for k, name in enumerate(self.transforms):
            sel = which == k
            if not bool(sel.any()):
                continue
            if name == "patch-shuffle":
                out[sel] = _patch_shuffle(x[sel], self.grid, generator)
            elif name == "blur":
                out[sel] = _blur(x[sel], self.blur_sizes, generator)
            elif name == "elastic":
                out[sel] = _elastic(x[sel], self.elastic_strength, generator)
            else:
                out[sel] = _mix(x[sel], y[sel], self.images, self.labels, generator)
        return out.clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "near",
            "transforms": list(self.transforms),
            "grid": self.grid,
            "blur_sizes": list(self.blur_sizes),
            "elastic_strength": self.elastic_strength,
            "size": int(self.images.shape[0]),
        }
