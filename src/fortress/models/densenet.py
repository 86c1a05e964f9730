"""CIFAR-style DenseNet-121 (Huang et al., 2017), staged for exits: a clone architecture of paper Table 1.

The CIFAR variant of the data-free extraction literature: a 3×3 stem of ``2·growth`` channels at
stride 1 (no max-pool), four dense blocks of [6, 12, 24, 16] bottleneck layers (BN-ReLU-1×1 conv to
``4·growth``, BN-ReLU-3×3 conv to ``growth``, concatenated), transitions that halve the channels and
the resolution in between, and a final BN-ReLU. Growth 32 as in DenseNet-121. One stage per dense
block (with its transition), so exits attach on 32, 16, 8 and 4 pixel maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fortress.models.resnet import check_common, default_normalisation
from fortress.models.staged import StagedBackbone, square_backbone

__all__ = ["Bottleneck", "densenet121"]

_BLOCKS = (6, 12, 24, 16)


class Bottleneck(nn.Module):
    """One dense layer: BN-ReLU-1×1 conv (4·growth), BN-ReLU-3×3 conv (growth), concatenated to its input.

    Shape:
        ``(N, C, H, W)`` → ``(N, C + growth, H, W)``.
    """

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(),
            nn.Conv2d(in_planes, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer."""
        return torch.cat([self.body(x), x], dim=1)


def _transition(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.AvgPool2d(2)
    )


def densenet121(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged CIFAR-style DenseNet-121 (growth 32, blocks [6, 12, 24, 16], ≈7.0M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> densenet121().stage_channels
        [128, 256, 512, 1024]
    """
    check_common(num_classes, in_channels, image_size, 8, "densenet121")
    mean_t, std_t = default_normalisation(in_channels, mean, std)
    growth = 32
    planes = 2 * growth
    head: list[nn.Module] = [nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)]
    stages: list[nn.Module] = []
    for b, n in enumerate(_BLOCKS):
        layers: list[nn.Module] = head if b == 0 else []
        for _ in range(n):
            layers.append(Bottleneck(planes, growth))
            planes += growth
        if b < len(_BLOCKS) - 1:
            layers.append(_transition(planes, planes // 2))
            planes //= 2
        else:
            layers += [nn.BatchNorm2d(planes), nn.ReLU()]
        stages.append(nn.Sequential(*layers))
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes, num_classes))
    return square_backbone(
        stages,
        classifier,
        arch="densenet121",
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean_t,
        std=std_t,
    )
