"""The server's request limits that are not settings, and the error every size limit raises."""

from __future__ import annotations

from fortress.errors import InvalidInput

__all__ = ["MAX_HEADER_BYTES", "MAX_REQUEST_ID_CHARS", "TooLarge"]

#: Request line plus headers at most (HTTP 431 above), enforced by the HTTP parser itself.
MAX_HEADER_BYTES = 16 * 1024
#: A longer (or otherwise unsafe) ``X-Request-ID`` is replaced by a generated id, never echoed.
MAX_REQUEST_ID_CHARS = 64


class TooLarge(InvalidInput):
    """The batch or body passes the server's limits (HTTP 413)."""
