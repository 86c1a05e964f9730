"""CIFAR-style MobileNetV2 (Sandler et al., 2018), staged for exits: a clone architecture of paper Table 1.

The CIFAR variant used by the data-free extraction literature: a 3×3 stem of 32 channels at stride 1
and the second bottleneck group at stride 1 (ImageNet's MobileNetV2 downsamples 32× and would leave
1×1 maps on 32×32 images), so the feature maps are 32, 16, 8 and 4 pixels wide. Inverted residual
blocks: 1×1 expansion, 3×3 depth-wise convolution, 1×1 linear projection, with a residual connection
when the shape allows. Four stages (after the 24-, 32-, 96- and 1280-channel features).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fortress.models.resnet import check_common, default_normalisation
from fortress.models.staged import StagedBackbone, square_backbone

__all__ = ["InvertedResidual", "mobilenetv2"]

# (expansion, output channels, blocks, stride of the first block); CIFAR strides (paper Table 2 of
# Sandler et al. with the first two downsamplings removed)
_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# which of the groups above close each stage (stage k ends after group _STAGE_ENDS[k])
_STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand (ReLU6), 3×3 depth-wise (ReLU6), 1×1 project, optional residual.

    Shape:
        ``(N, in_planes, H, W)`` → ``(N, out_planes, ⌈H/stride⌉, ⌈W/stride⌉)``.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.residual = stride == 1 and in_planes == out_planes
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out: Tensor = self.body(x)
        return out + x if self.residual else out


def mobilenetv2(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged CIFAR-style MobileNetV2 (≈2.3M parameters for 10 classes).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> mobilenetv2().stage_channels
        [24, 32, 96, 1280]
    """
    check_common(num_classes, in_channels, image_size, 8, "mobilenetv2")
    mean_t, std_t = default_normalisation(in_channels, mean, std)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    stages: list[nn.Module] = []
    in_planes = 32
    for g, (t, c, n, s) in enumerate(_CFG):
        for i in range(n):
            layers.append(InvertedResidual(in_planes, c, t, s if i == 0 else 1))
            in_planes = c
        if g in _STAGE_ENDS:
            if g == _STAGE_ENDS[-1]:
                layers += [nn.Conv2d(in_planes, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
            stages.append(nn.Sequential(*layers))
            layers = []
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))
    return square_backbone(
        stages,
        classifier,
        arch="mobilenetv2",
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean_t,
        std=std_t,
    )
