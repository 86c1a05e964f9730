"""Settings of the prediction server (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fortress.device import check_device
from fortress.errors import ConfigError
from fortress.monitor.base import Response

__all__ = ["Compute", "ServeSettings"]

Compute = Literal["dynamic", "full", "padded"]


@dataclass(frozen=True)
class ServeSettings:
    """Everything :func:`fortress.serve.create_app` needs.

    Args:
        model_dir: a saved defense or victim (``fortress protect`` / ``fortress train-victim``);
            only safetensors weights and JSON configs are read from it.
        keys_path: the SQLite key ledger; it must exist (``fortress keys init``).
        compute: DNF compute mode. ``"dynamic"`` skips the stages a query no longer needs (fastest;
            response time reveals how deep a query went); ``"full"`` runs every stage for every query
            (constant work per query, so timing does not reveal the exit taken; paper §4.2);
            ``"padded"`` skips work like ``dynamic`` but holds each answer until the full path's time
            for its batch size (:mod:`fortress.serve.timing`). Ignored by defenses without exits.
        model_name: the name ``/v1/info`` shows (default: the directory's name). Never the
            architecture or the defense: those are not the client's business.
        max_batch: images per request at most (413 above).
        max_body_bytes: request body size at most (413 above).
        buffered_bodies: request bodies of the maximum size the server holds at once (all requests
            together: ``buffered_bodies * max_body_bytes`` bytes); a request waits for room, and is
            answered 503 if none frees up within ``request_timeout_s``.
        request_timeout_s: longest wait for a batch's answer (queueing included; 503 after it, and
            nothing charged); reading a slow request body is capped by the same time (408).
        inference_workers: batches answered at once (each on its own thread).
        torch_threads: intra-op threads of each batch.
        device: where the model answers (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        profiles: keep per-key query profiles (exits, entropy, confidence) in the key ledger.
        monitor: extraction monitor (``fortress.monitor.MONITORS``: ``exit-sprt``, ``prada``) or ``None``.
        monitor_calibration: ``exit-sprt``'s calibration file (``fortress monitor calibrate``).
        monitor_response: what a flagged key gets: ``log``, ``alert``, ``throttle``, ``degrade-label``,
            ``degrade-exit0``, ``misinform`` or ``misinform-id`` (see :class:`fortress.monitor.Response`).
        monitor_webhook: URL the ``alert`` response POSTs to.
        throttle_s_per_query: the ``throttle`` response's delay per image.
        population_window_s: also test the drift of all keys created in each window of this many
            seconds (the Sybil case; needs a monitor with ``dadd``); ``None``: per-key monitoring only.
        population_min_queries: pooled queries of a window before it is tested.
        pad_quantile: ``padded`` compute: the padding target's quantile of recent full-path times.
        pad_window: ``padded`` compute: full-path times kept per batch-size bucket.

    Example:
        >>> ServeSettings(Path("dnf"), Path("keys.db"), compute="full").max_batch
        1024
    """

    model_dir: Path
    keys_path: Path
    compute: Compute = "dynamic"
    model_name: str | None = None
    max_batch: int = 1024
    max_body_bytes: int = 32 * 2**20
    buffered_bodies: int = 2
    request_timeout_s: float = 30.0
    inference_workers: int = 2
    torch_threads: int = 1
    device: str = "cpu"
    profiles: bool = True
    monitor: str | None = None
    monitor_calibration: Path | None = None
    monitor_response: str = "log"
    monitor_webhook: str | None = None
    throttle_s_per_query: float = 0.01
    population_window_s: float | None = None
    population_min_queries: int = 500
    pad_quantile: float = 0.99
    pad_window: int = 256

    def __post_init__(self) -> None:
        if self.compute not in ("dynamic", "full", "padded"):
            raise ConfigError(f"compute must be 'dynamic', 'full' or 'padded', got {self.compute!r}")
        for label, value in (
            ("max_batch", self.max_batch),
            ("max_body_bytes", self.max_body_bytes),
            ("buffered_bodies", self.buffered_bodies),
            ("inference_workers", self.inference_workers),
            ("torch_threads", self.torch_threads),
            ("pad_window", self.pad_window),
        ):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        check_device(self.device)
        if self.monitor_response not in {r.value for r in Response}:
            valid = ", ".join(r.value for r in Response)
            raise ConfigError(f"unknown monitor response {self.monitor_response!r}; valid: {valid}")
        if self.monitor is not None and not self.profiles:
            raise ConfigError("a monitor needs profiles=True (it keeps its state beside the key profiles)")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not 0.0 < self.pad_quantile <= 1.0:
            raise ConfigError(f"pad_quantile must be in (0, 1], got {self.pad_quantile}")
        if self.population_window_s is not None and (
            not self.population_window_s > 0 or self.monitor is None or "dadd" not in self.monitor.split("+")
        ):
            raise ConfigError(
                f"population_window_s must be > 0 and needs a monitor with dadd, got {self.population_window_s} "
                f"with monitor {self.monitor!r}"
            )
        if self.population_min_queries < 2:
            raise ConfigError(f"population_min_queries must be >= 2, got {self.population_min_queries}")
        if not self.throttle_s_per_query >= 0:
            raise ConfigError(f"throttle_s_per_query must be >= 0, got {self.throttle_s_per_query}")

    @property
    def display_name(self) -> str:
        """The model name clients see."""
        return self.model_name or Path(self.model_dir).resolve().name
