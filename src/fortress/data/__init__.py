"""Data: the embedded default set, loaders for user data sets, pools and batched transforms."""

from __future__ import annotations

from fortress.data.base import ImageSet
from fortress.data.cifar import load_cifar
from fortress.data.embedded import (
    MnistSplits,
    digits28,
    mnist_all,
    mnist_splits,
    natural_patches,
    noise_images,
)
from fortress.data.images import MODE_TABLE, ImageLimits, decode_image
from fortress.data.loaders import load_image_folder, load_mnist_idx, load_npz
from fortress.data.registry import DATASETS, DatasetInfo, load_dataset

__all__ = [
    "DATASETS",
    "MODE_TABLE",
    "DatasetInfo",
    "ImageLimits",
    "ImageSet",
    "MnistSplits",
    "decode_image",
    "digits28",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_mnist_idx",
    "load_npz",
    "mnist_all",
    "mnist_splits",
    "natural_patches",
    "noise_images",
]
