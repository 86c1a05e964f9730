"""OOD image sources: a trained generator, a proxy data set, noise, or a mixture (DNF training, MeCo).

The paper samples a pre-trained DCGAN (App. F); its Table 3 shows real proxy sets (Indoor67, SVHN)
work as well. Every source draws from an explicit ``torch.Generator`` and describes itself, so
the choice is recorded with the results.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.device import device_of
from fortress.errors import ConfigError
from fortress.generative.dcgan import DCGANGenerator

__all__ = ["GeneratorOOD", "MixtureOOD", "NoiseOOD", "OODSource", "PoolOOD"]


class OODSource(ABC):
    """Something that yields batches of OOD images ``(n, C, H, W)`` in [0, 1]."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` OOD images."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready description recorded with results."""


class GeneratorOOD(OODSource):
    """Samples of a trained generator (the paper's choice: a DCGAN trained on proxy data)."""

    def __init__(self, generator: DCGANGenerator, *, proxy: str = "unknown") -> None:
        self.generator = generator.eval()
        self.proxy = proxy

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.generator.nz, generator=generator)
        out: Tensor = self.generator(z.to(device_of(self.generator)))
        return out.to(z.device)  # every source answers on the CPU; the trainer moves batches

    def describe(self) -> dict[str, Any]:
        return {"kind": "dcgan", "proxy": self.proxy, "nz": self.generator.nz}


class PoolOOD(OODSource):
    """Random images from a proxy data set (paper Table 3: Indoor67, SVHN)."""

    def __init__(self, images: Tensor, *, name: str = "proxy") -> None:
        if images.dim() != 4 or images.shape[0] == 0:
            raise ConfigError(f"proxy pool must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
        self.images = images
        self.name = name

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.images[torch.randint(0, self.images.shape[0], (n,), generator=generator)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "proxy", "name": self.name, "size": int(self.images.shape[0])}


class NoiseOOD(OODSource):
    """Random images: uniform, Gaussian and smooth (upsampled low-resolution) noise in equal parts."""

    KINDS = ("uniform", "gaussian", "smooth")

    def __init__(self, shape: Sequence[int], *, kinds: Sequence[str] = KINDS) -> None:
        bad = [k for k in kinds if k not in self.KINDS]
        if bad or not kinds:
            raise ConfigError(f"noise kinds must be among {self.KINDS}, got {list(kinds)}")
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.kinds = tuple(kinds)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        c, h, w = self.shape
        which = torch.randint(0, len(self.kinds), (n,), generator=generator)
        out = torch.rand(n, c, h, w, generator=generator)
        for k, kind in enumerate(self.kinds):
            sel = which == k
            m = int(sel.sum())
            if m == 0 or kind == "uniform":
                continue
            if kind == "gaussian":
                out[sel] = (0.5 + 0.25 * torch.randn(m, c, h, w, generator=generator)).clamp(0, 1)
            else:
                low = torch.rand(m, c, max(2, h // 7), max(2, w // 7), generator=generator)
                out[sel] = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "noise", "kinds": list(self.kinds)}


class MixtureOOD(OODSource):
    """Each OOD batch drawn from several sources in fixed proportions."""

    def __init__(self, sources: Sequence[OODSource], weights: Sequence[float] | None = None) -> None:
        if not sources:
            raise ConfigError("a mixture needs at least one OOD source")
        w = [1.0] * len(sources) if weights is None else [float(v) for v in weights]
        if len(w) != len(sources) or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ConfigError(f"mixture weights must be {len(sources)} non-negative numbers, got {list(w)}")
        self.sources = list(sources)
        self.weights = [v / sum(w) for v in w]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        # largest-remainder apportionment: non-negative counts summing to n, each within 1 of n·w
        # (rounding each share could over-allocate and leave the last source a negative count)
        raw = [n * w for w in self.weights]
        counts = [int(r) for r in raw]
        by_remainder = sorted(range(len(raw)), key=lambda k: counts[k] - raw[k])
        for k in by_remainder[: n - sum(counts)]:
            counts[k] += 1
        parts = [s.sample(c, generator) for s, c in zip(self.sources, counts, strict=True) if c > 0]
        x = torch.cat(parts)
        return x[torch.randperm(n, generator=generator)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "mixture", "weights": self.weights, "sources": [s.describe() for s in self.sources]}
