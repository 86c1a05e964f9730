"""Strict JSON predict bodies, read without one Python object per pixel.

A body is ``{"images": [...]}`` (nested arrays ``(N, C, H, W)``) or ``{"npy": "<base64>"}``, exactly
one of them, nothing else. Only JSON's own grammar is accepted (RFC 8259): a pixel is a JSON number
— never a string such as ``"0.5"``, ``true``/``false``/``null``, ``NaN`` or ``Infinity`` — and a
field is never ``null``. A refusal names the first offending element (``images[3][0][27][5]``).

Cost. ``images`` is checked one image at a time by a regular expression compiled for the model's
``(C, H, W)`` (no allocation), so a body that is not a batch of such images is refused after
reading at most one image past its fault, and a batch over ``max_batch`` images after
``max_batch`` images. Only a body that passed is converted, a few tens of thousands of pixels at a
time, into one preallocated float32 array: the transient cost is the body plus ``4 * N*C*H*W``
bytes plus a bounded chunk, never a Python list of every pixel.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pydantic_core

from fortress.errors import InvalidInput
from fortress.serve.limits import TooLarge

__all__ = ["parse_predict_body"]

_WS = rb"[ \t\n\r]*"
_NUMBER = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_ws = re.compile(_WS)
_number = re.compile(_NUMBER + rb"(?![0-9.eE+\-])")
_sep = re.compile(_WS + rb"," + _WS)
_close = re.compile(_WS + rb"\]")
_string = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"')
_token = re.compile(rb'[^,\[\]{}:" \t\n\r]{1,24}')
_CHUNK_PIXELS = 1 << 16  # pixels converted at a time (bounds the transient Python objects)


_FAST_WS = rb"[ \t\n\r]*+"
_FAST_NUMBER = rb"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+"


@functools.lru_cache(maxsize=16)
def _image_pattern(c: int, h: int, w: int) -> re.Pattern[bytes]:
    """One image ``(c, h, w)`` of JSON numbers, exactly (counted repetitions).

    A number must be followed by a separator or a bracket, so ``01`` or ``1.5.2`` never match.
    """

    def exactly(item: bytes, n: int) -> bytes:
        more = rb"(?:" + _FAST_WS + rb"," + _FAST_WS + item + rb"){%d}" % (n - 1) if n > 1 else b""
        return rb"\[" + _FAST_WS + item + more + _FAST_WS + rb"\]"

    return re.compile(exactly(exactly(exactly(_FAST_NUMBER, w), h), c))


def _snippet(body: bytes | bytearray, pos: int) -> str:
    return body[pos : pos + 24].decode("utf-8", "replace") + ("…" if len(body) > pos + 24 else "")


def _skip(body: bytes | bytearray, pos: int) -> int:
    m = _ws.match(body, pos)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def _read_string(body: bytes | bytearray, pos: int, what: str) -> tuple[str, int]:
    """The JSON string starting at ``body[pos] == '"'`` and the position after it."""
    close = body.find(b'"', pos + 1)
    if close >= 0 and body.find(b"\\", pos + 1, close) < 0 and not _has_control(body, pos + 1, close):
        try:
            return body[pos + 1 : close].decode("utf-8"), close + 1  # the common case: no escapes
        except UnicodeDecodeError:
            raise InvalidInput(f"{what} is not valid UTF-8 (at byte {pos})") from None
    m = _string.match(body, pos)
    if m is None:
        raise InvalidInput(f"{what} is not a valid JSON string (at byte {pos}: {_snippet(body, pos)!r})")
    try:
        return str(json.loads(m.group())), m.end()
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"{what} is not a valid JSON string (at byte {pos})") from None


def _has_control(body: bytes | bytearray, start: int, stop: int) -> bool:
    """Whether ``body[start:stop]`` holds a byte below 0x20 (not allowed raw in a JSON string); vectorised."""
    if stop <= start:
        return False
    return bool(np.frombuffer(body, dtype=np.uint8, count=stop - start, offset=start).min() < 0x20)


def _describe(body: bytes | bytearray, pos: int) -> str:
    """What JSON value starts at ``pos`` (for messages naming an offending element)."""
    ch = body[pos : pos + 1]
    if ch == b'"':
        try:
            text, _ = _read_string(body, pos, "value")
        except InvalidInput:
            return "a malformed string"
        return f"the string {text[:20] + ('…' if len(text) > 20 else '')!r}"
    for literal in (b"true", b"false", b"null"):
        if body.startswith(literal, pos):
            return literal.decode()
    if ch == b"[":
        return "an array"
    if ch == b"{":
        return "an object"
    if not ch:
        return "the end of the body"
    token = _token.match(body, pos)
    text = token.group().decode("utf-8", "replace") if token else _snippet(body, pos)
    return f"{text!r}, not a JSON number"


def _path(path: Sequence[int]) -> str:
    return "images" + "".join(f"[{i}]" for i in path)


def _walk(body: bytes | bytearray, pos: int, dims: Sequence[int], path: list[int]) -> int:
    """Check one nested array of shape ``dims`` of numbers at ``pos``; raise naming the first fault."""
    names = ("channels", "rows", "values")[3 - len(dims) :]
    pos = _skip(body, pos)
    if body[pos : pos + 1] != b"[":
        raise InvalidInput(f"{_path(path)} is {_describe(body, pos)}, expected an array of {dims[0]} {names[0]}")
    pos = _skip(body, pos + 1)
    count = 0
    while True:
        where = [*path, count]
        if len(dims) == 1:
            m = _number.match(body, pos)
            if m is None:
                raise InvalidInput(f"{_path(where)} is {_describe(body, pos)}, expected a number in [0, 1]")
            pos = m.end()
        else:
            pos = _walk(body, pos, dims[1:], where)
        count += 1
        pos = _skip(body, pos)
        ch = body[pos : pos + 1]
        if ch == b"," and count < dims[0]:
            pos = _skip(body, pos + 1)
            continue
        if ch == b"," or (ch == b"]" and count < dims[0]):
            many = f"more than {dims[0]}" if ch == b"," else f"{count}"
            raise InvalidInput(f"{_path(path)} has {many} {names[0]}, expected {dims[0]}")
        if ch == b"]":
            return pos + 1
        raise InvalidInput(f"{_path(where)} is followed by {_describe(body, pos)}, expected ',' or ']'")


def _images(body: bytes | bytearray, pos: int, shape: Sequence[int], max_batch: int) -> tuple[np.ndarray, int]:
    """The ``images`` array at ``body[pos] == '['``: a float32 ``(N, C, H, W)`` array and the end position."""
    c, h, w = (int(v) for v in shape)
    image = _image_pattern(c, h, w)
    spans: list[tuple[int, int]] = []
    pos = _skip(body, pos + 1)
    if body[pos : pos + 1] == b"]":
        raise InvalidInput(f"images is an empty batch; send at least one (C, H, W) = {(c, h, w)} image")
    while True:
        m = image.match(body, pos)
        if m is None:
            _walk(body, pos, (c, h, w), [len(spans)])  # raises naming the first fault
            raise InvalidInput(f"{_path([len(spans)])} is not a (C, H, W) = {(c, h, w)} array of numbers")
        spans.append((m.start(), m.end()))
        s = _sep.match(body, m.end())
        if s is not None:
            if len(spans) == max_batch:
                raise TooLarge(f"images holds more than the server's max batch of {max_batch} images; split it")
            pos = s.end()
            continue
        e = _close.match(body, m.end())
        if e is None:
            at = _skip(body, m.end())
            raise InvalidInput(f"{_path([len(spans) - 1])} is followed by {_describe(body, at)}, expected ',' or ']'")
        break
    out = np.empty((len(spans), c, h, w), dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // (c * h * w))
    for i in range(0, len(spans), step):
        j = min(len(spans), i + step)
        chunk = b"[" + body[spans[i][0] : spans[j - 1][1]] + b"]"
        out[i:j] = np.asarray(pydantic_core.from_json(chunk), dtype=np.float64)
    return out, e.end()


def parse_predict_body(
    body: bytes | bytearray, shape: Sequence[int], max_batch: int
) -> tuple[Literal["images"], np.ndarray] | tuple[Literal["npy"], str]:
    """Parse a JSON predict body strictly: ``("images", float32 (N, C, H, W))`` or ``("npy", base64 text)``.

    Raises:
        InvalidInput: not a JSON object with exactly one of ``images`` / ``npy``, an unknown or
            ``null`` field, a pixel that is not a JSON number, or an array that is not ``(N, C, H, W)``
            with ``shape = (C, H, W)`` — the message names the first offending element.
        TooLarge: more than ``max_batch`` images.
    """
    pos = _skip(body, 0)
    if body[pos : pos + 1] != b"{":
        raise InvalidInput(
            f'the body must be a JSON object {{"images": ...}} or {{"npy": ...}}, found {_describe(body, pos)}'
        )
    pos = _skip(body, pos + 1)
    found: tuple[Literal["images"], np.ndarray] | tuple[Literal["npy"], str] | None = None
    if body[pos : pos + 1] != b"}":
        while True:
            if body[pos : pos + 1] != b'"':
                raise InvalidInput(f"expected a field name at byte {pos}, found {_describe(body, pos)}")
            name, pos = _read_string(body, pos, "a field name")
            pos = _skip(body, pos)
            if body[pos : pos + 1] != b":":
                raise InvalidInput(f"expected ':' after the field name {name[:40]!r} at byte {pos}")
            pos = _skip(body, pos + 1)
            if name not in ("images", "npy"):
                raise InvalidInput(
                    f'unexpected field {name[:40]!r}: send exactly one of "images" (nested arrays) or "npy" '
                    "(base64 .npy)"
                )
            if found is not None:
                dup = f'"{name}" twice' if found[0] == name else "both"
                raise InvalidInput(f'send exactly one of "images" or "npy"; this body has {dup}')
            ch = body[pos : pos + 1]
            if name == "npy":
                if ch != b'"':
                    raise InvalidInput(f'"npy" is {_describe(body, pos)}, expected a base64 string of a .npy file')
                text, pos = _read_string(body, pos, '"npy"')
                found = ("npy", text)
            else:
                if ch != b"[":
                    raise InvalidInput(f'"images" is {_describe(body, pos)}, expected nested arrays (N, C, H, W)')
                arr, pos = _images(body, pos, shape, max_batch)
                found = ("images", arr)
            pos = _skip(body, pos)
            ch = body[pos : pos + 1]
            if ch == b",":
                pos = _skip(body, pos + 1)
                continue
            if ch == b"}":
                break
            raise InvalidInput(f"expected ',' or '}}' at byte {pos}, found {_describe(body, pos)}")
    end = _skip(body, pos + 1)
    if end != len(body):
        raise InvalidInput(f"unexpected data after the JSON object at byte {end}: {_snippet(body, end)!r}")
    if found is None:
        raise InvalidInput('send exactly one of "images" (nested arrays) or "npy" (base64 .npy)')
    return found
