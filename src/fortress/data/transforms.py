"""Batched image transforms on float32 NCHW tensors in [0, 1] (no torchvision).

All transforms work on a whole batch with tensor operations (no per-sample Python loop) and take
an explicit ``torch.Generator`` for reproducibility.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_shift", "resize", "to_channels"]


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate every image by an independent random offset in ``[-max_shift, max_shift]`` pixels.

    Pads with zeros (the background of digit images) and crops back, all in one gather.

    Shape:
        ``(N, C, H, W)`` → ``(N, C, H, W)``.
    """
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (N, W)
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * max_shift)
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, idx_c)


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear (antialiased) resize of a batch, clamped back to [0, 1]."""
    hw = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def to_channels(x: Tensor, channels: int) -> Tensor:
    """Convert a batch between grey-scale and RGB (ITU-R 601 luma for RGB → grey)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
