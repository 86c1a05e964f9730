"""The one image decoder: encoded files (PNG, JPEG, TIFF, ...) → float32 ``(C, H, W)`` in [0, 1].

The data loaders (:func:`~fortress.data.loaders.load_image_folder`) and the server's PNG uploads
decode through :func:`decode_image`, so a file becomes the same pixels wherever it enters, and is
refused for the same reason with the same message.

What each Pillow mode becomes is one table, :data:`MODE_TABLE` (also in ``docs/data.md``):

* 8-bit modes scale by 1/255; 16-bit grey (``I;16``, ``I;16B``, ...) by 1/65535, faithfully;
* colour modes (``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) go to RGB with Pillow's conversion;
  a 1-channel model gets the ITU-R 601-2 luma of that RGB (Pillow's ``convert("L")``);
* anything with transparency (an alpha band, a ``tRNS`` key, a palette with alpha) is
  composited onto black (:data:`BACKGROUND`): a pixel becomes ``colour × alpha``;
* ``F`` (32-bit float) is taken as is when its values lie in [0, 1]; 32-bit integers (``I`` outside
  PNG, ``I;32``) and signed 16-bit samples have no fixed white level and are refused.

Limits are checked from the header, before a pixel is decoded: pixels per image, decoded bytes per
image (:class:`ImageLimits`), and for PNG the size of the compressed pixel data, which may not
exceed what any encoder needs for the declared size (a small image whose data inflates to hundreds
of MiB is refused). Ancillary PNG chunks (text, ICC profiles, EXIF, animation frames) are dropped
before Pillow sees the file, so their compressed payloads are never inflated either.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from fortress.errors import ConfigError, InvalidInput, TooLarge
from fortress.tensors import RANGE_TOL

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BACKGROUND",
    "DEFAULT_IMAGE_LIMITS",
    "MODE_TABLE",
    "ImageLimits",
    "decode_image",
    "image_to_array",
    "open_image",
    "resize_bilinear",
]

#: Value of the background transparent pixels are composited onto (black).
BACKGROUND = 0.0

_REFUSED = "refused: InvalidInput naming the file and the mode"

#: What every Pillow mode becomes: ``mode -> (1-channel model, 3-channel model)``. "luma" is ITU-R
#: 601-2, ``(299 R + 587 G + 114 B) / 1000 / 255`` (Pillow's ``convert("L")``, rounded to 8 bits);
#: "× alpha" is compositing onto black (:data:`BACKGROUND`), rounded to 8 bits.
MODE_TABLE: dict[str, tuple[str, str]] = {
    "1": ("0 → 0.0, 1 → 1.0", "0 → 0.0, 1 → 1.0 in R, G, B"),
    "L": ("v / 255", "v / 255 in R, G, B"),
    "P": ("luma of the palette colour", "palette colour / 255"),
    "RGB": ("luma", "v / 255"),
    "RGBX": ("luma (X dropped)", "v / 255 (X dropped)"),
    "CMYK": (
        "luma of Pillow's CMYK → RGB",
        "Pillow's profile-free CMYK → RGB, R = (255 − C)(255 − K) / 255 (G, B alike), / 255",
    ),
    "YCbCr": ("luma of JPEG's YCbCr → RGB", "JPEG's (full-range BT.601) YCbCr → RGB, / 255"),
    "LAB": ("luma of Pillow's CIELAB → sRGB", "Pillow's CIELAB → sRGB, / 255"),
    "HSV": ("luma of Pillow's HSV → RGB", "Pillow's HSV → RGB, / 255"),
    "RGBA": ("luma of colour × alpha", "colour × alpha / 255, / 255"),
    "RGBa": ("luma of the stored (premultiplied) colour", "stored (premultiplied) colour / 255"),
    "LA": ("grey × alpha / 255, / 255", "grey × alpha / 255, / 255 in R, G, B"),
    "La": ("stored (premultiplied) grey / 255", "stored (premultiplied) grey / 255 in R, G, B"),
    "PA": ("luma of palette colour × alpha", "palette colour × alpha / 255, / 255"),
    "P+transparency": ("luma of palette colour × alpha (tRNS)", "palette colour × alpha (tRNS) / 255, / 255"),
    "1/L/RGB+transparency": ("the tRNS key colour → 0.0; other pixels as the mode", "the same"),
    "I;16": ("v / 65535", "v / 65535 in R, G, B"),
    "I;16L": ("v / 65535", "v / 65535 in R, G, B"),
    "I;16B": ("v / 65535", "v / 65535 in R, G, B"),
    "I;16N": ("v / 65535", "v / 65535 in R, G, B"),
    "I;16+transparency": ("v / 65535; the tRNS key value → 0.0", "the same in R, G, B"),
    "I": (f"a 16-bit grey PNG (older Pillow): v / 65535; any other file: {_REFUSED}", "the same in R, G, B"),
    "F": (f"v when finite and in [0, 1]; otherwise {_REFUSED} and the range", "the same in R, G, B"),
    "I;16S, I;32, other modes": (f"{_REFUSED} (no fixed white level)", "the same"),
}

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG chunks handed to Pillow; every other (text, ICC profile, EXIF, animation) is dropped unread.
_PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits checked from the header, before any pixel is decoded.

    Attributes:
        max_pixels: width × height.
        max_bytes: decoded bytes: width × height × the bytes Pillow stores per pixel (1 for modes
            ``1``, ``L``, ``P``; 2 for 16-bit grey; 4 for every other mode).

    Raises:
        ConfigError: a limit below 1.
    """

    max_pixels: int = 2**26
    max_bytes: int = 2**28

    def __post_init__(self) -> None:
        for field in ("max_pixels", "max_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ImageLimits.{field} must be a positive integer, got {value!r}")


#: 64 Mi pixels (8192 × 8192) and 256 MiB decoded per image.
DEFAULT_IMAGE_LIMITS = ImageLimits()


def _pillow_bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _png_raw_bytes(width: int, height: int, depth: int, color_type: int, interlace: int) -> int:
    """Bytes of filtered scanlines a PNG of this header inflates to (what the IDAT stream holds)."""
    bits = depth * _PNG_SAMPLES.get(color_type, 4)

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if interlace != 1:
        return rows(width, height)
    return sum(
        rows(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)) for x0, y0, dx, dy in _ADAM7
    )


def _check_size(
    name: str, w: int, h: int, mode: str | None, limits: ImageLimits, expected: tuple[int, int] | None
) -> None:
    """Refuse a size other than ``expected`` (422), then one over ``limits`` (413), from header facts."""
    if expected is not None and (w, h) != tuple(expected):
        raise InvalidInput(f"{name} is {w}x{h}, expected {expected[0]}x{expected[1]} (WxH)")
    if w * h > limits.max_pixels:
        raise TooLarge(
            f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,} pixels per image"
        )
    if mode is not None and w * h * _pillow_bytes_per_pixel(mode) > limits.max_bytes:
        raise TooLarge(
            f"{name} ({w}x{h}, mode {mode}) decodes to {w * h * _pillow_bytes_per_pixel(mode):,} bytes, over "
            f"the limit of {limits.max_bytes:,} decoded bytes per image"
        )


def _guard_png(data: bytes, name: str, limits: ImageLimits, expected: tuple[int, int] | None) -> bytes:
    """Check a PNG's size from IHDR, drop ancillary chunks, refuse data larger than the header allows.

    Malformed structure (truncation, a first chunk that is not IHDR) is left for Pillow to report.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return data
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    _check_size(name, width, height, None, limits, expected)  # before Pillow's own bomb check
    kept = [_PNG_SIGNATURE]
    idat = 0
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):  # truncated: Pillow names the damage
            kept.append(data[pos:])
            break
        if ctype == b"IDAT":
            idat += length
        if ctype in _PNG_KEPT:
            kept.append(data[pos:end])
        pos = end
        if ctype == b"IEND":
            break
    raw = _png_raw_bytes(width, height, depth, color_type, interlace)
    bound = raw + raw // 8 + 1024  # deflate never needs more (stored blocks cost 5 bytes per 64 KiB)
    if idat > bound:
        raise TooLarge(
            f"{name}: its compressed pixel data is {idat:,} bytes, more than the {bound:,} bytes any PNG "
            f"encoder needs for {width}x{height} pixels ({raw:,} bytes uncompressed); refused as a "
            "decompression bomb (limit: uncompressed size + 1/8 + 1 KiB)"
        )
    return b"".join(kept)


def open_image(
    data: bytes,
    *,
    name: str,
    limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
    formats: Sequence[str] | None = None,
    expected_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Open an encoded image and check it against ``limits`` from its header (no pixel decoded yet).

    Args:
        data: the encoded file.
        name: how to call the file in messages (a path, or ``"file 0 ('a.png')"``).
        limits: per-image pixel and decoded-byte limits.
        formats: Pillow format names to accept (``None``: any Pillow reads).
        expected_size: ``(width, height)`` the image must have (checked first).

    Returns:
        The opened, not yet loaded, Pillow image (ancillary PNG chunks dropped).

    Raises:
        InvalidInput: not an image of ``formats``, unreadable header, or not ``expected_size``.
        TooLarge: over ``limits`` or a PNG decompression bomb; the message names the limit.
    """
    from PIL import Image, UnidentifiedImageError

    kinds = "/".join(formats) if formats else "image"
    data = _guard_png(data, name, limits, expected_size)
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except UnidentifiedImageError:
        raise InvalidInput(f"{name} is not a {kinds} file Pillow can read") from None
    except Image.DecompressionBombError:  # Pillow's own check, on formats other than PNG
        raise TooLarge(
            f"{name} has more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, over the limit of "
            f"{limits.max_pixels:,} pixels per image"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise InvalidInput(f"{name} is not a readable {kinds} file: {exc}") from None
    _check_size(name, img.size[0], img.size[1], img.mode, limits, expected_size)
    return img


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _grey(values: npt.NDArray[np.float32], channels: int) -> npt.NDArray[np.float32]:
    return np.repeat(values[:, :, None], channels, axis=2)


def image_to_array(img: Image.Image, channels: Literal[1, 3], *, name: str) -> npt.NDArray[np.float32]:
    """Decode the pixels of ``img`` to float32 ``(H, W, channels)`` in [0, 1] by :data:`MODE_TABLE`.

    Raises:
        InvalidInput: a mode without a fixed white level (32-bit or signed integers), ``F`` values
            outside [0, 1], or pixel data Pillow cannot decode; the message names the file and mode.
    """
    from PIL import Image

    mode = img.mode
    try:
        img.load()
        if mode in _SIXTEEN_BIT or (mode == "I" and img.format == "PNG"):  # older Pillow: 16-bit PNG as "I"
            raw = np.asarray(img)
            grey = (raw.astype(np.float32) / np.float32(65535.0)).astype(np.float32)
            key = img.info.get("transparency")
            if isinstance(key, int):
                grey[raw == key] = BACKGROUND
            return _grey(grey, channels)
        if mode == "F":
            values = np.asarray(img, dtype=np.float32)
            finite = np.isfinite(values)
            if not finite.all():
                raise InvalidInput(
                    f"{name} has mode F (32-bit float) with {int((~finite).sum())} NaN or infinite values; "
                    "expected finite values in [0, 1]"
                )
            lo, hi = float(values.min()), float(values.max())
            if lo < -RANGE_TOL or hi > 1.0 + RANGE_TOL:
                raise InvalidInput(
                    f"{name} has mode F (32-bit float) with values in [{lo:.4g}, {hi:.4g}], expected [0, 1]"
                )
            return _grey(values.copy(), channels)
        if mode == "I" or mode.startswith("I;"):
            raise InvalidInput(
                f"{name} has mode {mode} (32-bit or signed integer samples), which has no fixed white level; "
                "expected 8-bit or 16-bit unsigned images (save it as 16-bit grey or 8-bit)"
            )
        if mode in ("RGBa", "La"):  # premultiplied: the colour bands already are colour × alpha
            bands = np.ascontiguousarray(np.asarray(img)[:, :, :-1])
            rgb = Image.fromarray(bands) if mode == "RGBa" else Image.fromarray(bands[:, :, 0]).convert("RGB")
        elif _has_transparency(img):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
            comp = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255  # onto black, rounded
            rgb = Image.fromarray(comp.astype(np.uint8))
        elif mode in ("1", "L") and channels == 1:
            rgb = img
        else:
            rgb = img.convert("RGB")
        out = rgb.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(out, dtype=np.uint8)
    except InvalidInput:
        raise
    except (ValueError, OSError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise InvalidInput(f"{name} is not a readable {img.format or 'image'} file (mode {mode}): {exc}") from None
    return (arr.reshape(arr.shape[0], arr.shape[1], channels).astype(np.float32) / np.float32(255.0)).astype(np.float32)


def decode_image(
    data: bytes,
    channels: Literal[1, 3],
    *,
    name: str,
    limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
    formats: Sequence[str] | None = None,
    expected_size: tuple[int, int] | None = None,
) -> npt.NDArray[np.float32]:
    """Decode one encoded image to float32 ``(channels, H, W)`` in [0, 1] (see the module docs).

    Args:
        data: the encoded file.
        channels: 1 (grey-scale model) or 3 (RGB model).
        name: how to call the file in messages.
        limits: per-image pixel and decoded-byte limits, checked before decoding.
        formats: Pillow format names to accept (``None``: any).
        expected_size: ``(width, height)`` the image must have.

    Returns:
        ``(channels, H, W)`` float32 in [0, 1].

    Raises:
        InvalidInput: unreadable, wrong size, or a refused mode (the message names the file and mode).
        TooLarge: over ``limits`` or a decompression bomb (the message names the limit).

    Example:
        >>> decode_image(png_bytes, 1, name="digit.png").shape  # doctest: +SKIP
        (1, 28, 28)
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    img = open_image(data, name=name, limits=limits, formats=formats, expected_size=expected_size)
    with img:
        arr = image_to_array(img, channels, name=name)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def resize_bilinear(arr: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Resize float32 ``(C, H, W)`` images to ``(C, size, size)`` with Pillow's bilinear filter."""
    from PIL import Image

    if arr.shape[1:] == (size, size):
        return arr
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for plane in arr
    ]
    return np.clip(np.stack(planes).astype(np.float32), 0.0, 1.0)
