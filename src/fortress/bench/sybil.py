"""A Sybil attacker against ``fortress serve``: many API keys made through the admin API, one budget.

:class:`SybilOracle` is an :class:`~fortress.oracle.Oracle` like any other, so every attack runs
unchanged on top of it. It creates ``keys`` keys with ``POST /v1/admin/keys`` and sends each batch
from one of them: in turn (``round-robin``: one batch per key, then the next key) or one key after
the other (``bursts``: a key sends until it has spent ``per_key`` queries). After the attack,
:meth:`SybilOracle.flags` reads each key's verdict from ``GET /v1/admin/keys/{id}/profile``: which
keys the server flagged, and at which of the attacker's queries.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from fortress.errors import ConfigError
from fortress.oracle import HttpOracle, Oracle

__all__ = ["SybilOracle"]


class SybilOracle(Oracle):
    """Queries spread over ``keys`` fresh API keys of one server (module docstring).

    Args:
        url: the server's base URL.
        admin_key: an admin key of that server (creates the keys, reads their verdicts).
        keys: keys to create.
        budget: the attacker's whole query budget (each key gets ``ceil(budget / keys)``).
        mode: ``"round-robin"`` or ``"bursts"``.
        name: label prefix of the created keys.
        client: an ``httpx.Client`` to send through (tests pass Starlette's ``TestClient``).

    Raises:
        ConfigError: bad settings, or the server refuses to create keys.
    """

    def __init__(
        self,
        url: str,
        admin_key: str,
        *,
        keys: int,
        budget: int,
        mode: Literal["round-robin", "bursts"] = "round-robin",
        name: str = "sybil",
        client: Any | None = None,
    ) -> None:
        if keys < 1 or budget < 1 or mode not in ("round-robin", "bursts"):
            raise ConfigError(f"need keys >= 1, budget >= 1, mode round-robin|bursts; got {keys}, {budget}, {mode!r}")
        import httpx

        self.url = url.rstrip("/")
        self._admin = {"X-API-Key": admin_key}
        self._http: Any = client if client is not None else httpx.Client(base_url=self.url, timeout=60.0)
        self.per_key = math.ceil(budget / keys)
        self.mode = mode
        self.key_ids: list[str] = []
        self.oracles: list[HttpOracle] = []
        for i in range(keys):
            r = self._http.post(
                "/v1/admin/keys", json={"name": f"{name}-{i}", "budget": self.per_key}, headers=self._admin
            )
            if r.status_code != 200:
                raise ConfigError(f"the server refused to create key {i} ({r.status_code}): {r.text[:200]}")
            made = r.json()
            self.key_ids.append(str(made["key_id"]))
            self.oracles.append(HttpOracle(self.url, str(made["secret"]), client=client))
        first = self.oracles[0]
        super().__init__(budget=budget, output_mode=first.output_mode, top_k=first.top_k)
        self._turn = 0
        #: per key, the attacker's query indices (1-based) it sent: ``(first, last)`` per batch
        self.sent: list[list[tuple[int, int]]] = [[] for _ in range(keys)]

    @property
    def num_classes(self) -> int:
        return self.oracles[0].num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.oracles[0].input_shape

    def _next_key(self) -> int:
        if self.mode == "bursts":
            for i, o in enumerate(self.oracles):
                if o.queries_used < self.per_key:
                    return i
            return len(self.oracles) - 1
        for _ in range(len(self.oracles)):
            i = self._turn % len(self.oracles)
            self._turn += 1
            if self.oracles[i].queries_used < self.per_key:
                return i
        return 0

    def query(self, x: Tensor) -> Tensor:
        n = int(x.shape[0])
        self._charge_or_refuse(n)
        parts: list[Tensor] = []
        done = 0
        while done < n:
            i = self._next_key()
            room = max(1, self.per_key - self.oracles[i].queries_used)
            chunk = x[done : done + room]
            start = self.log.queries + done + 1
            parts.append(self.oracles[i].query(chunk))
            self.sent[i].append((start, start + int(chunk.shape[0]) - 1))
            done += int(chunk.shape[0])
        self.log.queries += n
        self.log.batches += 1
        return torch.cat(parts)

    def flags(self) -> list[dict[str, Any]]:
        """Per key: its id, queries, and the server's verdict (flagged, and at which attacker query)."""
        out = []
        for i, key_id in enumerate(self.key_ids):
            r = self._http.get(f"/v1/admin/keys/{key_id}/profile", headers=self._admin)
            verdict = r.json().get("verdict") if r.status_code == 200 else None
            at = None if verdict is None else verdict.get("flagged_at")
            attacker_at = at if not self.sent[i] else None  # a key used on its own: its queries are the attacker's
            if at is not None and self.sent[i]:  # the key's own query index → the attacker's
                seen = 0
                for first, last in self.sent[i]:
                    if seen + (last - first + 1) >= at:
                        attacker_at = first + (at - seen) - 1
                        break
                    seen += last - first + 1
            out.append(
                {
                    "key_id": key_id,
                    "queries": self.oracles[i].queries_used,
                    "flagged": bool(verdict and verdict.get("flagged")),
                    "flagged_at_key_query": at,
                    "flagged_at_attacker_query": attacker_at,
                }
            )
        return out
