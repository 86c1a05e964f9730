"""The public ``dataset`` registry: CLI/config names mapped to loaders, and :func:`load_dataset`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fortress.data._common import IMAGE_EXTENSIONS, require_exists
from fortress.data.base import ImageSet
from fortress.data.cifar import load_cifar
from fortress.data.embedded import digits28, mnist_all, mnist_splits, natural_patches, noise_images
from fortress.data.loaders import load_image_folder, load_mnist_idx, load_npz
from fortress.errors import ConfigError
from fortress.registry import Registry

__all__ = ["DATASETS", "DatasetInfo", "load_dataset"]

# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DatasetInfo:
    """A named data set the CLI and configs can refer to.

    Attributes:
        name: the registry name.
        description: one line for ``--help`` and listings.
        needs_path: whether ``load`` needs a file or folder.
        load: ``load(path, **options) -> ImageSet``; loaders that need no path ignore it.
    """

    name: str
    description: str
    needs_path: bool
    load: Callable[..., ImageSet]


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def _add(name: str, description: str, needs_path: bool, load: Callable[..., ImageSet]) -> None:
    DATASETS.add(name, DatasetInfo(name, description, needs_path, load))


def _mnist(path: Path | None) -> ImageSet:
    return mnist_all()


def _split_loader(split: Literal["train", "val", "test", "attacker"]) -> Callable[..., ImageSet]:
    def load(path: Path | None, *, seed: int = 0) -> ImageSet:
        splits = mnist_splits(seed)
        out: ImageSet = getattr(splits, split)
        return out

    return load


def _digits28(path: Path | None, *, size: int = 28) -> ImageSet:
    return digits28(size)


def _patches(path: Path | None, *, n: int = 5000, size: int = 28, channels: int = 1, seed: int = 0) -> ImageSet:
    return natural_patches(n, size, channels=channels, seed=seed)


def _noise(
    path: Path | None,
    *,
    n: int = 5000,
    shape: tuple[int, int, int] = (1, 28, 28),
    kind: Literal["uniform", "gaussian", "smooth"] = "uniform",
    seed: int = 0,
) -> ImageSet:
    return noise_images(n, shape, kind=kind, seed=seed)


def _mnist_idx(path: Path, *, split: Literal["train", "test"] = "train") -> ImageSet:
    return load_mnist_idx(path, split)


def _cifar10(path: Path, *, split: Literal["train", "test"] = "train") -> ImageSet:
    return load_cifar(path, split, variant="cifar10")


def _cifar100(
    path: Path, *, split: Literal["train", "test"] = "train", label: Literal["fine", "coarse"] = "fine"
) -> ImageSet:
    return load_cifar(path, split, variant="cifar100", label=label)


def _imagefolder(
    path: Path,
    *,
    size: int | None = None,
    channels: Literal[1, 3] = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageSet:
    return load_image_folder(path, size=size, channels=channels, extensions=extensions)


def _npz(path: Path, *, x_key: str = "x", y_key: str | None = "y") -> ImageSet:
    return load_npz(path, x_key=x_key, y_key=y_key)


_add("mnist", "all 5,000 embedded MNIST digits (1x28x28)", False, _mnist)
_add("mnist-train", "embedded MNIST, victim training split (3,500)", False, _split_loader("train"))
_add("mnist-val", "embedded MNIST, defender validation split (300)", False, _split_loader("val"))
_add("mnist-test", "embedded MNIST, test split (1,000)", False, _split_loader("test"))
_add("mnist-attacker", "embedded MNIST, attacker-owned split (200)", False, _split_loader("attacker"))
_add("digits28", "scikit-learn's 1,797 8x8 digits upscaled to 28x28", False, _digits28)
_add("patches", "grey-scale crops of natural photographs (unlabelled, default 5,000)", False, _patches)
_add("noise", "uniform random images (unlabelled, default 5,000)", False, _noise)
_add("mnist-idx", "MNIST-format IDX files (MNIST, Fashion-MNIST), plain or .gz", True, _mnist_idx)
_add("cifar10", "official CIFAR-10 python batches", True, _cifar10)
_add("cifar100", "official CIFAR-100 python batches", True, _cifar100)
_add("imagefolder", "a root/<class>/<image> folder tree", True, _imagefolder)
_add("npz", "an .npz archive of images (and labels)", True, _npz)


def load_dataset(name: str, path: Path | str | None = None, **kw: Any) -> ImageSet:
    """Load the registered data set ``name``.

    Args:
        name: a name from :data:`DATASETS` (e.g. ``"mnist-train"``, ``"cifar10"``, ``"npz"``).
        path: the file or folder, for data sets that need one (ignored by the others).
        **kw: loader options (e.g. ``split="test"``, ``n=1000``, ``size=32``).

    Returns:
        The data set as an :class:`ImageSet`.

    Raises:
        UnknownComponent: ``name`` is not registered (the message lists the valid names).
        ConfigError: a path is needed but not given, or an option the loader does not take.
        ArtifactError: ``path`` does not exist or holds bad data.
    """
    info = DATASETS.get(name)
    if info.needs_path:
        if path is None:
            raise ConfigError(f"dataset {name!r} needs a path to its files; none was given")
        path = Path(path)
        require_exists(path, f"dataset {name!r} path")
    params = inspect.signature(info.load).parameters
    accepted = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted) or '(none)'}"
        )
    return info.load(path, **kw)
