"""Loaders for data sets users bring.

Every loader returns an :class:`~fortress.data.base.ImageSet` that honours the tensor contract
(float32 NCHW in [0, 1], int64 labels). Files are parsed defensively: a missing, truncated or
malformed file raises :class:`~fortress.errors.ArtifactError` naming the file and what was expected.

Supported formats:

* MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), plain or gzipped: :func:`load_mnist_idx`;
* the official CIFAR-10 / CIFAR-100 "python version" batches: :func:`load_cifar`. These are pickles;
  they are read with a restricted unpickler that only rebuilds numpy arrays, never arbitrary code;
* ``root/<class>/<image>`` folder trees: :func:`load_image_folder`;
* ``.npz`` archives of arrays (never pickled content): :func:`load_npz`.

CIFAR batches live in :mod:`fortress.data.cifar`; the ``dataset`` registry (:data:`DATASETS`,
:func:`load_dataset`), which names these loaders, in :mod:`fortress.data.registry`; all are
re-exported by :mod:`fortress.data`.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fortress.data._common import DIGIT_NAMES, IMAGE_EXTENSIONS, check_labels, require_exists, u8_to_images
from fortress.data.base import ImageSet
from fortress.data.images import DEFAULT_IMAGE_LIMITS, ImageLimits, decode_image, resize_bilinear
from fortress.errors import ArtifactError, ConfigError, InvalidInput
from fortress.tensors import check_labels as check_label_tensor

__all__ = ["IDX_STEMS", "idx_files", "load_image_folder", "load_mnist_idx", "load_npz"]

# --------------------------------------------------------------------------------------------- IDX

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
#: The four standard MNIST-format files (each may also be gzipped, or spelled ``-images.idx3-ubyte``).
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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


def idx_files(root: Path | str) -> tuple[Path, ...]:
    """The four IDX files under ``root`` (:data:`IDX_STEMS`, plain or gzipped), in that order.

    Raises:
        ArtifactError: ``root`` or one of the files does not exist (the message names it).
    """
    root = Path(root)
    require_exists(root, "MNIST IDX folder")
    return tuple(_find_idx_file(root, stem) for stem in IDX_STEMS)


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


def load_mnist_idx(
    root: Path | str,
    split: Literal["train", "test"] = "train",
    *,
    classes: Sequence[str] = DIGIT_NAMES,
    name: str = "mnist-idx",
) -> ImageSet:
    """Load MNIST-format IDX files (MNIST, Fashion-MNIST, ...) from ``root``.

    Args:
        root: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        split: ``"train"`` or ``"test"`` (the ``t10k`` files).
        classes: the class names, label ``i`` is ``classes[i]`` (default ``"0"`` .. ``"9"``).
        name: the set's name; the split is appended (``mnist-idx-train``).

    Returns:
        ``(N, 1, H, W)`` images in [0, 1] with int64 labels and the class names.

    Raises:
        ConfigError: ``split`` is not ``"train"`` or ``"test"``.
        ArtifactError: a file is missing, truncated, has the wrong magic number, or the image and
            label counts differ; the message names the file.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    require_exists(root, "MNIST IDX folder")
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
    check_labels(y, len(classes), labels_path)
    x = u8_to_images(images[:, None, :, :])
    return ImageSet(x, torch.from_numpy(y), tuple(classes), f"{name}-{split}")


# -------------------------------------------------------------------------------------- ImageFolder


def _decode_file(path: Path, channels: Literal[1, 3], size: int | None, limits: ImageLimits) -> npt.NDArray[np.float32]:
    """Decode one image file to float32 ``(C, H, W)`` with the shared decoder (resized if asked)."""
    try:
        arr = decode_image(path.read_bytes(), channels, name=f"image {path}", limits=limits)
    except OSError as exc:
        raise ArtifactError(f"cannot read image {path}: {exc}") from exc
    except InvalidInput as exc:  # refused mode, over a limit, unreadable: same message as the server's
        raise ArtifactError(str(exc)) from exc
    return arr if size is None else resize_bilinear(arr, size)


def load_image_folder(
    root: Path | str,
    *,
    size: int | None = None,
    channels: Literal[1, 3] = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
) -> ImageSet:
    """Load a ``root/<class>/<image>`` tree (the torchvision ``ImageFolder`` layout).

    Classes are the sub-folder names sorted alphabetically (label ``i`` is the ``i``-th name);
    images are found recursively in each class folder and decoded by
    :func:`fortress.data.images.decode_image` (the server's decoder: 16-bit images faithfully,
    transparency composited onto black, every Pillow mode by :data:`~fortress.data.images.MODE_TABLE`),
    to grey-scale (``channels=1``) or RGB. Hidden files and folders are skipped.

    Args:
        root: the tree's root folder.
        size: resize every image to ``size``×``size`` (bilinear); ``None`` keeps the decoded size,
            which must then be the same for every image.
        channels: 1 (grey-scale) or 3 (RGB).
        extensions: file suffixes to load (case-insensitive).
        limits: per-image pixel and decoded-byte limits, checked before each image is decoded.

    Returns:
        ``(N, channels, H, W)`` images in [0, 1], int64 labels, and the class names.

    Raises:
        ConfigError: a bad ``size`` or ``channels``.
        ArtifactError: no classes or images, a class folder without images, an undecodable or
            refused image or one over ``limits`` (named, with the mode or the limit), or images of
            different sizes without ``size``.
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if size is not None and size < 1:
        raise ConfigError(f"size must be a positive number of pixels or None, got {size!r}")
    require_exists(root, "image folder")
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
    out: npt.NDArray[np.float32] | None = None
    for i, (path, _) in enumerate(files):  # filled in place: peak memory is the set plus one image
        arr = _decode_file(path, channels, size, limits)
        if out is None:
            out = np.empty((len(files), *arr.shape), dtype=np.float32)
        elif arr.shape != out.shape[1:]:
            raise ArtifactError(
                f"images differ in size: {files[0][0]} is {out.shape[3]}x{out.shape[2]} but {path} is "
                f"{arr.shape[2]}x{arr.shape[1]}; pass size= to resize every image to the same square size"
            )
        out[i] = arr
    assert out is not None
    x = torch.from_numpy(out)
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
        return u8_to_images(arr)
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
    require_exists(path, "npz file")
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
            if not np.issubdtype(raw.dtype, np.integer):
                raise ArtifactError(
                    f"{path} array {y_key!r} has dtype {raw.dtype}; labels must have an integer dtype "
                    f"(class indices), shape ({x.shape[0]},)"
                )
            try:  # the label contract: (N,) or (N, 1) integers, non-negative
                y = check_label_tensor(torch.from_numpy(raw.astype(np.int64)), len(x), name=f"{path} array {y_key!r}")
            except InvalidInput as exc:
                raise ArtifactError(str(exc)) from None
    return ImageSet(x, y, None, f"npz-{path.stem}")
