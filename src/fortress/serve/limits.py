"""The server's request limits that are not settings; every size limit raises :class:`~fortress.errors.TooLarge`."""

from __future__ import annotations

from fortress.errors import TooLarge

__all__ = ["MAX_HEADER_BYTES", "MAX_REQUEST_ID_CHARS", "TooLarge"]

#: Request line plus headers at most (HTTP 431 above), enforced by the HTTP parser itself.
MAX_HEADER_BYTES = 16 * 1024
#: A longer (or otherwise unsafe) ``X-Request-ID`` is replaced by a generated id, never echoed.
MAX_REQUEST_ID_CHARS = 64
