"""Loaders for data sets users bring, and the public ``dataset`` registry.

Every loader returns an :class:`~fortress.data.base.ImageSet` that honours the tensor contract
(float32 NCHW in [0, 1], int64 labels). Files are parsed defensively: a missing, truncated or
malformed file raises :class:`~fortress.errors.ArtifactError` naming the file and what was expected.

Supported formats:

* MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), plain or gzipped: :func:`load_mnist_idx`;
* the official CIFAR-10 / CIFAR-100 "python version" batches: :func:`load_cifar`. These are pickles;
  they are read with a restricted unpickler that only rebuilds numpy arrays, never arbitrary code;
* ``root/<class>/<image>`` folder trees: :func:`load_image_folder`;
* ``.npz`` archives of arrays (never pickled content): :func:`load_npz`.

:data:`DATASETS` maps the CLI/config names to loaders; :func:`load_dataset` is the one entry point.
"""

from __future__ import annotations

import gzip
import inspect
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fortress.data.base import ImageSet
from fortress.data.embedded import digits28, mnist_all, mnist_splits, natural_patches, noise_images
from fortress.errors import ArtifactError, ConfigError
from fortress.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_mnist_idx",
    "load_npz",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_DIGITS = tuple(str(i) for i in range(10))


def _u8_to_images(arr: npt.NDArray[np.uint8]) -> Tensor:
    """Turn a uint8 ``(N, C, H, W)`` array into float32 images in [0, 1]."""
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(torch.float32).div_(255.0)


def _require_exists(path: Path, what: str) -> None:
    """Raise :class:`ArtifactError` unless ``path`` exists."""
    if not path.exists():
        raise ArtifactError(f"{what} {path} does not exist")


def _check_labels(y: npt.NDArray[np.int64], num_classes: int, source: Path) -> None:
    """Raise :class:`ArtifactError` if a label falls outside ``[0, num_classes)``."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ArtifactError(f"{source} has labels in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]")


# --------------------------------------------------------------------------------------------- IDX

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def _find_idx_file(root: Path, stem: str) -> Path:
    """Locate ``stem`` under ``root``, plain or gzipped (also the ``-images.idx3`` spelling)."""
    alt = stem.replace("-idx", ".idx")
    candidates = [root / name for base in (stem, alt) for name in (base, base + ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ArtifactError(
        f"no IDX file {stem!r} (or {stem}.gz) in {root}; expected the standard MNIST file names "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)"
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing ``.gz`` files."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc


def _parse_idx(path: Path, magic: int) -> npt.NDArray[np.uint8]:
    """Parse one IDX file of unsigned bytes with the expected ``magic`` number."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ArtifactError(f"{path} is truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
        raise ArtifactError(f"{path} has IDX magic number 0x{found:08X}, expected 0x{magic:08X} (unsigned-byte {kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ArtifactError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        state = "is truncated" if len(raw) - header < expected else "has trailing bytes"
        raise ArtifactError(
            f"{path} {state}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(root: Path | str, split: Literal["train", "test"] = "train") -> ImageSet:
    """Load MNIST-format IDX files (MNIST, Fashion-MNIST, ...) from ``root``.

    Args:
        root: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        split: ``"train"`` or ``"test"`` (the ``t10k`` files).

    Returns:
        ``(N, 1, H, W)`` images in [0, 1] with int64 labels and classes ``"0"`` .. ``"9"``.

    Raises:
        ConfigError: ``split`` is not ``"train"`` or ``"test"``.
        ArtifactError: a file is missing, truncated, has the wrong magic number, or the image and
            label counts differ; the message names the file.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    _require_exists(root, "MNIST IDX folder")
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _parse_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ArtifactError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds {images.shape[0]} images; "
            "expected one label per image"
        )
    if images.shape[0] == 0:
        raise ArtifactError(f"{images_path} holds no images")
    y = labels.astype(np.int64)
    _check_labels(y, len(_DIGITS), labels_path)
    x = _u8_to_images(images[:, None, :, :])
    return ImageSet(x, torch.from_numpy(y), _DIGITS, f"mnist-idx-{split}")


# ------------------------------------------------------------------------------------------- CIFAR


def _safe_reconstruct(subtype: object, shape: object, dtype: object) -> npt.NDArray[Any]:
    """Stand-in for numpy's ``_reconstruct`` that only builds plain ``ndarray`` objects."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of integers")
    return np.ndarray(shape, dtype=np.dtype(dtype))  # type: ignore[call-overload]


def _safe_frombuffer(buf: object, dtype: object, shape: object, order: object) -> npt.NDArray[Any]:
    """Stand-in for numpy's ``_frombuffer`` (protocol-5 array pickles) that copies the data."""
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise pickle.UnpicklingError(f"array buffer is a {type(buf).__name__}, expected bytes")
    arr = np.frombuffer(buf, dtype=np.dtype(dtype))  # type: ignore[call-overload]
    return np.array(arr.reshape(shape, order=order))  # type: ignore[call-overload]


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"only latin1-encoded bytes are allowed, got encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds dicts, lists, strings, bytes and numpy arrays.

    Any other global a pickle names (``os.system``, ``builtins.eval``, ...) is refused before it
    is looked up, so a malicious file cannot run code.
    """

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, or refuse with :class:`ArtifactError`."""
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise ArtifactError(
                f"refusing to unpickle {module}.{name} from {self._source}: only numpy arrays, dicts, "
                "lists, strings and bytes are allowed in a CIFAR batch file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (CIFAR files have none)."""
        raise ArtifactError(f"refusing to unpickle a persistent id from {self._source}")


# What a malformed (not malicious) pickle can raise while being read.
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    MemoryError,
    struct.error,
)


def _load_pickle_dict(path: Path) -> dict[str, Any]:
    """Safely unpickle a CIFAR batch or meta file into a dict with ``str`` keys."""
    if not path.is_file():
        raise ArtifactError(f"CIFAR file {path} does not exist")
    try:
        with path.open("rb") as fh:
            obj = _ArrayUnpickler(fh, path).load()
    except ArtifactError:
        raise
    except _UNPICKLE_ERRORS as exc:
        raise ArtifactError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, expected a dict (a CIFAR batch or meta file)")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if not isinstance(key, str):
            raise ArtifactError(f"{path} has a dict key {key!r}, expected str or bytes keys")
        out[key] = value
    return out


def _entry(d: dict[str, Any], key: str, path: Path) -> Any:
    """``d[key]``, or an :class:`ArtifactError` listing the available keys."""
    if key not in d:
        raise ArtifactError(f"{path} has no {key!r} entry; available keys: {', '.join(sorted(d)) or '(none)'}")
    return d[key]


def _names(d: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    """Decode a list of class names (bytes or str) from a CIFAR meta file."""
    raw = _entry(d, key, path)
    if not isinstance(raw, list | tuple) or not raw:
        raise ArtifactError(f"{path} entry {key!r} is a {type(raw).__name__}, expected a non-empty list of names")
    names = []
    for item in raw:
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if not isinstance(item, str):
            raise ArtifactError(f"{path} entry {key!r} holds a {type(item).__name__}, expected names")
        names.append(item)
    return tuple(names)


def _cifar_batch(path: Path, label_key: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read one CIFAR batch: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
    d = _load_pickle_dict(path)
    data = _entry(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ArtifactError(f"{path} 'data' is a {desc}, expected a uint8 array of shape (N, 3072)")
    raw_labels = _entry(d, label_key, path)
    try:
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} {label_key!r} is not a list of integers: {exc}") from exc
    if labels.shape != (data.shape[0],):
        raise ArtifactError(
            f"{path} has {data.shape[0]} images but {label_key!r} has shape {labels.shape}; "
            "expected one label per image"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: Path, folder: str, probe: str) -> Path:
    """Return the extracted CIFAR folder: ``root`` itself or ``root/folder``."""
    _require_exists(root, "CIFAR folder")
    if (root / folder).is_dir():
        return root / folder
    if (root / probe).is_file():
        return root
    raise ArtifactError(f"{root} holds neither {folder}/ nor {probe}; expected the extracted CIFAR python archive")


def load_cifar(
    root: Path | str,
    split: Literal["train", "test"] = "train",
    *,
    variant: Literal["cifar10", "cifar100"] = "cifar10",
    label: Literal["fine", "coarse"] = "fine",
) -> ImageSet:
    """Load the official CIFAR-10 or CIFAR-100 "python version" batches.

    The files are pickles; they are read with a restricted unpickler that only rebuilds numpy
    arrays and plain containers, and refuses (with :class:`ArtifactError`) anything else.

    Args:
        root: the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
        split: ``"train"`` (CIFAR-10: ``data_batch_1`` .. ``data_batch_5``) or ``"test"``.
        variant: ``"cifar10"`` or ``"cifar100"``.
        label: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20 super-classes).

    Returns:
        ``(N, 3, 32, 32)`` images in [0, 1], int64 labels and the class names from the meta file.

    Raises:
        ConfigError: a bad ``split``, ``variant`` or ``label``.
        ArtifactError: a missing or malformed file, or a pickle naming a disallowed global.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if label not in ("fine", "coarse"):
        raise ConfigError(f"label must be 'fine' or 'coarse', got {label!r}")
    if variant == "cifar10":
        if label != "fine":
            raise ConfigError(f"CIFAR-10 has only one label set; label must be 'fine', got {label!r}")
        folder = _cifar_dir(root, "cifar-10-batches-py", "batches.meta")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_path, names_key, label_key = folder / "batches.meta", "label_names", "labels"
    elif variant == "cifar100":
        folder = _cifar_dir(root, "cifar-100-python", "meta")
        files = [split]
        meta_path, names_key, label_key = folder / "meta", f"{label}_label_names", f"{label}_labels"
    else:
        raise ConfigError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    classes = _names(_load_pickle_dict(meta_path), names_key, meta_path)
    xs, ys = [], []
    for name in files:
        x, y = _cifar_batch(folder / name, label_key)
        _check_labels(y, len(classes), folder / name)
        xs.append(x)
        ys.append(y)
    images = np.concatenate(xs)
    if images.shape[0] == 0:
        raise ArtifactError(f"{folder} {split} batches hold no images")
    return ImageSet(_u8_to_images(images), torch.from_numpy(np.concatenate(ys)), classes, f"{variant}-{split}")


# -------------------------------------------------------------------------------------- ImageFolder


def _decode_image(path: Path, mode: str, size: int | None) -> npt.NDArray[np.uint8]:
    """Decode one image file to a uint8 ``(H, W, C)`` array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            out = im.convert(mode)
        if size is not None and out.size != (size, size):
            out = out.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(out, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ArtifactError(f"cannot decode image {path}: {exc}") from exc
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def load_image_folder(
    root: Path | str,
    *,
    size: int | None = None,
    channels: Literal[1, 3] = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageSet:
    """Load a ``root/<class>/<image>`` tree (the torchvision ``ImageFolder`` layout).

    Classes are the sub-folder names sorted alphabetically (label ``i`` is the ``i``-th name);
    images are found recursively in each class folder, decoded with Pillow and converted to
    grey-scale (``channels=1``) or RGB. Hidden files and folders are skipped.

    Args:
        root: the tree's root folder.
        size: resize every image to ``size``×``size`` (bilinear); ``None`` keeps the decoded size,
            which must then be the same for every image.
        channels: 1 (grey-scale) or 3 (RGB).
        extensions: file suffixes to load (case-insensitive).

    Returns:
        ``(N, channels, H, W)`` images in [0, 1], int64 labels, and the class names.

    Raises:
        ConfigError: a bad ``size`` or ``channels``.
        ArtifactError: no classes or images, a class folder without images, an undecodable image
            (named), or images of different sizes without ``size``.
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if size is not None and size < 1:
        raise ConfigError(f"size must be a positive number of pixels or None, got {size!r}")
    _require_exists(root, "image folder")
    if not root.is_dir():
        raise ArtifactError(f"image folder {root} is not a directory; expected root/<class>/<image> files")
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ArtifactError(f"image folder {root} has no class sub-folders; expected root/<class>/<image> files")
    files: list[tuple[Path, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        found = sorted(
            p
            for p in (root / cls).rglob("*")
            if p.is_file()
            and p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            empty.append(cls)
        files.extend((p, label) for p in found)
    if empty:
        raise ArtifactError(
            f"image folder {root} has class folders without images ({', '.join(empty)}); "
            f"expected files ending in {', '.join(sorted(suffixes))}"
        )
    mode = "L" if channels == 1 else "RGB"
    arrays = [_decode_image(path, mode, size) for path, _ in files]
    first = arrays[0].shape
    for (path, _), arr in zip(files, arrays, strict=True):
        if arr.shape != first:
            raise ArtifactError(
                f"images differ in size: {files[0][0]} is {first[1]}x{first[0]} but {path} is "
                f"{arr.shape[1]}x{arr.shape[0]}; pass size= to resize every image to the same square size"
            )
    x = _u8_to_images(np.stack(arrays).transpose(0, 3, 1, 2))
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(x, y, tuple(classes), f"imagefolder-{root.name}")


# ---------------------------------------------------------------------------------------------- npz


def _npz_images(arr: npt.NDArray[Any], key: str, path: Path) -> Tensor:
    """Convert an image array from an ``.npz`` file to float32 NCHW in [0, 1]."""
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4:
        nchw, nhwc = arr.shape[1] in (1, 3), arr.shape[3] in (1, 3)
        if nhwc and not nchw:
            arr = arr.transpose(0, 3, 1, 2)
        elif not nchw:
            raise ArtifactError(
                f"{path} array {key!r} has shape {arr.shape}; expected 1 or 3 channels on axis 1 (NCHW) "
                "or axis 3 (NHWC)"
            )
    else:
        raise ArtifactError(f"{path} array {key!r} has shape {arr.shape}; expected NHW, NCHW or NHWC images")
    if arr.shape[0] == 0:
        raise ArtifactError(f"{path} array {key!r} holds no images (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return _u8_to_images(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ArtifactError(f"{path} array {key!r} has dtype {arr.dtype}; expected uint8 (0-255) or float in [0, 1]")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise ArtifactError(f"{path} array {key!r} holds NaN or infinite values; expected floats in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ArtifactError(
            f"{path} array {key!r} has values in [{lo:.4g}, {hi:.4g}]; expected floats in [0, 1] "
            "(store 0-255 images as uint8)"
        )
    return x


def load_npz(path: Path | str, *, x_key: str = "x", y_key: str | None = "y") -> ImageSet:
    """Load images (and labels) from a ``.npz`` archive, never unpickling anything.

    Image arrays may be NHW (grey-scale), NCHW or NHWC (the layout is the one with 1 or 3 channels
    on axis 1, else axis 3; NCHW wins when both fit), uint8 (scaled by 1/255) or float in [0, 1].

    Args:
        path: the ``.npz`` file.
        x_key: name of the image array.
        y_key: name of the integer label array, or ``None`` for an unlabelled pool.

    Returns:
        The images as float32 NCHW in [0, 1], with int64 labels when ``y_key`` is given.

    Raises:
        ArtifactError: the file is missing or not an ``.npz`` archive, a key is missing (the message
            lists the available ones), an array is an object (pickled) array, or an array has an
            unexpected shape, dtype or range.
    """
    path = Path(path)
    _require_exists(path, "npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"cannot read {path} as an .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ArtifactError(f"{path} is a single .npy array, expected an .npz archive with an {x_key!r} array")
    with archive:

        def get(key: str) -> npt.NDArray[Any]:
            if key not in archive.files:
                raise ArtifactError(
                    f"{path} has no array {key!r}; available keys: {', '.join(archive.files) or '(none)'}"
                )
            try:
                return archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ArtifactError(
                    f"cannot load array {key!r} from {path} (object/pickled arrays are refused): {exc}"
                ) from exc

        x = _npz_images(get(x_key), x_key, path)
        y: Tensor | None = None
        if y_key is not None:
            raw = get(y_key)
            if not np.issubdtype(raw.dtype, np.integer) or raw.shape != (x.shape[0],):
                raise ArtifactError(
                    f"{path} array {y_key!r} is {raw.dtype} of shape {raw.shape}; expected integer labels "
                    f"of shape ({x.shape[0]},)"
                )
            if raw.size and int(raw.min()) < 0:
                raise ArtifactError(f"{path} array {y_key!r} has negative label {int(raw.min())}")
            y = torch.from_numpy(raw.astype(np.int64))
    return ImageSet(x, y, None, f"npz-{path.stem}")


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
        _require_exists(path, f"dataset {name!r} path")
    params = inspect.signature(info.load).parameters
    accepted = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted) or '(none)'}"
        )
    return info.load(path, **kw)
