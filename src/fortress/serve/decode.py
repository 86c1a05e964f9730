"""Turn request bodies (JSON arrays, base64 ``.npy``, PNG uploads) into checked image batches.

Every failure is an :class:`~fortress.errors.InvalidInput` (HTTP 422) or a :class:`TooLarge`
(HTTP 413) whose message says what was wrong and what was expected; nothing here trusts a size the
client declares before checking it against the limits (an ``.npy`` header is read and checked
before its data; a PNG's size before its pixels are decoded).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from fortress.data.images import ImageLimits, decode_image
from fortress.errors import InvalidInput, TooLarge
from fortress.serve.jsonbody import parse_predict_body
from fortress.tensors import check_images

__all__ = ["NPY_MAX_HEADER_BYTES", "TooLarge", "decode_json_body", "decode_npy", "decode_pngs", "validation_message"]

#: Largest ``.npy`` header read (numpy writes about 128 bytes for an (N, C, H, W) float array).
NPY_MAX_HEADER_BYTES = 4096


def validation_message(exc: ValidationError, limit: int = 3) -> str:
    """One line naming the first few fields pydantic rejected."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _check_batch(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise TooLarge(f"batch of {n} images is over the server's max batch of {max_batch}; split it")


def decode_json_body(body: bytes | bytearray, shape: Sequence[int], max_batch: int) -> Tensor:
    """Decode an ``application/json`` predict body strictly (:mod:`fortress.serve.jsonbody`).

    Shape:
        body → ``(N, C, H, W)`` float32, checked against ``shape`` = ``(C, H, W)`` and [0, 1].

    Raises:
        InvalidInput: not exactly one of ``images`` / ``npy``, a pixel that is not a JSON number,
            a wrong shape, NaN/Inf or a value outside [0, 1] — naming the first offending element.
        TooLarge: more than ``max_batch`` images.
    """
    kind, value = parse_predict_body(body, shape, max_batch)
    if kind == "npy":
        assert isinstance(value, str)
        return decode_npy(value, shape, max_batch)
    assert isinstance(value, np.ndarray)
    return check_images(torch.from_numpy(value), shape, name="images")


def decode_npy(data: str, shape: Sequence[int], max_batch: int) -> Tensor:
    """Decode base64 of a ``.npy`` file into a checked batch (header checked before the data is read).

    The header may be at most :data:`NPY_MAX_HEADER_BYTES` (413 otherwise; numpy's own refusal,
    which suggests ``allow_pickle=True``, is never shown), its dtype must be a float (object and
    structured dtypes are refused with our message, nothing is unpickled), its shape ``(N, C, H, W)``.
    """
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("npy is not valid base64") from None
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"npy is not a readable .npy file: {exc}") from None
    if version not in ((1, 0), (2, 0)):
        raise InvalidInput(f"npy has .npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0")
    size_field = raw[8:10] if version == (1, 0) else raw[8:12]
    if len(size_field) < (2 if version == (1, 0) else 4):
        raise InvalidInput("npy is not a readable .npy file: it ends inside the header")
    header_len = int.from_bytes(size_field, "little")
    if header_len > NPY_MAX_HEADER_BYTES:
        raise TooLarge(
            f"npy header is {header_len:,} bytes, over the limit of {NPY_MAX_HEADER_BYTES:,} bytes "
            "(a (N, C, H, W) float array needs about 128)"
        )
    try:
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dshape, fortran, dtype = read_header(buf, max_header_size=NPY_MAX_HEADER_BYTES)
    except (ValueError, OSError, SyntaxError, TypeError, EOFError) as exc:
        raise InvalidInput(f"npy is not a readable .npy file: {str(exc)[:200]}") from None
    if dtype.hasobject or dtype.kind != "f":
        hint = " (scale integer images by 1/255 and send float32)" if dtype.kind in "iu" else ""
        raise InvalidInput(f"npy has dtype {dtype}, expected a float array (float32){hint}")
    if len(dshape) != 4 or int(dshape[0]) < 1:
        raise InvalidInput(f"npy has shape {tuple(dshape)}, expected 4-d (N, C, H, W) with (C, H, W) = {tuple(shape)}")
    _check_batch(int(dshape[0]), max_batch)
    if tuple(dshape[1:]) != tuple(shape):
        raise InvalidInput(f"npy images have shape {tuple(dshape[1:])}, expected (C, H, W) = {tuple(shape)}")
    count = int(np.prod(dshape))
    payload = buf.read()
    if len(payload) != count * dtype.itemsize:
        raise InvalidInput(
            f"npy data holds {len(payload)} bytes, its header declares {count * dtype.itemsize} (truncated file?)"
        )
    arr = np.frombuffer(payload, dtype=dtype, count=count)
    arr = arr.reshape(dshape, order="F" if fortran else "C")
    x = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # a writable copy
    return check_images(x, shape, name="npy images")


def decode_pngs(files: Sequence[tuple[str, bytes]], shape: Sequence[int], max_batch: int) -> Tensor:
    """Decode PNG uploads ``(filename, bytes)`` into a checked batch with the loaders' decoder.

    Every file goes through :func:`fortress.data.images.decode_image`: converted to the model's
    channel count by :data:`~fortress.data.images.MODE_TABLE` (16-bit grey faithfully, transparency
    composited onto black, refused modes named), its size read from the header and checked before
    any pixel is decoded (nothing is resized behind the client's back), ancillary chunks dropped
    unread, and compressed pixel data larger than its header allows refused as a decompression
    bomb (413). One image therefore costs at most 4·H·W decoded bytes.
    """
    if not files:
        raise InvalidInput('no images: upload one or more PNG files in the "files" field')
    _check_batch(len(files), max_batch)
    c, h, w = (int(v) for v in shape)
    if c not in (1, 3):
        raise InvalidInput(f"PNG uploads serve 1- or 3-channel models; this one takes {c} channels (send npy)")
    limits = ImageLimits(max_pixels=h * w, max_bytes=4 * h * w)
    out = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, (fname, data) in enumerate(files):
        out[i] = decode_image(
            data, 1 if c == 1 else 3, name=f"file {i} ({fname!r})", limits=limits, formats=["PNG"], expected_size=(w, h)
        )
    return check_images(torch.from_numpy(out), shape, name="PNG images")
