"""CIFAR-10/100 "python version" batches, read with a restricted unpickler.

The official files are pickles. They are never read with :func:`pickle.load`: the unpickler below
only rebuilds plain numpy arrays and refuses every other global with an
:class:`~fortress.errors.ArtifactError`, so a malicious file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from fortress.data._common import check_labels, require_exists, u8_to_images
from fortress.data.base import ImageSet
from fortress.errors import ArtifactError, ConfigError

__all__ = ["cifar_files", "load_cifar"]

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
    require_exists(root, "CIFAR folder")
    if (root / folder).is_dir():
        return root / folder
    if (root / probe).is_file():
        return root
    raise ArtifactError(f"{root} holds neither {folder}/ nor {probe}; expected the extracted CIFAR python archive")


def cifar_files(root: Path | str, variant: Literal["cifar10", "cifar100"] = "cifar10") -> tuple[Path, ...]:
    """Every file :func:`load_cifar` reads for both splits of ``variant`` (meta file first).

    Raises:
        ConfigError: an unknown ``variant``.
        ArtifactError: the folder or a file does not exist.
    """
    root = Path(root)
    if variant == "cifar10":
        folder = _cifar_dir(root, "cifar-10-batches-py", "batches.meta")
        names = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    elif variant == "cifar100":
        folder = _cifar_dir(root, "cifar-100-python", "meta")
        names = ["meta", "train", "test"]
    else:
        raise ConfigError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    for name in names:
        if not (folder / name).is_file():
            raise ArtifactError(f"CIFAR file {folder / name} does not exist")
    return tuple(folder / name for name in names)


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
        check_labels(y, len(classes), folder / name)
        xs.append(x)
        ys.append(y)
    images = np.concatenate(xs)
    if images.shape[0] == 0:
        raise ArtifactError(f"{folder} {split} batches hold no images")
    return ImageSet(u8_to_images(images), torch.from_numpy(np.concatenate(ys)), classes, f"{variant}-{split}")
