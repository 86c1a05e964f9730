"""What a seeded result depends on besides its seeds: pinned before a run, recorded with its result.

The same seed gives bit-identical weights and figures in a fresh process only when the arithmetic
is the same: torch's intra-op thread count sets the order of float reductions (1 and 2 threads
changed 12 of 14 seeded procedures of ``tests/seeded_runs.py``), and the torch build, the CPU's
vector instructions and the deterministic-algorithms switch pick the kernels. Every seeded CLI verb
pins the thread count (``--threads``, default :data:`DEFAULT_THREADS` whatever the machine's cores),
and every result record carries :func:`runtime_facts` in its ``extra``.

Example:
    >>> pin_threads(1)
    >>> runtime_facts()["torch_threads"]
    1
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

from fortress.errors import ConfigError

__all__ = ["DEFAULT_THREADS", "pin_threads", "runtime_facts"]

#: Torch intra-op threads of every seeded CLI verb unless ``--threads`` says otherwise: a fixed
#: number, so the same command gives the same figures on machines with any number of cores.
DEFAULT_THREADS = 1


def pin_threads(threads: int) -> None:
    """Set torch's intra-op thread count (the order of float reductions depends on it).

    Raises:
        ConfigError: ``threads`` is below 1.
    """
    if threads < 1:
        raise ConfigError(f"torch threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def runtime_facts() -> dict[str, Any]:
    """The settings and versions a seeded result depends on, as JSON-ready data.

    Returns:
        ``torch_threads`` (intra-op), ``torch_deterministic`` (``torch.use_deterministic_algorithms``),
        ``torch_version``, ``cpu_capability`` (the vector instructions torch's CPU kernels use),
        ``machine``, ``python_version``, ``numpy_version``, ``fortress_version``, and where CUDA is
        present ``cuda_version`` and ``cudnn_deterministic``.
    """
    from fortress import __version__  # the package imports this module's users first

    facts: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
        "numpy_version": _version("numpy"),
        "fortress_version": __version__,
    }
    if torch.cuda.is_available():
        facts["cuda_version"] = torch.version.cuda
        facts["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
    return facts
