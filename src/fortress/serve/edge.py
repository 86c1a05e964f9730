"""The server's edge: request ids, the declared body size, access logs, request metrics.

A pure ASGI middleware (no per-request Starlette objects), outermost inside the app. It reads no
body: a declared ``Content-Length`` over ``max_body_bytes`` (or not a number) is answered before
any route runs, and the route reads the body itself only after authenticating the key and checking
its budget (:mod:`fortress.serve.body`). Request ids are bounded (a longer or unsafe
``X-Request-ID`` is replaced, never echoed) and every logged value is bounded. Anything a route
lets escape becomes a JSON 500 that carries the request id and no stack trace (the trace goes to
the server log).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fortress.serve.limits import MAX_HEADER_BYTES, MAX_REQUEST_ID_CHARS
from fortress.serve.metrics import Metrics

__all__ = ["ACCESS_LOGGER", "EdgeMiddleware", "Gate", "Refusal", "json_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: An answer given at the edge: status, error code, message, extra JSON fields, extra headers.
Refusal = tuple[int, str, str, dict[str, Any], list[tuple[bytes, bytes]]]
#: Checks a request from its method, path and headers before any route runs (``None``: let it through).
Gate = Callable[[Scope, dict[str, str]], Refusal | None]

#: Logger of the structured access log (one JSON object per request, at INFO).
ACCESS_LOGGER = "fortress.serve.access"
log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_CHARS}}}")
_LOGGED_CHARS = 256  # a path or method longer than this is cut in the access log


def json_error(status: int, code: str, message: str, request_id: str | None, **extra: Any) -> bytes:
    """The body of an error answer (see :class:`~fortress.serve.schemas.ErrorResponse`)."""
    return json.dumps({"error": code, "message": message, "request_id": request_id, **extra}).encode()


class EdgeMiddleware:
    """Limits, ids, logs and metrics around every HTTP request.

    Args:
        app: the wrapped ASGI app.
        metrics: where request counts and latencies go.
        routes: paths reported as themselves in metrics (others as ``other``, bounding label values).
        max_body_bytes: body size limit (a larger declared ``Content-Length``: 413 before any route).
        gate: a cheap check run before the app (the predict route's key and budget), so that a
            refusal costs no routing, no dependency resolution and no body; ``None``: none.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        routes: frozenset[str],
        max_body_bytes: int,
        gate: Gate | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = {"code": 500, "started": False}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        async def answer(
            code: int, err: str, msg: str, extra: dict[str, Any] | None = None, more: list[Any] | None = None
        ) -> None:
            body = json_error(code, err, msg, rid, **(extra or {}))
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_wrapped({"type": "http.response.start", "status": code, "headers": head + (more or [])})
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            refusal = _check_header_size(scope) or self._check_declared(headers)
            if refusal is None and self.gate is not None:
                gated = self.gate(scope, headers)
                if gated is not None:
                    await answer(*gated)
                    return
            if refusal is not None:
                await answer(*refusal)
            else:
                await self.app(scope, receive, send_wrapped)
        except Exception:
            log.exception("unhandled error answering request %s", rid)
            if not status["started"]:
                await answer(500, "internal_error", f"the server failed to answer; quote request id {rid}")
        finally:
            self._record(scope, state, headers, rid, int(status["code"]), time.perf_counter() - t0)

    def _check_declared(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """A refusal of the declared body size (before any route runs and any byte is read), or ``None``."""
        declared = headers.get("content-length")
        if declared is None:
            return None
        if not declared.isdigit():  # uvicorn's parser refuses these first; other servers may not
            return 400, "bad_request", f"Content-Length must be a non-negative integer, got {declared[:40]!r}"
        if len(declared) > 18 or int(declared) > self.max_body_bytes:
            size = f"{int(declared):,}" if len(declared) <= 18 else f"{len(declared)} digits of"
            limit = self.max_body_bytes
            return 413, "body_too_large", f"request body of {size} bytes is over the limit of {limit:,} bytes"
        return None

    def _record(
        self, scope: Scope, state: dict[str, Any], headers: dict[str, str], rid: str, status: int, seconds: float
    ) -> None:
        path = str(scope.get("path", ""))[:_LOGGED_CHARS]
        route = path if path in self.routes else "other"
        declared = headers.get("content-length", "")
        self.metrics.observe_request(route, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": rid,
                        "client": client[0] if client else None,
                        "method": str(scope.get("method"))[:16],
                        "path": path,
                        "status": status,
                        "latency_ms": round(1000 * seconds, 3),
                        "key": state.get("key_id"),
                        "images": state.get("images"),
                        "bytes_in": int(declared) if declared.isdigit() and len(declared) < 20 else None,
                    },
                    separators=(",", ":"),
                )
            )


def _check_header_size(scope: Scope) -> tuple[int, str, str] | None:
    """431 for a request line and headers over :data:`MAX_HEADER_BYTES`.

    The HTTP parser enforces the same limit only on headers that arrive in pieces; this check
    holds whatever the packets.
    """
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    size += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
    if size > MAX_HEADER_BYTES:
        return 431, "headers_too_large", f"request line and headers are over the limit of {MAX_HEADER_BYTES} bytes"
    return None
