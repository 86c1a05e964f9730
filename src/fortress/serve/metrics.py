"""Prometheus-style metrics of the prediction server, in the text exposition format (version 0.0.4).

Counters and one latency histogram, kept in memory per process behind a lock. Keys appear by
their public ``key_id`` only. The per-key exit histogram is what an operator watches for DNF: a
key whose queries mostly leave at the first exit is sending out-of-distribution data (paper §4).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: Upper bounds (seconds) of the request-latency histogram.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**kv: str) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())
    return "{" + body + "}" if body else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """In-memory counters rendered for a Prometheus scrape.

    Example:
        >>> m = Metrics()
        >>> m.observe_request("/v1/predict", 200, 0.004)
        >>> 'fortress_requests_total{route="/v1/predict",status="200"} 1' in m.render()
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._lat_counts: dict[str, list[int]] = {}
        self._lat_sum: dict[str, float] = defaultdict(float)
        self._queries: dict[str, int] = defaultdict(int)
        self._refused: dict[tuple[str, str], int] = defaultdict(int)
        self._exits: dict[tuple[str, str], int] = defaultdict(int)
        self._inference_s: float = 0.0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self._requests[(route, str(status))] += 1
            counts = self._lat_counts.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._lat_sum[route] += seconds

    def observe_queries(self, key_id: str, n: int, exit_counts: Sequence[int] | None, inference_s: float) -> None:
        """Count ``n`` answered queries of ``key_id`` and the exits they took."""
        with self._lock:
            self._queries[key_id] += n
            self._inference_s += inference_s
            for i, c in enumerate(exit_counts or ()):
                if c:
                    self._exits[(key_id, str(i))] += int(c)

    def observe_refusal(self, key_id: str, reason: str) -> None:
        """Count a refused batch (``budget``, ``timeout``, ``invalid``...)."""
        with self._lock:
            self._refused[(key_id, reason)] += 1

    def queries(self, key_id: str) -> int:
        """Queries answered for ``key_id`` by this process."""
        with self._lock:
            return self._queries.get(key_id, 0)

    def render(self) -> str:
        """The exposition text."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP fortress_requests_total HTTP requests by route and status.",
                "# TYPE fortress_requests_total counter",
            ]
            out += [
                f"fortress_requests_total{_labels(route=r, status=s)} {v}"
                for (r, s), v in sorted(self._requests.items())
            ]
            out += [
                "# HELP fortress_request_latency_seconds Request latency.",
                "# TYPE fortress_request_latency_seconds histogram",
            ]
            for route, counts in sorted(self._lat_counts.items()):
                cum = 0
                for le, c in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                    cum += c
                    out.append(f"fortress_request_latency_seconds_bucket{_labels(route=route, le=le)} {cum}")
                out.append(f"fortress_request_latency_seconds_sum{_labels(route=route)} {self._lat_sum[route]:.6f}")
                out.append(f"fortress_request_latency_seconds_count{_labels(route=route)} {cum}")
            out += [
                "# HELP fortress_queries_total Images answered (queries charged) by key.",
                "# TYPE fortress_queries_total counter",
            ]
            out += [f"fortress_queries_total{_labels(key=k)} {v}" for k, v in sorted(self._queries.items())]
            out += [
                "# HELP fortress_refused_total Batches refused by key and reason.",
                "# TYPE fortress_refused_total counter",
            ]
            out += [
                f"fortress_refused_total{_labels(key=k, reason=r)} {v}" for (k, r), v in sorted(self._refused.items())
            ]
            out += [
                "# HELP fortress_exits_total Queries by key and the DNF exit they took.",
                "# TYPE fortress_exits_total counter",
            ]
            out += [f"fortress_exits_total{_labels(key=k, exit=e)} {v}" for (k, e), v in sorted(self._exits.items())]
            out += [
                "# HELP fortress_inference_seconds_total Time spent inside the defense.",
                "# TYPE fortress_inference_seconds_total counter",
                f"fortress_inference_seconds_total {self._inference_s:.6f}",
            ]
        return "\n".join(out) + "\n"
