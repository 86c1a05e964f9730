"""Oracles: the single choke point between an attacker and a defended model.

An oracle counts every input row as one query, refuses *before running* a batch that would pass
its hard budget (nothing is charged for a refused batch), converts answers to its output mode and
keeps a query log (count, batches, time, exit histogram, ℓ1 added). Attacks only ever see an
oracle, so the same attack runs against a local defense or (through ``HttpOracle``) a server.
"""

from __future__ import annotations

import base64
import io
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import BudgetExceeded, ConfigError, InvalidInput, OracleUnavailable
from fortress.tensors import check_images, to_positive_probs

__all__ = ["HttpOracle", "LocalOracle", "Oracle", "OracleUnavailable", "OutputMode", "QueryLog", "apply_output_mode"]


class OutputMode(str, Enum):
    """What an oracle returns per query.

    ``soft``: the probability row (strictly positive, floored at ``tensors.PROB_EPS``);
    ``hard``: the top-1 label as a one-hot row; ``topk``: the ``k`` largest probabilities kept,
    renormalised, zeros elsewhere.
    """

    SOFT = "soft"
    HARD = "hard"
    TOPK = "topk"


def apply_output_mode(probs: Tensor, mode: OutputMode, top_k: int = 1) -> Tensor:
    """Turn probability rows into what ``mode`` reveals (see :class:`OutputMode`)."""
    if mode is OutputMode.SOFT:
        return to_positive_probs(probs)
    if mode is OutputMode.HARD:
        return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    vals, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
    out = torch.zeros_like(probs).scatter_(1, idx, vals)
    return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class QueryLog:
    """Running statistics of the queries an oracle answered.

    Attributes:
        queries: rows answered (equals the budget charged).
        batches: calls answered.
        refused: calls refused for the budget.
        time_s: wall time spent inside the defense.
        exit_counts: queries per exit (empty for defenses without exits).
        l1_sum: total ℓ1 distance the defense added (where it reports it).
        l1_count: queries with a reported ℓ1.
        top1_changed: queries whose top-1 the defense changed (where it reports it).
    """

    queries: int = 0
    batches: int = 0
    refused: int = 0
    time_s: float = 0.0
    exit_counts: list[int] = field(default_factory=list)
    l1_sum: float = 0.0
    l1_count: int = 0
    top1_changed: int = 0

    @property
    def exit_hist(self) -> list[float]:
        """Fraction of queries per exit (empty for defenses without exits)."""
        total = sum(self.exit_counts)
        return [c / total for c in self.exit_counts] if total else []

    @property
    def mean_l1(self) -> float | None:
        """Mean ℓ1 perturbation per query, if the defense reports it."""
        return self.l1_sum / self.l1_count if self.l1_count else None

    @property
    def s_per_1k(self) -> float | None:
        """Defense wall time per 1,000 queries."""
        return 1000.0 * self.time_s / self.queries if self.queries else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "queries": self.queries,
            "batches": self.batches,
            "refused": self.refused,
            "time_s": self.time_s,
            "exit_counts": list(self.exit_counts),
            "exit_hist": self.exit_hist,
            "mean_l1": self.mean_l1,
            "top1_changed": self.top1_changed,
            "s_per_1k": self.s_per_1k,
        }


class Oracle(ABC):
    """What an attack sees: ``query(x)`` plus the public facts of the API.

    Attributes:
        output_mode: what each query reveals.
        top_k: ``k`` for :attr:`OutputMode.TOPK`.
        budget: hard query budget (``None``: unlimited).
        log: the :class:`QueryLog`.
    """

    def __init__(self, *, budget: int | None, output_mode: OutputMode | str, top_k: int) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 or None, got {budget}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        try:
            self.output_mode = OutputMode(output_mode)
        except ValueError:
            valid = ", ".join(m.value for m in OutputMode)
            raise ConfigError(f"unknown output mode {output_mode!r}; valid modes: {valid}") from None
        self.top_k = top_k
        self.budget = budget
        self.log = QueryLog()

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Classes per answer row."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, int, int]:
        """Per-image input shape ``(C, H, W)``."""

    @property
    def queries_used(self) -> int:
        """Queries charged so far."""
        return self.log.queries

    @property
    def budget_left(self) -> int | None:
        """Queries left before the budget is reached (``None``: unlimited)."""
        return None if self.budget is None else self.budget - self.log.queries

    def _charge_or_refuse(self, n: int) -> None:
        if self.budget is not None and self.log.queries + n > self.budget:
            self.log.refused += 1
            raise BudgetExceeded(n, self.log.queries, self.budget)

    @abstractmethod
    def query(self, x: Tensor) -> Tensor:
        """Answer images ``x`` ``(B, C, H, W)`` with ``(B, K)`` rows in the output mode.

        Raises:
            InvalidInput: ``x`` violates the tensor contract (nothing charged).
            BudgetExceeded: the batch would pass the budget (nothing charged).
        """


class LocalOracle(Oracle):
    """An oracle over an in-process :class:`~fortress.defenses.base.Defense`.

    Args:
        defense: the defended (or undefended) model.
        budget: hard query budget; ``None`` for unlimited.
        output_mode: ``soft``, ``hard`` or ``topk``.
        top_k: ``k`` for ``topk``.
        chunk_size: the defense sees at most this many rows at once (bounds memory).
        observer: called with each answered chunk's images and :class:`DefenseOutput` (monitoring).

    Example:
        >>> from fortress.defenses import Undefended
        >>> from fortress.models import create_model
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")), budget=10)
        >>> oracle.query(torch.rand(4, 1, 28, 28)).shape, oracle.budget_left
        (torch.Size([4, 10]), 6)
    """

    def __init__(
        self,
        defense: Defense,
        *,
        budget: int | None = None,
        output_mode: OutputMode | str = OutputMode.SOFT,
        top_k: int = 1,
        chunk_size: int = 8192,
        observer: Callable[[Tensor, DefenseOutput], None] | None = None,
    ) -> None:
        super().__init__(budget=budget, output_mode=output_mode, top_k=top_k)
        self.observer = observer
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.defense = defense
        self.chunk_size = chunk_size
        if defense.num_exits:
            self.log.exit_counts = [0] * defense.num_exits

    @property
    def num_classes(self) -> int:
        return self.defense.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.defense.input_shape

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        check_images(x, self.input_shape, name="query images")
        n = x.shape[0]
        self._charge_or_refuse(n)
        t0 = time.perf_counter()
        caller, where = x.device, self.defense.device  # queries go to the defense's device, answers come back
        x = x.to(where)
        outs = [self.defense.respond(x[i : i + self.chunk_size]) for i in range(0, n, self.chunk_size)]
        self.log.time_s += time.perf_counter() - t0
        if self.observer is not None:
            for i, o in zip(range(0, n, self.chunk_size), outs, strict=True):
                self.observer(x[i : i + self.chunk_size], o)
        probs = torch.cat([o.probs for o in outs])
        self.log.queries += n
        self.log.batches += 1
        if self.log.exit_counts and outs[0].exits is not None:
            ex = torch.cat([o.exits for o in outs if o.exits is not None])
            counts = torch.bincount(ex, minlength=len(self.log.exit_counts)).tolist()
            self.log.exit_counts = [a + b for a, b in zip(self.log.exit_counts, counts, strict=True)]
        if outs[0].l1 is not None:
            self.log.l1_sum += float(sum(float(o.l1.sum()) for o in outs if o.l1 is not None))
            self.log.l1_count += n
        if outs[0].top1_changed is not None:
            self.log.top1_changed += int(sum(int(o.top1_changed.sum()) for o in outs if o.top1_changed is not None))
        return apply_output_mode(probs, self.output_mode, self.top_k).to(caller)


class HttpOracle(Oracle):
    """The client side of ``fortress serve``: the same contract as :class:`LocalOracle`, over HTTP.

    Images travel as base64 ``.npy`` (exact float32) and answers as JSON floats (exact for float32),
    so an attack sees the very tensors a :class:`LocalOracle` over the served defense would give it.
    The output mode, ``top_k``, input shape and class count come from the server (``GET /v1/info``,
    per API key). The server counts and caps queries per key; ``budget`` adds an optional cap on
    this client, checked first. A batch over the server's ``max_batch`` is sent in pieces, but only
    after checking that the whole batch fits the key's remaining budget, so the whole-batch
    refusal of the contract holds for a key used by one client at a time.

    Args:
        url: the server's base URL (``http://host:port``).
        api_key: the key ``fortress keys add`` printed.
        budget: client-side query cap (``None``: only the server's).
        timeout_s: per-request timeout.
        client: an ``httpx.Client`` to send through (tests pass Starlette's ``TestClient``); its
            ``base_url`` is used instead of ``url``.

    Raises:
        ConfigError: httpx is not installed, or the server rejects the key (401/403).
        OracleUnavailable: the server cannot be reached or fails.

    Example:
        >>> oracle = HttpOracle("http://127.0.0.1:8000", api_key)
        >>> oracle.query(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        budget: int | None = None,
        timeout_s: float = 60.0,
        client: Any | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError('HttpOracle needs httpx: pip install "fortress[serve]"') from None
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must start with http:// or https://, got {url!r}")
        if not api_key:
            raise ConfigError("HttpOracle needs an API key (fortress keys add NAME)")
        self.url = url.rstrip("/")
        self._owns_client = client is None
        self._http: Any = client if client is not None else httpx.Client(base_url=self.url, timeout=timeout_s)
        self._transport_errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)
        self._headers = {"X-API-Key": api_key}
        info = self._call("GET", "/v1/info", None, 0)
        super().__init__(budget=budget, output_mode=info["output_mode"], top_k=int(info["top_k"]))
        self._num_classes = int(info["num_classes"])
        c, h, w = (int(v) for v in info["input_shape"])
        self._input_shape = (c, h, w)
        self.max_batch = int(info["max_batch"])
        self.model_name = str(info["model"])
        self.server_budget: int | None = info["budget"]
        self.server_used = int(info["queries_used"])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._input_shape

    @property
    def budget_left(self) -> int | None:
        """Queries left: the tighter of this client's cap and the key's budget on the server."""
        lefts = [b for b in (super().budget_left, self._server_left()) if b is not None]
        return min(lefts) if lefts else None

    def _server_left(self) -> int | None:
        return None if self.server_budget is None else self.server_budget - self.server_used

    def close(self) -> None:
        """Close the HTTP connection pool (if this oracle opened it)."""
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def query(self, x: Tensor) -> Tensor:
        check_images(x, self.input_shape, name="query images")
        n = int(x.shape[0])
        self._charge_or_refuse(n)
        if n > self.max_batch and self.server_budget is not None and self.server_used + n > self.server_budget:
            self.log.refused += 1
            raise BudgetExceeded(n, self.server_used, self.server_budget)
        t0 = time.perf_counter()
        parts = [self._send(x[i : i + self.max_batch]) for i in range(0, n, self.max_batch)]
        self.log.time_s += time.perf_counter() - t0
        self.log.queries += n
        self.log.batches += 1
        return torch.cat(parts).to(x.device)  # answered on the caller's device

    def _send(self, x: Tensor) -> Tensor:
        buf = io.BytesIO()
        np.save(buf, x.detach().to("cpu", torch.float32).contiguous().numpy(), allow_pickle=False)
        body = {"npy": base64.b64encode(buf.getvalue()).decode("ascii")}
        out = self._call("POST", "/v1/predict", body, int(x.shape[0]))
        self.server_used = int(out["queries_used"])
        self.server_budget = out["budget"]
        if out["probabilities"] is None:  # hard labels: the one-hot rows a LocalOracle returns
            labels = torch.tensor(out["labels"], dtype=torch.long)
            return torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float32)
        return torch.tensor(out["probabilities"], dtype=torch.float32)

    def _call(self, method: str, path: str, body: dict[str, str] | None, n: int) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, json=body, headers=self._headers)
        except self._transport_errors as exc:
            raise OracleUnavailable(f"oracle server {self.url} did not answer {method} {path}: {exc}") from None
        try:
            data: dict[str, Any] = resp.json()
        except ValueError:
            data = {"message": resp.text[:200]}
        status = int(resp.status_code)
        if status < 300:
            return data
        msg = str(data.get("message", data))
        if status == 429:
            self.log.refused += 1
            raise BudgetExceeded(int(data.get("requested", n)), int(data.get("used", 0)), int(data.get("budget", 0)))
        if status in (401, 403):
            raise ConfigError(f"oracle server {self.url} rejected the API key ({status}): {msg}")
        if status in (413, 415, 422):
            raise InvalidInput(f"oracle server {self.url} refused the batch ({status}): {msg}")
        raise OracleUnavailable(f"oracle server {self.url} answered {method} {path} with {status}: {msg}")
