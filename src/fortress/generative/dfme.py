"""DFME's image generator, "GeneratorA" of DFAD (Fang et al., 2019; Truong et al., CVPR 2021).

Used by the DFME attack family to synthesise queries and by the speed benchmark as a source of
synthetic images; :func:`to_unit` maps its tanh output to the [0, 1] pixel range of the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.errors import ConfigError

__all__ = ["DFMEGenerator", "to_unit"]


def to_unit(t: Tensor) -> Tensor:
    """Map generator output from tanh range [-1, 1] to the oracle's [0, 1] pixel range: ``(t + 1) / 2``."""
    return (t + 1.0) * 0.5


class DFMEGenerator(nn.Module):
    """DFAD's "GeneratorA", the generator DFME trains (Truong et al. 2021; Fang et al. 2019).

    ``z → Linear → (2·ngf, S/4, S/4) → BN → ×2 → conv3×3 → BN → LeakyReLU(0.2) → ×2 → conv3×3 (ngf)
    → BN → LeakyReLU(0.2) → conv3×3 (C) → BN(C, affine=False) → tanh``.

    Deviation from the original: DFME feeds the tanh images in [-1, 1] straight to the victim. The
    fortress oracle contract is [0, 1] images with normalisation inside the model, so attacks map
    the output with :func:`to_unit` before querying; the generator itself is unchanged.

    Args:
        nz: latent dimension (paper: 256).
        ngf: base channels (paper: 64; 16 is about 7× faster on CPU for 28×28 images).
        out_channels: image channels ``C``.
        image_size: square output size ``S`` (a multiple of 4: 28 starts at 7×7, 32 at 8×8).

    Shape:
        ``z`` ``(B, nz)`` → images ``(B, C, S, S)`` in (-1, 1) (or the pre-tanh tensor).

    Example:
        >>> g = DFMEGenerator(nz=8, ngf=4)
        >>> g(torch.randn(2, 8)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, nz: int = 256, ngf: int = 64, out_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if nz < 1 or ngf < 1 or out_channels < 1:
            raise ConfigError(f"nz, ngf and out_channels must be >= 1, got {nz}, {ngf}, {out_channels}")
        if image_size < 4 or image_size % 4:
            raise ConfigError(f"image_size must be a positive multiple of 4, got {image_size}")
        self.nz = nz
        self.init_size = image_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, z: Tensor, pre_x: bool = False) -> Tensor:
        """Generate images from ``z``; ``pre_x=True`` returns the pre-tanh tensor (DFME's ZO space)."""
        h = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        # channels-last makes the upsample + conv stack ≈2.5× faster on CPU (no layout copies);
        # the values are the same as in NCHW.
        h = self.bn0(h.contiguous(memory_format=torch.channels_last))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.block1(h)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        out: Tensor = self.block2(h)
        return out if pre_x else torch.tanh(out)
