"""The image-set container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fortress.errors import InvalidInput
from fortress.tensors import check_images

__all__ = ["ImageSet"]


@dataclass(frozen=True)
class ImageSet:
    """Images (float32 NCHW in [0, 1]) with optional integer labels.

    Attributes:
        x: ``(N, C, H, W)`` float32 images in [0, 1].
        y: ``(N,)`` int64 labels, or ``None`` for unlabelled pools.
        classes: class names, or ``None``.
        name: where the images came from.
    """

    x: Tensor
    y: Tensor | None = None
    classes: tuple[str, ...] | None = None
    name: str = "images"

    def __post_init__(self) -> None:
        check_images(self.x, name=f"{self.name} images")
        if self.y is not None:
            if self.y.dtype != torch.int64 or self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
                raise InvalidInput(
                    f"{self.name} labels must be int64 of shape ({self.x.shape[0]},), "
                    f"got {self.y.dtype} {tuple(self.y.shape)}"
                )
            if self.classes is not None and self.y.numel() and int(self.y.max()) >= len(self.classes):
                raise InvalidInput(f"{self.name} has label {int(self.y.max())} but only {len(self.classes)} classes")

    @property
    def targets(self) -> Tensor:
        """The labels; raises :class:`InvalidInput` for an unlabelled set."""
        if self.y is None:
            raise InvalidInput(f"{self.name} has no labels")
        return self.y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Number of classes (from ``classes`` or the largest label)."""
        if self.classes is not None:
            return len(self.classes)
        return None if self.y is None else int(self.y.max()) + 1

    def subset(self, idx: Tensor, name: str | None = None) -> ImageSet:
        """The images (and labels) at ``idx``."""
        return ImageSet(self.x[idx], None if self.y is None else self.y[idx], self.classes, name or self.name)
