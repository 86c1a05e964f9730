"""The image-set container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fortress.errors import InvalidInput
from fortress.tensors import check_images, check_labels

__all__ = ["ImageSet"]


@dataclass(frozen=True)
class ImageSet:
    """Images (float32 NCHW in [0, 1]) with optional integer labels.

    Attributes:
        x: ``(N, C, H, W)`` float32 images in [0, 1].
        y: class labels, or ``None`` for unlabelled pools: any integer dtype, ``(N,)`` or ``(N, 1)``,
            in ``[0, len(classes))``; stored as int64 ``(N,)`` (:func:`~fortress.tensors.check_labels`).
        classes: class names, or ``None``.
        name: where the images came from.
    """

    x: Tensor
    y: Tensor | None = None
    classes: tuple[str, ...] | None = None
    name: str = "images"

    def __post_init__(self) -> None:
        check_images(self.x, name=f"{self.name} images")
        if self.y is not None:  # the label contract: stored as int64 (N,), never broadcast
            k = None if self.classes is None else len(self.classes)
            object.__setattr__(self, "y", check_labels(self.y, len(self.x), k, name=f"{self.name} labels"))

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
