"""VGG-11 and VGG-16 with batch normalisation for small images, staged after each conv block.

Configurations A (VGG-11) and D (VGG-16): 3×3 convolutions with BatchNorm and ReLU, grouped into
five blocks that each end with a 2×2 max-pool. Each block is one stage, so exits see 64, 128, 256,
512 and 512 channels. The classifier is a global average pool to 1×1, a flatten and one linear layer
(the usual CIFAR variant). Five halvings need inputs of at least 32×32.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fortress.models.resnet import check_common, default_normalisation
from fortress.models.staged import StagedBackbone, square_backbone

__all__ = ["VGG_BLOCKS", "vgg11", "vgg16"]

#: Convolution widths of each of the five blocks (each block ends with a max-pool).
VGG_BLOCKS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


def _block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    mods: list[nn.Module] = []
    c = in_channels
    for w in widths:
        mods += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    mods.append(nn.MaxPool2d(2))
    return nn.Sequential(*mods)


def _vgg(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> StagedBackbone:
    check_common(num_classes, in_channels, image_size, 32, arch)
    mean_t, std_t = default_normalisation(in_channels, mean, std)
    stages: list[nn.Module] = []
    c = in_channels
    for widths in VGG_BLOCKS[arch]:
        stages.append(_block(c, widths))
        c = widths[-1]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return square_backbone(
        stages,
        classifier,
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean_t,
        std=std_t,
    )


def vgg11(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged VGG-11 with BatchNorm (configuration A, 8 conv layers, ≈9.2M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 32).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> vgg11().stage_channels
        [64, 128, 256, 512, 512]
    """
    return _vgg("vgg11", num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std)


def vgg16(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged VGG-16 with BatchNorm (configuration D, 13 conv layers, ≈14.7M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 32).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> vgg16().stage_shapes[-1]
        (512, 1, 1)
    """
    return _vgg("vgg16", num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std)
