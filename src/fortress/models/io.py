"""Saving and loading weights as safetensors plus a JSON config — never pickle.

A saved model is a directory with ``model.safetensors`` (the state dict) and ``model.json``
(architecture name, its parameters, shapes, for a network staged by module names its ``staging``
and, when known, the ``data`` it was trained on: its data spec, classes and content hash,
:class:`~fortress.data.spec.DataCard`). Loading rebuilds the architecture from the registry, an
entry point of the ``fortress.models`` group or the factory ``package.module:function`` the name
records (:func:`fortress.models.user.build_model`), then checks every tensor name and shape before copying, so a
truncated, corrupt or mismatched file is reported as an :class:`~fortress.errors.ArtifactError`
naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from fortress.data.spec import DataCard
from fortress.errors import ArtifactError, ConfigError, ModelFactoryError
from fortress.models.staged import StagedBackbone

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_safetensors",
    "load_model",
    "load_state",
    "read_json",
    "save_model",
    "save_state",
    "saved_data_card",
]

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
FORMAT_VERSION = 1


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; skipped where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, the file is
    renamed over ``path`` and the folder is fsync'ed: a crash or power cut leaves either the old
    file or the whole new one, never an empty or partial file behind a valid name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_safetensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``tensors`` as safetensors bytes that depend only on the tensors and the metadata.

    safetensors writes its JSON header from a hash map, so the order of the metadata entries (and
    with it the file's bytes) can change from one call to the next. The header is rewritten with
    sorted keys, padded with spaces to its original length (as the format allows), so equal
    tensors and metadata always give byte-identical files and file hashes can be compared.

    Args:
        tensors: contiguous CPU tensors by name.
        metadata: string-to-string metadata stored in the header.
    """
    raw: bytes = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    n = int(struct.unpack("<Q", raw[:8])[0])
    header = json.loads(raw[8 : 8 + n])
    canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(canon) > n:  # cannot happen for the same entries; keep the library's bytes if it does
        return raw
    return raw[:8] + canon + b" " * (n - len(canon)) + raw[8 + n :]


def save_state(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save named tensors to a safetensors file atomically and durably (contiguous CPU copies).

    Equal tensors and metadata give byte-identical files (:func:`canonical_safetensors`); the file
    is fsync'ed before the rename and its folder after it (:func:`atomic_write_bytes`).

    Raises:
        ArtifactError: a floating-point tensor holds NaN or infinite values (nothing is written).
    """
    path = Path(path)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ArtifactError(f"refusing to save non-finite tensors {bad[:5]} to {path}")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, canonical_safetensors(clean, metadata))


def load_state(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, turning missing or corrupt files into :class:`ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"corrupt or unreadable safetensors file {path}: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning missing or corrupt files into :class:`ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ArtifactError(f"corrupt JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def copy_state_checked(module: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Copy ``state`` into ``module`` after checking names and shapes match exactly."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not match the architecture: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ArtifactError(f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all()):
            raise ArtifactError(f"{source}: tensor {k!r} contains NaN or infinite values")
    module.load_state_dict(dict(state), strict=True)


def save_model(model: StagedBackbone, directory: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Save a staged backbone to ``directory`` (``model.safetensors`` + ``model.json``).

    Args:
        model: the network; built-ins are rebuilt from ``model.arch``/``model.arch_params`` on load.
        directory: created if needed.
        extra: JSON-serialisable metadata stored in ``model.json`` (e.g. training metrics).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(model.state_dict(), directory / WEIGHTS, metadata={"format": "fortress", "arch": model.arch})
    cfg = {
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "arch_params": model.arch_params,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "extra": dict(extra or {}),
    }
    if model.data_card is not None:
        cfg["data"] = model.data_card.to_dict()
    if model.staging is not None:
        cfg["staging"] = dict(model.staging)
    atomic_write_text(directory / CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    return directory


def load_model(directory: Path, factory: Callable[..., StagedBackbone] | None = None) -> StagedBackbone:
    """Load a model saved by :func:`save_model`.

    Args:
        directory: the saved model directory.
        factory: builds the architecture from the saved ``arch_params`` (overrides what
            ``model.json`` names); otherwise the saved ``arch`` is rebuilt: a registry name, an
            entry point of the ``fortress.models`` group or a factory path ``package.module:function``.

    Raises:
        ArtifactError: missing/corrupt files or weights that do not fit the architecture.
        UnknownComponent: the saved architecture is not registered and no factory was given.
        ModelFactoryError: the saved factory or entry point cannot be imported or rebuilt here.
    """
    from fortress.models import MODELS, create_model
    from fortress.models.user import Staging, build_model

    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"model directory not found: {directory}")
    cfg = read_json(directory / CONFIG)
    try:
        arch = str(cfg["arch"])
        params = dict(cfg.get("arch_params", {}))
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory / CONFIG} lacks the 'arch' entry") from exc
    if factory is not None:
        model = factory(**params)
    elif arch in MODELS:
        model = create_model(arch, **params)
    else:
        try:
            shape = [int(d) for d in cfg["input_shape"]]
            classes = int(cfg["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{directory / CONFIG} lacks a valid 'input_shape' or 'num_classes'") from exc
        staged = cfg.get("staging")
        staging = Staging.from_dict(staged) if isinstance(staged, dict) else None
        try:
            model = build_model(arch, params, input_shape=shape, num_classes=classes, staging=staging)
        except ModelFactoryError as exc:
            raise ModelFactoryError(f"{directory / CONFIG}: {exc}") from None
    copy_state_checked(model, load_state(directory / WEIGHTS), directory / WEIGHTS)
    model.data_card = saved_data_card(cfg, directory / CONFIG)
    model.eval()
    return model


def saved_data_card(cfg: Mapping[str, Any], source: Path) -> DataCard | None:
    """The ``data`` entry of a ``model.json`` (``None`` for a model saved without one).

    Raises:
        ArtifactError: the entry is malformed.
    """
    if cfg.get("data") is None:
        return None
    try:
        return DataCard.from_dict(cfg["data"])
    except ConfigError as exc:
        raise ArtifactError(f"{source}: bad 'data' entry: {exc}") from None
