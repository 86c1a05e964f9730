"""The HTTP/1.1 connection layer of ``fortress serve``: uvicorn's h11 protocol, answering its own errors in JSON.

Some requests never reach the app because the HTTP parser refuses them: request line and headers
over :data:`~fortress.serve.limits.MAX_HEADER_BYTES` (a megabyte-long API key), a malformed or
conflicting ``Content-Length``, an unsupported ``Transfer-Encoding``. uvicorn answers those with a
plain-text 400 and closes the socket at once, so a client still sending its request gets a
connection reset instead of an answer. :class:`JsonH11Protocol` answers them like every other
error — the documented status (400, 431, 501) and a JSON body naming the limit — then half-closes
the connection and reads and drops what the client is still sending for a short while (a
"lingering close"), so that the client can read the answer.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fortress.serve.edge import ACCESS_LOGGER, json_error
from fortress.serve.limits import MAX_HEADER_BYTES

__all__ = ["JsonH11Protocol", "protocol_error", "run_server"]

log = logging.getLogger(__name__)
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large", 501: b"Not Implemented"}


def protocol_error(exc: BaseException | None) -> tuple[int, str, str]:
    """The status, error code and message answering an h11 parse failure ``exc``."""
    hint = int(getattr(exc, "error_status_hint", 400))
    text = str(exc)[:200] if exc is not None else "unreadable request"
    if hint == 431:
        return 431, "headers_too_large", f"request line and headers are over the limit of {MAX_HEADER_BYTES} bytes"
    if "Content-Length" in text:
        return 400, "bad_request", f"Content-Length must be one non-negative integer ({text})"
    if hint == 501:
        return 501, "not_implemented", f"{text} (send a body with Content-Length, or chunked)"
    return 400, "bad_request", f"malformed HTTP request: {text}"


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose parse errors are JSON answers followed by a lingering close.

    An answer that leaves before its request's body has arrived (a 401, 413 or 429 refusal, sent
    without reading the body) ends the connection at once when the body declares more than
    ``unread_bytes`` (or is chunked): a refused 30 MiB upload costs the server what it read before
    answering (at most one read of 256 KiB), not thirty megabytes. A smaller body is read and
    dropped (within ``linger_s``) so the connection stays open for the next request. The answer is
    written before the close; the client reads it from its socket even though its upload is cut off.

    Attributes:
        linger_s: how long to keep reading (and dropping) what the client still sends.
        linger_bytes: the most bytes dropped after a parse error before the connection is closed anyway.
        unread_bytes: the most bytes of a refused request's body dropped before the connection is closed.
    """

    linger_s = 2.0
    linger_bytes = 64 * 2**20
    unread_bytes = 64 * 1024
    _dropped = -1  # -1: not lingering after a parse error
    _unread = -1  # -1: no answer left before its request's body

    def send_400_response(self, msg: str) -> None:  # called by uvicorn inside its `except` clause
        status, code, message = protocol_error(sys.exc_info()[1])
        body = json_error(status, code, message, None)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
        head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
        self.transport.write(head + body)
        _access_line(self.client, status, code)
        self._linger()

    def _linger(self) -> None:
        self._dropped = 0
        try:
            self.transport.write_eof()  # FIN after the answer; keep reading what the client still sends
        except (NotImplementedError, OSError, RuntimeError):
            self.transport.close()
            return
        self.loop.call_later(self.linger_s, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._dropped >= 0:
            self._dropped += len(data)
            if self._dropped > self.linger_bytes:
                self.transport.close()
            return
        if self._unread >= 0:  # answered before the body arrived: drop a little of it, then hang up
            self._unread += len(data)
            if self._unread > self.unread_bytes:
                self.transport.close()
                return
        super().data_received(data)
        if self._unread >= 0 and self.conn.their_state is not h11.SEND_BODY:
            self._unread = -1  # the body ended within the allowance: the connection stays open

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # the answer (a refusal) left before the request's body: do not read megabytes nobody will use
            declared = dict(self.headers).get(b"content-length", b"")
            if not declared.isdigit() or int(declared) > self.unread_bytes:
                self.transport.close()  # more than the allowance is coming: hang up now (the answer is sent)
                return
            self._unread = 0
            self.loop.call_later(self.linger_s, self._hang_up_if_unread)

    def _hang_up_if_unread(self) -> None:
        if self._unread >= 0:
            self.transport.close()


def _access_line(client: Any, status: int, code: str) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    if logger.isEnabledFor(logging.INFO):
        line = {"ts": round(time.time(), 3), "client": client[0] if client else None, "status": status, "error": code}
        logger.info(json.dumps(line, separators=(",", ":")))


def run_server(app: Any, *, host: str, port: int, graceful_s: float = 10.0) -> None:
    """Serve ``app`` with uvicorn on ``host:port`` through :class:`JsonH11Protocol` (blocks until stopped)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        http=JsonH11Protocol,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=int(graceful_s),
    )
