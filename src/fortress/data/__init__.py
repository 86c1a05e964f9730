"""Data: the embedded default set, loaders for user data sets, pools and batched transforms."""

from __future__ import annotations

from fortress.data.base import ImageSet
from fortress.data.embedded import MnistSplits, digits28, mnist_all, mnist_splits, natural_patches, noise_images

__all__ = ["ImageSet", "MnistSplits", "digits28", "mnist_all", "mnist_splits", "natural_patches", "noise_images"]
