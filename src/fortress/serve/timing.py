"""Padded compute: DNF answers dynamically, yet no response leaves before the full path would have.

``compute="dynamic"`` really skips the stages an early-exiting query no longer needs (paper §4.2,
Alg. 2), so a client that times single-image requests learns which exit answered. ``compute="full"``
hides that by running every stage for every query — paying for the skipped work in CPU.
``compute="padded"`` sits between the two: the work is dynamic (the skipped stages stay skipped, the
core is free for other requests), but each response is held back until it has taken at least the
full path's time for a batch of its size. That time is learnt from the server's own full-path
runs: the first requests of each batch-size bucket, and then one in every ``sample_every``, are
answered by the full path (same answers) and timed; the padding target of a bucket is a high
quantile of its recent full-path times.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque

import numpy as np
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import ConfigError

__all__ = ["FullPathClock", "PaddedCompute"]


class FullPathClock:
    """Running high quantile of full-path response times, per power-of-two batch-size bucket.

    Args:
        quantile: the padding target's quantile of the recent full-path times (in ``(0, 1]``).
        window: full-path times kept per bucket (the oldest drop out, so the target follows load).
        min_samples: a bucket's first requests that are answered by the full path (calibration).
        sample_every: after that, one request in this many is answered by the full path.

    Example:
        >>> clock = FullPathClock(quantile=1.0)
        >>> clock.observe(1, 0.004)
        >>> clock.target(1)
        0.004
    """

    def __init__(
        self, *, quantile: float = 0.99, window: int = 256, min_samples: int = 8, sample_every: int = 16
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ConfigError(f"quantile must be in (0, 1], got {quantile}")
        for label, value in (("window", window), ("min_samples", min_samples), ("sample_every", sample_every)):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        self.quantile = quantile
        self.window = window
        self.min_samples = min_samples
        self.sample_every = sample_every
        self._times: dict[int, deque[float]] = {}
        self._targets: dict[int, float] = {}
        self._seen: dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket(n: int) -> int:
        """The bucket of a batch of ``n`` images: the smallest power of two ``>= n``."""
        if n < 1:
            raise ConfigError(f"batch size must be >= 1, got {n}")
        return 1 << (n - 1).bit_length()

    def wants_full(self, n: int) -> bool:
        """Whether this batch of ``n`` should run the full path (and be timed); counts the request."""
        b = self.bucket(n)
        with self._lock:
            seen = self._seen.get(b, 0)
            self._seen[b] = seen + 1
            samples = len(self._times.get(b, ()))
        return samples < self.min_samples or seen % self.sample_every == 0

    def observe(self, n: int, seconds: float) -> None:
        """Record the full path's time for a batch of ``n`` images."""
        b = self.bucket(n)
        with self._lock:
            times = self._times.setdefault(b, deque(maxlen=self.window))
            times.append(float(seconds))
            self._targets[b] = float(np.quantile(np.fromiter(times, dtype=np.float64), self.quantile))

    def target(self, n: int) -> float | None:
        """The padding target (seconds) for a batch of ``n`` images; ``None`` before any full-path time."""
        with self._lock:
            return self._targets.get(self.bucket(n))

    def wait_s(self, n: int, elapsed: float) -> float:
        """Seconds still to wait so that a batch of ``n`` answered in ``elapsed`` s reaches the target."""
        target = self.target(n)
        return 0.0 if target is None else max(0.0, target - elapsed)


class PaddedCompute:
    """Answer with the defense's dynamic path, timing the full path now and then to pad against.

    Args:
        defense: a DNF whose ``compute`` is ``"dynamic"`` (the view that runs the full path is a shallow
            copy sharing its weights).
        clock: the full-path timings and padding targets (default: :class:`FullPathClock` defaults).

    Example:
        >>> padded = PaddedCompute(dnf)
        >>> t0 = time.perf_counter(); out = padded.respond(x)
        >>> padded.pad(len(x), time.perf_counter() - t0)  # on a thread that holds no inference slot
    """

    def __init__(self, defense: Defense, clock: FullPathClock | None = None) -> None:
        if getattr(defense, "compute", None) != "dynamic":
            raise ConfigError(
                f"padded compute needs a defense with compute='dynamic', got {getattr(defense, 'compute', None)!r}"
            )
        self.defense = defense
        self.full = copy.copy(defense)
        self.full.compute = "full"  # type: ignore[attr-defined]
        self.clock = clock or FullPathClock()

    def respond(self, x: Tensor) -> DefenseOutput:
        """Answer ``x`` (``(B, C, H, W)`` in [0, 1]); a sampled batch runs, and times, the full path."""
        n = int(x.shape[0])
        if not self.clock.wants_full(n):
            return self.defense.respond(x)
        t0 = time.perf_counter()
        out = self.full.respond(x)
        self.clock.observe(n, time.perf_counter() - t0)
        return out

    def pad(self, n: int, elapsed: float) -> None:
        """Block until a batch of ``n`` answered in ``elapsed`` s has taken the padding target.

        Runs on a thread of its own (not an inference slot): ``time.sleep`` is precise to tens of
        microseconds, whereas an event-loop timer rounds its wait up to whole milliseconds, and that
        rounding would leave the compute time modulo 1 ms visible in the response time.
        """
        wait = self.clock.wait_s(n, elapsed)
        if wait > 0:
            time.sleep(wait)
