"""Where the computation runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (DESIGN §3, Devices).

Every verb that computes takes a device spec, resolves it once with :func:`resolve_device` before
any work (an unknown or unavailable device is a one-line :class:`~fortress.errors.ConfigError`),
and records :func:`device_facts` with its results. Models, defenses, attacks and training keep
their tensors on that device; random draws still come from CPU ``torch.Generator`` objects and
are moved, so a seeded run draws the same numbers on every device, and on the CPU every move is a
no-op (CPU figures are unchanged by the device option).

``--amp`` turns on bf16 autocast for training steps on a GPU (:func:`autocast`); it is off by
default, recorded with results, and a no-op on the CPU.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fortress.errors import ConfigError

__all__ = [
    "DEVICE_CHOICES",
    "autocast",
    "check_device",
    "device_facts",
    "device_of",
    "resolve_device",
]

#: What a device option accepts (``cuda:N`` picks GPU ``N``).
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"

_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_device(spec: str | torch.device | None) -> str:
    """Check that ``spec`` names a device kind fortress knows, without touching hardware.

    Returns:
        The spec as text (``None`` reads as ``"cpu"``).

    Raises:
        ConfigError: ``spec`` is not one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Example:
        >>> check_device("cuda:1")
        'cuda:1'
    """
    text = "cpu" if spec is None else str(spec).strip().lower()
    if not _SPEC.match(text):
        raise ConfigError(f"unknown device {str(spec)!r}; valid: {DEVICE_CHOICES}")
    return text


def resolve_device(spec: str | torch.device | None = "cpu") -> torch.device:
    """The :class:`torch.device` a spec names, checked to exist on this machine.

    ``auto`` picks the first CUDA GPU, else Apple's ``mps``, else the CPU.

    Args:
        spec: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (``None``: ``cpu``).

    Raises:
        ConfigError: an unknown spec, or a device this machine does not have (the message says
            which check failed, e.g. ``torch.cuda.is_available()``).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    text = check_device(spec)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError("mps requested but torch.backends.mps.is_available() is False")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"{text} requested but torch.cuda.is_available() is False")
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{text} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module with neither)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """A human name for ``device``: the GPU's marketing name, or the CPU's architecture."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return f"cpu ({platform.machine()})"


def device_facts(device: torch.device | str | None = None, *, amp: bool = False) -> dict[str, Any]:
    """What a result records about where it ran: ``device``, ``device_name``, ``torch_version``, ``amp``.

    Example:
        >>> device_facts("cpu")["device"]
        'cpu'
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    return {"device": str(dev), "device_name": device_name(dev), "torch_version": torch.__version__, "amp": bool(amp)}


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast for a training step on a GPU when ``enabled``; nothing otherwise (the CPU stays float32)."""
    if enabled and device.type in ("cuda", "mps"):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
