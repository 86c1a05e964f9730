"""The server's edge: request ids, body-size and body-read-time limits, access logs, request metrics.

A pure ASGI middleware (no per-request Starlette objects), outermost inside the app. It reads the
whole body first — at most ``max_body_bytes``, within ``request_timeout_s`` — so a large or slow
body is answered 413 or 408 before any route runs, then replays it to the route. Anything a route
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

import anyio

from fortress.serve.metrics import Metrics

__all__ = ["ACCESS_LOGGER", "EdgeMiddleware", "json_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Logger of the structured access log (one JSON object per request, at INFO).
ACCESS_LOGGER = "fortress.serve.access"
log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def json_error(status: int, code: str, message: str, request_id: str | None, **extra: Any) -> bytes:
    """The body of an error answer (see :class:`~fortress.serve.schemas.ErrorResponse`)."""
    return json.dumps({"error": code, "message": message, "request_id": request_id, **extra}).encode()


class EdgeMiddleware:
    """Limits, ids, logs and metrics around every HTTP request.

    Args:
        app: the wrapped ASGI app.
        metrics: where request counts and latencies go.
        routes: paths reported as themselves in metrics (others as ``other``, bounding label values).
        max_body_bytes: body size limit (413 above).
        read_timeout_s: time allowed to receive the whole body (408 after).
    """

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, routes: frozenset[str], max_body_bytes: int, read_timeout_s: float
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
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

        async def answer(code: int, err: str, msg: str) -> None:
            body = json_error(code, err, msg, rid)
            await send_wrapped(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            body = await self._read_body(headers, receive)
            if isinstance(body, tuple):
                await answer(*body)
            else:
                await self.app(scope, _replay(body, receive), send_wrapped)
        except Exception:
            log.exception("unhandled error answering request %s", rid)
            if not status["started"]:
                await answer(500, "internal_error", f"the server failed to answer; quote request id {rid}")
        finally:
            self._record(scope, state, headers, rid, int(status["code"]), time.perf_counter() - t0)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | tuple[int, str, str]:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return 400, "bad_request", f"Content-Length must be a non-negative integer, got {declared!r}"
            if int(declared) > limit:
                return 413, "body_too_large", f"request body of {declared} bytes is over the limit of {limit} bytes"
        chunks: list[bytes] = []
        total = 0
        with anyio.move_on_after(self.read_timeout_s) as scope:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 400, "client_disconnected", "the client went away before sending the whole body"
                chunk = bytes(message.get("body", b""))
                total += len(chunk)
                if total > limit:
                    return 413, "body_too_large", f"request body is over the limit of {limit} bytes"
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if scope.cancelled_caught:
            return 408, "request_timeout", f"the request body did not arrive within {self.read_timeout_s:g} s"
        return b"".join(chunks)

    def _record(
        self, scope: Scope, state: dict[str, Any], headers: dict[str, str], rid: str, status: int, seconds: float
    ) -> None:
        path = str(scope.get("path", ""))
        route = path if path in self.routes else "other"
        self.metrics.observe_request(route, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": rid,
                        "client": client[0] if client else None,
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "latency_ms": round(1000 * seconds, 3),
                        "key": state.get("key_id"),
                        "images": state.get("images"),
                        "bytes_in": headers.get("content-length"),
                    },
                    separators=(",", ":"),
                )
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
