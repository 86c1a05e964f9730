"""Helpers shared by the data loaders (conversion to the tensor contract, file checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fortress.errors import ArtifactError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGIT_NAMES = tuple(str(i) for i in range(10))


def u8_to_images(arr: npt.NDArray[np.uint8]) -> Tensor:
    """Turn a uint8 ``(N, C, H, W)`` array into float32 images in [0, 1]."""
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(torch.float32).div_(255.0)


def require_exists(path: Path, what: str) -> None:
    """Raise :class:`ArtifactError` unless ``path`` exists."""
    if not path.exists():
        raise ArtifactError(f"{what} {path} does not exist")


def check_labels(y: npt.NDArray[np.int64], num_classes: int, source: Path) -> None:
    """Raise :class:`ArtifactError` if a label falls outside ``[0, num_classes)``."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ArtifactError(f"{source} has labels in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]")
