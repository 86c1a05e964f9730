"""Reading request bodies within bounds: size, time, and the bytes the whole server holds at once.

The predict route reads a body only after the caller's key is authenticated and its budget
checked, so an unauthenticated or exhausted caller costs the server nothing but the refusal (the
HTTP layer drops the unread body without buffering it). Then:

* the body is read in the chunks it arrives in, at most ``max_bytes`` (413 beyond, whether or not
  ``Content-Length`` said so), within ``timeout_s`` (408 after);
* before reading, the body's size (``Content-Length``, or ``max_bytes`` when it is not declared)
  is taken from a server-wide :class:`BodyBudget`; a request waits for room (503 if none frees up
  within ``timeout_s``), so the bodies held at once never pass the budget, however many clients send;
* PNG uploads are split by starlette's multipart parser from the buffered body, after counting the
  parts, so more files than the batch limit is a 413 naming the limit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from fortress.errors import FortressError, InvalidInput
from fortress.serve.limits import TooLarge

__all__ = ["BodyBudget", "BodyTimeout", "BodyTooLarge", "Busy", "ClientGone", "read_body", "split_multipart"]


class BodyTooLarge(TooLarge):
    """The request body passes ``max_body_bytes`` (HTTP 413)."""


class Busy(FortressError):
    """The server holds as many request bodies as it may; nothing was read or charged (HTTP 503)."""


class BodyTimeout(FortressError):
    """The request body did not arrive in time (HTTP 408)."""


class ClientGone(FortressError):
    """The client went away before sending its whole body (HTTP 400, never seen by it)."""


class BodyBudget:
    """Bytes of request bodies the server holds at once, shared by every request.

    Args:
        capacity: bytes at most (at least one body of the maximum size must fit).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        self._cond: anyio.Condition | None = None

    @asynccontextmanager
    async def hold(self, nbytes: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold ``nbytes`` for the block (wait up to ``timeout_s`` for room).

        Raises:
            Busy: no room freed up in time.
        """
        if self._cond is None:
            self._cond = anyio.Condition()
        cond = self._cond
        async with cond:
            with anyio.move_on_after(timeout_s) as scope:
                while self.held and self.held + nbytes > self.capacity:
                    await cond.wait()
            if scope.cancelled_caught:
                raise Busy(
                    f"the server holds {self.held:,} bytes of request bodies (limit {self.capacity:,}) and none "
                    f"freed up within {timeout_s:g} s; nothing was read or charged, retry later"
                )
            self.held += nbytes
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with cond:
                    self.held -= nbytes
                    cond.notify_all()


def declared_length(request: Request) -> int | None:
    """The body size the client declared (the edge already refused a malformed or oversized one)."""
    text = request.headers.get("content-length")
    return int(text) if text is not None and text.isdigit() and len(text) <= 18 else None


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytearray:
    """The whole body, read as it arrives: at most ``max_bytes``, within ``timeout_s``.

    Raises:
        BodyTooLarge: more than ``max_bytes`` arrived (HTTP 413; the rest is dropped unread).
        BodyTimeout: the body did not arrive within ``timeout_s`` (HTTP 408).
        ClientGone: the client disconnected first.
    """
    declared = declared_length(request)
    # a declared body is read into one buffer of its size (growing one would copy it as it grows)
    buf = bytearray(declared) if declared is not None and declared <= max_bytes else bytearray()
    size = 0
    with anyio.move_on_after(timeout_s) as scope:
        try:
            async for chunk in request.stream():
                end = size + len(chunk)
                if end > max_bytes or (declared is not None and end > declared):
                    raise BodyTooLarge(f"request body is over the limit of {max_bytes:,} bytes")
                if declared is not None:
                    buf[size:end] = chunk
                else:
                    buf += chunk
                size = end
        except ClientDisconnect:
            raise ClientGone("the client went away before sending the whole body") from None
    if scope.cancelled_caught:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s ({size:,} bytes came)")
    if declared is not None and size != declared:  # the HTTP layer enforces this; a stray server may not
        raise InvalidInput(f"the body has {size:,} bytes, its Content-Length declares {declared:,}")
    return buf  # bytes-like; not copied into a bytes object (that would double the body for a moment)


async def split_multipart(body: bytes | bytearray, headers: Headers, max_files: int) -> list[tuple[str, bytes]]:
    """The ``files`` parts of a ``multipart/form-data`` body, as ``(filename, bytes)``.

    Raises:
        TooLarge: more parts than ``max_files`` (counted before any part is parsed).
        InvalidInput: no boundary, a malformed body, or a field other than ``files``.
    """
    boundary = _boundary(headers.get("content-type", ""))
    parts = body.count(b"--" + boundary) - 1  # each part opens with a delimiter; one more closes the body
    if parts > max_files:
        raise TooLarge(
            f"upload of {parts} files is over the server's max batch of {max_files} images (one PNG per image)"
        )

    async def stream() -> AsyncGenerator[bytes, None]:
        yield bytes(body)

    parser = MultiPartParser(headers, stream(), max_files=max_files, max_fields=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(f"unreadable multipart body: {exc.message[:200]}") from None
    files: list[tuple[str, bytes]] = []
    try:
        for name, value in form.multi_items():
            if name != "files" or not isinstance(value, UploadFile):
                raise InvalidInput(f'unexpected form field {name[:40]!r}: upload PNG files in the "files" field')
            files.append((value.filename or f"file{len(files)}", await value.read()))
    finally:
        await form.close()
    return files


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise InvalidInput("multipart/form-data needs a boundary parameter in its Content-Type")
