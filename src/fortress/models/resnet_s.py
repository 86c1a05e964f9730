"""ResNet-14-S: a small four-stage residual victim whose later stages carry most of the compute.

A victim that trains on 2 CPU cores and still has something to save by exiting early (DNF paper
§4.1: an early exit skips the later, costlier stages). Basic blocks (He et al. 2016), CIFAR-style
(3×3 stem, no max-pool), with two changes that put the cost late:

======  ===============================  ========  ==================  ===============
stage   layers                           channels  map (28 / 32 px)    share of FLOPs
======  ===============================  ========  ==================  ===============
0       3×3 stem at stride 2 + 1 block   32        14×14 / 16×16       ≈ 8 % / 10 %
1       1 block, stride 2                64        7×7 / 8×8           ≈ 6 % / 7 %
2       2 blocks, stride 2               128       4×4 / 4×4           ≈ 17 % / 17 %
3       2 blocks, stride 1               256       4×4 / 4×4           ≈ 69 % / 67 %
======  ===============================  ========  ==================  ===============

then global average pooling and one linear layer: 14 weighted layers (ResNet-14; S for small),
≈2.70M parameters, ≈97 MFLOPs per 28×28 image.

* **Stride-2 stem.** Narrow convolutions on full-resolution maps are the least efficient work a
  CPU does (a 16-channel 3×3 convolution at 28×28 ran at about a fifth of the FLOP rate of a
  192-channel one at 4×4), so a stride-1 stem made stage 0 about half of the CPU time while it
  held 12 % of the FLOPs. Starting at 14×14 keeps the early stages cheap in time, not only in
  FLOPs. Fashion-MNIST and CIFAR images lose little at 14×14/16×16 with 32 channels.
* **The last stage keeps its 4×4 map** (stride 1) and doubles the channels, so it holds about
  two thirds of the FLOPs: an answer at exit 0 or 1 runs about an eighth of the network, at exit
  2 under a third.

``benchmarks/victim_recipes.py --stages`` measures the FLOPs and CPU time of every stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from fortress.models.resnet import staged_resnet
from fortress.models.staged import StagedBackbone

__all__ = ["RESNET_S_BLOCKS", "RESNET_S_PLANES", "RESNET_S_STRIDES", "resnet14_s"]

RESNET_S_PLANES = (32, 64, 128, 256)
RESNET_S_BLOCKS = (1, 1, 2, 2)
RESNET_S_STRIDES = (1, 2, 2, 1)
RESNET_S_STEM_STRIDE = 2


def resnet14_s(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedBackbone:
    """Build a staged ResNet-14-S (widths 32/64/128/256, basic blocks [1, 1, 2, 2], ≈2.70M parameters).

    Args:
        num_classes: output classes.
        in_channels: image channels (1 for Fashion-MNIST/MNIST, 3 for CIFAR).
        image_size: square input size (built for 28 and 32; at least 8).
        mean: normalisation mean (CIFAR-10's for 3 channels, 0.5 otherwise).
        std: normalisation std.

    Shape:
        input ``(N, C, S, S)`` in [0, 1]; with ``a = ⌈S/2⌉``, ``b = ⌈a/2⌉``, ``c = ⌈b/2⌉`` the
        stages output ``32×a×a``, ``64×b×b``, ``128×c×c`` and ``256×c×c``; logits ``(N, num_classes)``.

    Example:
        >>> resnet14_s().stage_shapes
        [(32, 14, 14), (64, 7, 7), (128, 4, 4), (256, 4, 4)]
    """
    return staged_resnet(
        RESNET_S_BLOCKS,
        planes=RESNET_S_PLANES,
        strides=RESNET_S_STRIDES,
        stem_stride=RESNET_S_STEM_STRIDE,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        arch="resnet14-s",
    )
