"""LeNet-5 and LeNet-5-Half, staged after each convolution (DNF paper Table 6 / Table 7).

LeNet-5 (≈61.7k parameters at 28×28): conv5×5(6, pad 2) → pool → conv5×5(16) → pool → conv5×5(120)
→ fc(84) → fc(K). Stages end after each convolution block, so on 28×28 inputs the three exits see
6·14·14 = 1176, 16·5·5 = 400 and 120 features — exactly the exit head widths of paper Table 6.
LeNet-5-Half halves every width (the clone architecture of paper Table 7).
"""

from __future__ import annotations

from torch import nn

from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone, square_backbone

__all__ = ["MNIST_MEAN", "MNIST_STD", "lenet5"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def lenet5(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    width: float = 1.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    arch: str = "lenet5",
) -> StagedBackbone:
    """Build a staged LeNet-5 (``width=0.5`` gives LeNet-5-Half).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (28 or 32; padding keeps conv3's input at 5×5).
        width: channel multiplier.
        mean: normalisation mean (defaults to MNIST's for 1 channel, 0.5 otherwise).
        std: normalisation std.
        arch: the registry name recorded in saved configs.

    Example:
        >>> lenet5().stage_shapes
        [(6, 14, 14), (16, 5, 5), (120, 1, 1)]
    """
    if image_size not in (28, 32):
        raise ConfigError(f"LeNet-5 takes 28×28 or 32×32 images, got image_size={image_size}")
    if not 0 < width <= 4:
        raise ConfigError(f"width must be in (0, 4], got {width}")
    c1, c2, c3, f1 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
    pad = 2 if image_size == 28 else 0
    stages = [
        nn.Sequential(nn.Conv2d(in_channels, c1, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c2, c3, 5), nn.ReLU()),
    ]
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3, f1), nn.ReLU(), nn.Linear(f1, num_classes))
    if mean is None:
        mean = MNIST_MEAN * in_channels if in_channels == 1 else (0.5,) * in_channels
    if std is None:
        std = MNIST_STD * in_channels if in_channels == 1 else (0.5,) * in_channels
    return square_backbone(
        stages,
        classifier,
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
    )
