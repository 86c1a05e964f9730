"""ResNet-12-S: a small four-stage CIFAR-style ResNet whose later stages carry most of the compute.

A victim that trains on 2 CPU cores and still has something to save by exiting early (DNF paper
§4.1: "later stages cost more"). Layout (basic blocks, He et al. 2016):

======  ========================  ==========  =====================  ==================
stage   layers                    channels    map (28×28 / 32×32)    share of FLOPs
======  ========================  ==========  =====================  ==================
0       3×3 stem + 1 block        16          28×28 / 32×32          ≈ 12 % / 14 %
1       1 block, stride 2         32          14×14 / 16×16          ≈ 9 % / 11 %
2       1 block, stride 2         96          7×7 / 8×8              ≈ 18 % / 21 %
3       2 blocks, stride 2        192         4×4 / 4×4              ≈ 61 % / 54 %
======  ========================  ==========  =====================  ==================

then global average pooling and one linear layer: 12 weighted layers (hence ResNet-12; S for
small), ≈1.32M parameters, ≈62 MFLOPs per 28×28 image. The widths grow faster than the usual
doubling (×2, ×3, ×2) and the last stage has two blocks, so an exit after stage 0 or 1 runs about
a fifth to a third of the network, while a plain ResNet (equal FLOPs per stage) would run half.
Stages on small maps with many channels are also the ones CPUs run most efficiently, so the
early stages' share of CPU time stays close to their share of FLOPs (``benchmarks/victim_recipes.py
--stages`` measures both).
"""

from __future__ import annotations

from collections.abc import Sequence

from fortress.models.resnet import staged_resnet
from fortress.models.staged import StagedBackbone

__all__ = ["RESNET_S_BLOCKS", "RESNET_S_PLANES", "resnet12_s"]

RESNET_S_PLANES = (16, 32, 96, 192)
RESNET_S_BLOCKS = (1, 1, 1, 2)


def resnet12_s(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged ResNet-12-S (widths 16/32/96/192, basic blocks [1, 1, 1, 2], ≈1.32M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels (1 for Fashion-MNIST/MNIST, 3 for CIFAR).
        image_size: square input size (28 or 32 are the sizes it is built for; at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Shape:
        input ``(N, C, S, S)`` in [0, 1]; stages ``16×S``, ``32×⌈S/2⌉``, ``96×⌈S/4⌉``, ``192×⌈S/8⌉``
        square maps; logits ``(N, num_classes)``.

    Example:
        >>> resnet12_s().stage_shapes
        [(16, 28, 28), (32, 14, 14), (96, 7, 7), (192, 4, 4)]
    """
    return staged_resnet(
        RESNET_S_BLOCKS,
        planes=RESNET_S_PLANES,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        arch="resnet12-s",
    )
