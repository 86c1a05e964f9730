"""The public ``dataset`` registry: CLI/config names mapped to loaders, and :func:`load_dataset`.

Each entry says how to load the set (``load(path, **options)``), where its files are by default,
which files it reads (for the content hash of :func:`fortress.data.resolve.resolve_data`) and, for
the embedded digits, its fixed defender/attacker splits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fortress.data._common import IMAGE_EXTENSIONS
from fortress.data.base import ImageSet
from fortress.data.cifar import cifar_files, load_cifar
from fortress.data.embedded import MnistSplits, digits28, mnist_all, mnist_splits, natural_patches, noise_images
from fortress.data.loaders import IDX_STEMS, idx_files, load_image_folder, load_mnist_idx, load_npz
from fortress.errors import ArtifactError, ConfigError
from fortress.registry import Registry

__all__ = [
    "DATASETS",
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "DatasetInfo",
    "dataset_path",
    "load_dataset",
    "loader_options",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the four gzipped IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST's class names (label ``i`` is ``FASHION_CLASSES[i]``), from the data set's README.
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DatasetInfo:
    """A named data set the CLI and configs can refer to.

    Attributes:
        name: the registry name.
        description: one line for ``--help`` and listings.
        needs_path: whether ``load`` needs a file or folder (none given: ``default_path``).
        load: ``load(path, **options) -> ImageSet``; loaders that need no path ignore it. A loader
            with a ``split`` option (``"train"``/``"test"``) reads a set with its own test files.
        default_path: where the files are when no path is given (``None``: a path must be given).
        install_hint: how to get the files, added to the message when they are missing.
        files: ``files(path, **options)`` — every file the set is read from (for its content
            hash); ``None``: the hash is taken over the loaded arrays.
        fixed_splits: ``fixed_splits(seed)`` — the set's own defender/attacker splits (the embedded
            digits); ``None``: :func:`fortress.data.resolve.resolve_data` splits it.
    """

    name: str
    description: str
    needs_path: bool
    load: Callable[..., ImageSet]
    default_path: Path | None = None
    install_hint: str | None = None
    files: Callable[..., tuple[Path, ...]] | None = None
    fixed_splits: Callable[[int], MnistSplits] | None = None


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def _add(name: str, description: str, needs_path: bool, load: Callable[..., ImageSet], **kw: Any) -> None:
    DATASETS.add(name, DatasetInfo(name, description, needs_path, load, **kw))


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


def _idx_files(path: Path) -> tuple[Path, ...]:
    return idx_files(path)


_FASHION_HINT = (
    f"install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist; it puts them in "
    f"{FASHION_MNIST_DIR}) or name the folder: --data fashion-mnist:DIR"
)


def _fashion_files(path: Path) -> tuple[Path, ...]:
    try:
        return idx_files(path)
    except ArtifactError:
        raise ArtifactError(
            f"fashion-mnist: the IDX files ({', '.join(IDX_STEMS)}, plain or .gz) are not in {path}; {_FASHION_HINT}"
        ) from None


def _fashion(path: Path, *, split: Literal["train", "test"] = "train") -> ImageSet:
    _fashion_files(path)
    return load_mnist_idx(path, split, classes=FASHION_CLASSES, name="fashion-mnist")


def _cifar10_files(path: Path) -> tuple[Path, ...]:
    return cifar_files(path, "cifar10")


def _cifar100_files(path: Path, *, label: str = "fine") -> tuple[Path, ...]:
    return cifar_files(path, "cifar100")


def _npz_files(path: Path, *, x_key: str = "x", y_key: str | None = "y") -> tuple[Path, ...]:
    return (path,)


def _mnist_fixed(seed: int) -> MnistSplits:
    return mnist_splits(seed)


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


_add("mnist", "all 5,000 embedded MNIST digits (1x28x28)", False, _mnist, fixed_splits=_mnist_fixed)
_add("mnist-train", "embedded MNIST, victim training split (3,500)", False, _split_loader("train"))
_add("mnist-val", "embedded MNIST, defender validation split (300)", False, _split_loader("val"))
_add("mnist-test", "embedded MNIST, test split (1,000)", False, _split_loader("test"))
_add("mnist-attacker", "embedded MNIST, attacker-owned split (200)", False, _split_loader("attacker"))
_add("digits28", "scikit-learn's 1,797 8x8 digits upscaled to 28x28", False, _digits28)
_add("patches", "grey-scale crops of natural photographs (unlabelled, default 5,000)", False, _patches)
_add("noise", "uniform random images (unlabelled, default 5,000)", False, _noise)
_add("mnist-idx", "MNIST-format IDX files (MNIST, Fashion-MNIST), plain or .gz", True, _mnist_idx, files=_idx_files)
_add(
    "fashion-mnist",
    f"Fashion-MNIST: 60,000 + 10,000 1x28x28 images of 10 clothing classes (IDX files, default {FASHION_MNIST_DIR})",
    False,
    _fashion,
    default_path=FASHION_MNIST_DIR,
    install_hint=_FASHION_HINT,
    files=_fashion_files,
)
_add("cifar10", "official CIFAR-10 python batches", True, _cifar10, files=_cifar10_files)
_add("cifar100", "official CIFAR-100 python batches", True, _cifar100, files=_cifar100_files)
_add("imagefolder", "a root/<class>/<image> folder tree", True, _imagefolder)
_add("npz", "an .npz archive of images (and labels)", True, _npz, files=_npz_files)


def loader_options(info: DatasetInfo) -> list[str]:
    """The keyword options ``info.load`` takes."""
    params = inspect.signature(info.load).parameters
    return [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def dataset_path(info: DatasetInfo, path: Path | str | None) -> Path | None:
    """The path ``info`` is read from: ``path``, else its default location; checked to exist.

    Raises:
        ConfigError: the set needs a path and none was given.
        ArtifactError: the path does not exist (with the set's install hint, if it has one).
    """
    if not info.needs_path and info.default_path is None:
        return None if path is None else Path(path)  # built-in sets read no files; a path is ignored
    if path is None:
        path = info.default_path
        if path is None:
            raise ConfigError(f"dataset {info.name!r} needs a path to its files; none was given")
    path = Path(path)
    if not path.exists():
        hint = f"; {info.install_hint}" if info.install_hint else ""
        raise ArtifactError(f"dataset {info.name!r} path {path} does not exist{hint}")
    return path


def load_dataset(name: str, path: Path | str | None = None, **kw: Any) -> ImageSet:
    """Load the registered data set ``name``.

    Args:
        name: a name from :data:`DATASETS` (e.g. ``"mnist-train"``, ``"cifar10"``, ``"npz"``).
        path: the file or folder, for data sets that need one (ignored by the others; ``None``: the
            set's default location, e.g. ``/usr/share/datasets/fashion-mnist``).
        **kw: loader options (e.g. ``split="test"``, ``n=1000``, ``size=32``).

    Returns:
        The data set as an :class:`ImageSet`.

    Raises:
        UnknownComponent: ``name`` is not registered (the message lists the valid names).
        ConfigError: a path is needed but not given, or an option the loader does not take.
        ArtifactError: ``path`` does not exist or holds bad data.
    """
    info = DATASETS.get(name)
    where = dataset_path(info, path)
    accepted = loader_options(info)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted) or '(none)'}"
        )
    return info.load(where, **kw)
