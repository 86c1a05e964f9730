"""CIFAR-style ResNet-18-8x and ResNet-34-8x, staged after each residual layer (DNF paper App. E).

These are the victim/clone networks of DFME and DNF: a 3×3 stem with 64 channels at stride 1 (no
max-pool), four layers of basic blocks with 64/128/256/512 planes at strides 1/2/2/2, global average
pooling and one linear layer. Stage 0 is the stem plus the first layer and stages 1–3 are the other
layers, so exits attach after each residual layer on 64, 128, 256 and 512 channels (paper Table 5).
Adaptive pooling lets any input size of at least 8×8 through.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fortress.errors import ConfigError
from fortress.models.staged import StagedBackbone, square_backbone

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlock",
    "check_common",
    "default_normalisation",
    "resnet18_8x",
    "resnet34_8x",
    "staged_resnet",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_PLANES = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)


def default_normalisation(
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fill in a missing mean/std: CIFAR-10's for 3 channels, 0.5 per channel otherwise.

    Args:
        in_channels: image channels.
        mean: the caller's mean, or ``None`` for the default.
        std: the caller's std, or ``None`` for the default.

    Returns:
        ``(mean, std)`` as tuples of floats.
    """
    if mean is None:
        mean = CIFAR10_MEAN if in_channels == 3 else (0.5,) * in_channels
    if std is None:
        std = CIFAR10_STD if in_channels == 3 else (0.5,) * in_channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_common(num_classes: int, in_channels: int, image_size: int, min_size: int, name: str) -> None:
    """Validate the shared factory arguments, raising :class:`ConfigError` naming the bad one."""
    if num_classes < 2:
        raise ConfigError(f"{name}: num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"{name}: in_channels must be at least 1, got {in_channels}")
    if image_size < min_size:
        raise ConfigError(f"{name}: image_size must be at least {min_size}, got {image_size}")


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN projection) shortcut, then ReLU.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (and of the projection shortcut).

    Shape:
        ``(N, in_planes, H, W)`` → ``(N, planes, ⌈H/stride⌉, ⌈W/stride⌉)``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        if in_planes < 1 or planes < 1 or stride < 1:
            raise ConfigError(
                f"BasicBlock needs positive sizes, got in_planes={in_planes}, planes={planes}, stride={stride}"
            )
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        result: Tensor = self.relu(out)
        return result


def _layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    mods: list[nn.Module] = [BasicBlock(in_planes, planes, stride)]
    mods += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*mods)


def staged_resnet(
    blocks: Sequence[int],
    *,
    planes: Sequence[int] = _PLANES,
    strides: Sequence[int] = _STRIDES,
    stem_stride: int = 1,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    arch: str,
) -> StagedBackbone:
    """Build a staged CIFAR-style ResNet of basic blocks, one stage per residual layer.

    A 3×3 stem with ``planes[0]`` channels at stride ``stem_stride`` (no max-pool), then one layer
    of ``blocks[i]`` basic blocks with ``planes[i]`` channels at stride ``strides[i]`` per stage,
    global average pooling and one linear layer. Stage 0 is the stem plus the first layer.

    Args:
        blocks: basic blocks per layer (one positive count per stage).
        planes: channels of each layer.
        strides: stride of each layer's first block.
        stem_stride: stride of the stem convolution (1 in CIFAR-style ResNets).
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.
        arch: the registry name recorded in saved configs.

    Raises:
        ConfigError: a size is out of range or the per-stage lists differ in length.
    """
    check_common(num_classes, in_channels, image_size, 8, arch)
    mean_t, std_t = default_normalisation(in_channels, mean, std)
    if len(planes) != len(strides) or any(p < 1 for p in planes) or min(*strides, stem_stride) < 1:
        raise ConfigError(
            f"{arch}: need positive planes and strides per stage, got {list(planes)}, {list(strides)}, "
            f"stem stride {stem_stride}"
        )
    stem = nn.Sequential(
        nn.Conv2d(in_channels, planes[0], 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(planes[0]),
        nn.ReLU(),
    )
    layers: list[nn.Sequential] = []
    in_planes = planes[0]
    if len(blocks) != len(planes) or any(n < 1 for n in blocks):
        raise ConfigError(f"{arch}: need {len(planes)} positive block counts, got {list(blocks)}")
    for width, n, stride in zip(planes, blocks, strides, strict=True):
        layers.append(_layer(in_planes, width, n, stride))
        in_planes = width
    stages: list[nn.Module] = [nn.Sequential(stem, layers[0]), *layers[1:]]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes[-1], num_classes))
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


def resnet18_8x(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged CIFAR-style ResNet-18-8x (basic blocks [2, 2, 2, 2], ≈11.2M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> resnet18_8x().stage_channels
        [64, 128, 256, 512]
    """
    return staged_resnet(
        (2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        arch="resnet18-8x",
    )


def resnet34_8x(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged CIFAR-style ResNet-34-8x (basic blocks [3, 4, 6, 3], ≈21.3M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: square input size (at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Example:
        >>> resnet34_8x().stage_shapes[-1]
        (512, 4, 4)
    """
    return staged_resnet(
        (3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        arch="resnet34-8x",
    )
