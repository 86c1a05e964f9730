"""The one image decoder: every Pillow mode against MODE_TABLE, in the loaders and at the server edge.

Each mode is written by Pillow into a real file (PNG where Pillow writes the mode, else TIFF) and
decoded by ``load_image_folder`` and, for PNGs, by ``POST /v1/predict``; both must equal the value
the table promises, computed here independently from the pixels that were written. Limits are
checked from the header before decoding: pixels, decoded bytes, and PNG data that inflates past
what its header declares (a decompression bomb).
"""

from __future__ import annotations

import base64
import colorsys
import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fortress.data import load_image_folder
from fortress.data.images import MODE_TABLE, ImageLimits, decode_image, image_to_array
from fortress.errors import ArtifactError, ConfigError, InvalidInput, TooLarge
from fortress.models import create_model, save_model
from fortress.serve import KeyStore, ServeSettings, create_app
from fortress.serve.decode import decode_pngs

H, W = 6, 7
RNG = np.random.default_rng(0)
Arr = npt.NDArray[Any]


def luma(rgb: Arr) -> Arr:
    """ITU-R 601-2 luma of 0-255 RGB, the value MODE_TABLE promises a 1-channel model."""
    return (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]) / 1000


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, depth: int, color_type: int, scanlines: bytes, *extra: bytes) -> bytes:
    """A PNG written field by field (for what Pillow cannot write: 16-bit RGB, lying headers, bombs)."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(scanlines, 9))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(extra) + idat + png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# One case per mode: (file bytes, file suffix, expected (H, W, 3) in [0, 1] for a 3-channel model,
# expected (H, W) for a 1-channel model, tolerance)


Case = tuple[bytes, str, Arr, Arr, float]
U8 = 1 / 255 + 1e-6  # 8-bit rounding in Pillow's conversions


def _rgb_case(rgb: Arr, data: bytes, suffix: str) -> Case:
    return data, suffix, rgb / 255, luma(rgb) / 255, U8


def case_1() -> Case:
    bits = RNG.integers(0, 2, (H, W)).astype(bool)
    img = Image.fromarray(bits)
    v = bits.astype(np.float64)
    return encode(img, "PNG"), ".png", np.repeat(v[..., None], 3, 2), v, 0.0


def case_l() -> Case:
    g = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    return encode(Image.fromarray(g), "PNG"), ".png", np.repeat(g[..., None], 3, 2) / 255, g / 255, 1e-7


def case_p() -> Case:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    img = Image.frombytes("P", (W, H), idx.tobytes())
    img.putpalette(palette.tobytes())
    return _rgb_case(palette[idx].astype(np.float64), encode(img, "PNG"), ".png")


def case_rgb() -> Case:
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return _rgb_case(rgb.astype(np.float64), encode(Image.fromarray(rgb), "PNG"), ".png")


def _alpha_case(rgb: Arr, alpha: Arr, data: bytes, suffix: str) -> Case:
    comp = rgb * alpha[..., None] / 255  # composited onto black
    return data, suffix, comp / 255, luma(comp) / 255, 2 * U8


def _alpha() -> Arr:
    a = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    a[0, :3] = (0, 255, 128)  # fully transparent, opaque and half
    return a


def case_rgba() -> Case:
    rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = _alpha()
    return _alpha_case(rgba[..., :3].astype(np.float64), rgba[..., 3], encode(Image.fromarray(rgba), "PNG"), ".png")


def case_la() -> Case:
    la = RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)
    la[..., 1] = _alpha()
    grey = np.repeat(la[..., :1].astype(np.float64), 3, 2)
    return _alpha_case(grey, la[..., 1], encode(Image.frombytes("LA", (W, H), la.tobytes()), "PNG"), ".png")


def case_pa() -> Case:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    pa = RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)
    pa[..., 1] = _alpha()
    img = Image.frombytes("PA", (W, H), pa.tobytes())
    img.putpalette(palette.tobytes())
    return _alpha_case(palette[pa[..., 0]].astype(np.float64), pa[..., 1], encode(img, "TIFF"), ".tif")


def case_p_transparency() -> Case:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    trns = RNG.integers(0, 256, 256, dtype=np.uint8)
    trns[:2] = (0, 255)
    idx = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    idx[0, :2] = (0, 1)
    img = Image.frombytes("P", (W, H), idx.tobytes())
    img.putpalette(palette.tobytes())
    data = encode(img, "PNG", transparency=trns.tobytes())
    return _alpha_case(palette[idx].astype(np.float64), trns[idx], data, ".png")


def case_l_key() -> Case:
    g = RNG.integers(1, 256, (H, W), dtype=np.uint8)
    g[0, :3] = 77
    alpha = np.where(g == 77, 0, 255)
    return _alpha_case(
        np.repeat(g[..., None], 3, 2).astype(np.float64),
        alpha,
        encode(Image.fromarray(g), "PNG", transparency=77),
        ".png",
    )


def case_rgb_key() -> Case:
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[1, :2] = (9, 8, 7)
    alpha = np.where((rgb == (9, 8, 7)).all(2), 0, 255)
    data = encode(Image.fromarray(rgb), "PNG", transparency=(9, 8, 7))
    return _alpha_case(rgb.astype(np.float64), alpha, data, ".png")


def case_cmyk() -> Case:
    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8).astype(np.float64)
    # Pillow's profile-free conversion, as MODE_TABLE states it: R = (255 - C)(255 - K) / 255
    rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    img = Image.frombytes("CMYK", (W, H), cmyk.astype(np.uint8).tobytes())
    return _rgb_case(rgb, encode(img, "TIFF"), ".tif")


def case_ycbcr() -> Case:
    ycc = RNG.integers(16, 240, (H, W, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JPEG (JFIF) full-range BT.601
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=2).clip(0, 255)
    img = Image.frombytes("YCbCr", (W, H), ycc.astype(np.uint8).tobytes())
    data, suffix, e3, e1, _ = _rgb_case(rgb, encode(img, "TIFF"), ".tif")
    return data, suffix, e3, e1, 2 * U8


def case_lab() -> Case:
    # the neutral axis (a* = b* = 0) is the same under any white point: L* → Y → sRGB
    lstar_byte = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    lstar = lstar_byte / 255 * 100
    ylin = np.where(lstar > 8, ((lstar + 16) / 116) ** 3, lstar / 903.3)
    srgb = np.where(ylin <= 0.0031308, 12.92 * ylin, 1.055 * ylin ** (1 / 2.4) - 0.055) * 255
    lab = np.zeros((H, W, 3), np.uint8)  # Pillow's LAB: L* · 255 / 100, a* and b* as signed bytes
    lab[..., 0] = lstar_byte
    data = encode(Image.frombytes("LAB", (W, H), lab.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    data, suffix, e3, e1, _ = _rgb_case(np.repeat(srgb[..., None], 3, 2), data, ".tif")
    return data, suffix, e3, e1, 2 * U8


def _ramp16() -> Arr:
    v = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)
    v[0, 0], v[-1, -1] = 0, 65535
    return v


def _grey16_case(v: Arr, data: bytes, suffix: str) -> Case:
    g = v.astype(np.float64) / 65535
    return data, suffix, np.repeat(g[..., None], 3, 2), g, 1e-7


def case_i16() -> Case:
    v = _ramp16()
    return _grey16_case(v, encode(Image.fromarray(v), "PNG"), ".png")


def case_i16b_png() -> Case:
    v = _ramp16()
    return _grey16_case(v, encode(Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes()), "PNG"), ".png")


def case_i16b_tiff() -> Case:
    v = _ramp16()
    return _grey16_case(v, encode(Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes()), "TIFF"), ".tif")


def case_i16l_tiff() -> Case:
    v = _ramp16()
    return _grey16_case(v, encode(Image.frombytes("I;16L", (W, H), v.astype("<u2").tobytes()), "TIFF"), ".tif")


def case_i16_key() -> Case:
    v = _ramp16()
    v[2, :3] = 4242
    data, suffix, e3, e1, tol = _grey16_case(v, encode(Image.fromarray(v), "PNG", transparency=4242), ".png")
    e3[2, :3], e1[2, :3] = 0.0, 0.0
    return data, suffix, e3, e1, tol


def case_rgb16() -> Case:
    v = RNG.integers(0, 65536, (H, W, 3)).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in v)
    top = (v >> 8).astype(np.float64)  # Pillow reads 16-bit colour at 8 bits per sample (the high byte)
    return _rgb_case(top, raw_png(W, H, 16, 2, rows), ".png")


def case_f() -> Case:
    f = RNG.random((H, W)).astype(np.float32)
    f[0, :2] = (0.0, 1.0)
    g = f.astype(np.float64)
    return encode(Image.fromarray(f), "TIFF"), ".tif", np.repeat(g[..., None], 3, 2), g, 1e-7


CASES: dict[str, Callable[[], Case]] = {
    "1": case_1,
    "L": case_l,
    "P": case_p,
    "RGB": case_rgb,
    "RGBA": case_rgba,
    "LA": case_la,
    "PA": case_pa,
    "P+transparency": case_p_transparency,
    "L+transparency": case_l_key,
    "RGB+transparency": case_rgb_key,
    "CMYK": case_cmyk,
    "YCbCr": case_ycbcr,
    "LAB": case_lab,
    "I;16": case_i16,
    "I;16B-png": case_i16b_png,
    "I;16B": case_i16b_tiff,
    "I;16L": case_i16l_tiff,
    "I;16+transparency": case_i16_key,
    "RGB-16bit": case_rgb16,
    "F": case_f,
}


def _check(got: Arr, expected: Arr, tol: float, what: str) -> None:
    assert got.dtype == np.float32, what
    err = float(np.abs(got.astype(np.float64) - expected).max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_decodes_as_the_table_says_in_the_loader(tmp_path: Path, name: str) -> None:
    data, suffix, rgb, grey, tol = CASES[name]()
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / f"img{suffix}").write_bytes(data)
    for channels, expected in ((3, rgb), (1, grey[..., None])):
        got = load_image_folder(tmp_path, channels=channels).x[0].numpy().transpose(1, 2, 0)  # type: ignore[arg-type]
        _check(got, expected, tol, f"{name} → {channels} channel(s)")


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n]()[1] == ".png"])
def test_server_decodes_every_png_mode_exactly_as_the_loader(tmp_path: Path, name: str) -> None:
    data = CASES[name]()[0]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.png").write_bytes(data)
    for c in (1, 3):
        served = decode_pngs([("a.png", data)], (c, H, W), 4)
        loaded = load_image_folder(tmp_path, channels=c).x  # type: ignore[arg-type]
        assert torch.equal(served, loaded), f"{name}: server and loader disagree for {c} channel(s)"


def test_sixteen_bit_ramp_is_not_clipped(tmp_path: Path) -> None:
    """A 28x28 I;16 ramp 0…65535 keeps its ramp (only the last pixel is 1.0), in loader and server."""
    ramp = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    data = encode(Image.fromarray(ramp), "PNG")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ramp.png").write_bytes(data)
    x = load_image_folder(tmp_path, channels=1).x
    assert float((x == 1.0).float().mean()) == pytest.approx(1 / 784)
    assert float((x - torch.from_numpy(ramp / 65535).float()).abs().max()) < 1e-6
    assert torch.equal(decode_pngs([("ramp.png", data)], (1, 28, 28), 1), x)


def test_hidden_colour_under_zero_alpha_never_shows() -> None:
    """An opaque white stroke on a transparent background that stores red under alpha 0."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    rgba[10:18, 4:24] = (255, 255, 255, 255)
    x = decode_image(encode(Image.fromarray(rgba), "PNG"), 3, name="stroke.png")
    assert np.all(x[:, 10:18, 4:24] == 1.0)
    x[:, 10:18, 4:24] = 0.0
    assert np.all(x == 0.0)  # the background is black, not the hidden red


def test_opaque_alpha_equals_the_same_image_without_alpha() -> None:
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
    for c in (1, 3):
        a = decode_image(encode(Image.fromarray(rgb), "PNG"), c, name="rgb")  # type: ignore[arg-type]
        b = decode_image(encode(Image.fromarray(rgba), "PNG"), c, name="rgba")  # type: ignore[arg-type]
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------------------
# Modes no file format hands over (in-memory images), and the refused ones


def test_in_memory_only_modes() -> None:
    hsv = Image.new("HSV", (2, 1), (0, 255, 255))
    hsv.putpixel((1, 0), (170, 128, 200))
    expected = np.array([colorsys.hsv_to_rgb(h / 255, s / 255, v / 255) for h, s, v in np.asarray(hsv)[0]])
    assert np.abs(image_to_array(hsv, 3, name="hsv")[0] - expected).max() <= 2 * U8
    rgbx = Image.new("RGBX", (1, 1), (10, 20, 30, 99))
    assert np.allclose(image_to_array(rgbx, 3, name="x")[0, 0] * 255, (10, 20, 30), atol=1e-4)
    premult = Image.new("RGBa", (1, 1), (100, 50, 20, 128))  # bands are colour × alpha already
    assert np.allclose(image_to_array(premult, 3, name="p")[0, 0] * 255, (100, 50, 20), atol=1e-4)
    la = Image.merge("La", (Image.new("L", (1, 1), 60), Image.new("L", (1, 1), 128)))
    assert image_to_array(la, 1, name="la")[0, 0, 0] * 255 == pytest.approx(60, abs=1e-4)
    n16 = Image.frombytes("I;16N", (2, 1), np.array([0, 65535], dtype="=u2").tobytes())
    assert image_to_array(n16, 1, name="n")[0, :, 0].tolist() == [0.0, 1.0]


def test_refused_modes_name_the_file_and_the_mode(tmp_path: Path) -> None:
    i32 = encode(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    with pytest.raises(InvalidInput, match=r"big\.tif has mode I \(32-bit"):
        decode_image(i32, 1, name="big.tif")
    hot = encode(Image.fromarray(np.array([[0.5, 3.0]], dtype=np.float32)), "TIFF")
    with pytest.raises(InvalidInput, match=r"hot\.tif has mode F .*values in \[0\.5, 3\], expected \[0, 1\]"):
        decode_image(hot, 1, name="hot.tif")
    nan = encode(Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)), "TIFF")
    with pytest.raises(InvalidInput, match="1 NaN or infinite"):
        decode_image(nan, 3, name="nan.tif")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.tif").write_bytes(i32)
    with pytest.raises(ArtifactError, match=r"big\.tif has mode I "):
        load_image_folder(tmp_path)


#: Every mode Pillow can hold, core and mapped (``PIL.ImageMode.getmode``).
PILLOW_MODES = [
    *("1", "L", "I", "F", "P", "RGB", "RGBX", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "LA", "La", "PA"),
    *("I;16", "I;16S", "I;16L", "I;16LS", "I;16B", "I;16BS", "I;16N", "I;16NS"),
    *("I;32", "I;32B", "I;32L", "I;32S", "I;32BS", "I;32LS"),
]


REFUSED_ROW = "I;16S, I;32, other modes"


@pytest.mark.parametrize("mode", PILLOW_MODES)
def test_every_pillow_mode_has_a_row_in_the_table_and_is_decoded_or_refused(mode: str) -> None:
    row = mode if mode in MODE_TABLE else REFUSED_ROW
    assert row != REFUSED_ROW or mode.startswith(("I;16", "I;32")), f"mode {mode} has no row in MODE_TABLE"
    try:
        img = Image.new(mode, (3, 2))
    except (ValueError, KeyError):
        pytest.skip(f"Pillow cannot hold mode {mode} images")
    for c in (1, 3):
        if row in (REFUSED_ROW, "I"):  # an in-memory "I" image is not a 16-bit PNG
            with pytest.raises(InvalidInput, match=f"x has mode {mode} "):
                image_to_array(img, c, name="x")  # type: ignore[arg-type]
        else:
            out = image_to_array(img, c, name="x")  # type: ignore[arg-type]
            assert out.shape == (2, 3, c) and out.dtype == np.float32 and 0.0 <= out.min() <= out.max() <= 1.0


def test_docs_table_lists_every_row() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    for mode in MODE_TABLE:
        assert f"| `{mode}`" in doc, f"docs/data.md has no row for {mode}"


# --------------------------------------------------------------------------------------------------
# Limits, checked before decoding


def test_limits_are_checked_from_the_header_and_named() -> None:
    g = encode(Image.fromarray(np.zeros((28, 28), np.uint8)), "PNG")
    with pytest.raises(TooLarge, match=r"28x28 = 784 pixels, over the limit of 783 pixels per image"):
        decode_image(g, 1, name="g.png", limits=ImageLimits(max_pixels=783))
    i16 = encode(Image.fromarray(np.zeros((28, 28), np.uint16)), "PNG")
    with pytest.raises(TooLarge, match=r"mode I;16\) decodes to 1,568 bytes, over the limit of 1,000 decoded"):
        decode_image(i16, 1, name="g.png", limits=ImageLimits(max_bytes=1000))
    with pytest.raises(ConfigError, match="max_pixels"):
        ImageLimits(max_pixels=0)


def test_a_header_claiming_ten_billion_pixels_is_refused_without_decoding() -> None:
    lie = raw_png(100_000, 100_000, 8, 0, b"\x00" * 100_001)
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=r"10,000,000,000 pixels, over the limit of 67,108,864"):
            decode_image(lie, 1, name="lie.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20


def _bomb() -> bytes:
    """A 28x28 grey PNG whose pixel data inflates to 200 MiB."""
    return raw_png(28, 28, 8, 0, b"\x00" * (200 * 2**20))


def test_pixel_data_inflating_past_its_header_is_refused(tmp_path: Path) -> None:
    bomb = _bomb()
    with pytest.raises(TooLarge, match=r"compressed pixel data is [\d,]+ bytes, more than the 1,937 bytes"):
        decode_image(bomb, 1, name="bomb.png")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bomb.png").write_bytes(bomb)
    with pytest.raises(ArtifactError, match="decompression bomb"):
        load_image_folder(tmp_path, channels=1)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _stored_png(pix: Arr, color_type: int, interlace: bool) -> bytes:
    """An 8-bit PNG whose deflate stream is stored (level 0): the largest a legitimate encoder writes."""
    h, w = pix.shape[:2]
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    rows = b"".join(
        b"\x00" + np.ascontiguousarray(pix[y, x0::dx]).tobytes()
        for x0, y0, dx, dy in passes
        if x0 < w
        for y in range(y0, h, dy)
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, int(interlace))
    body = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 0)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize(("color_type", "bands"), [(0, 1), (6, 4)])
@pytest.mark.parametrize(("h", "w"), [(7, 13), (1, 1), (300, 257)])
def test_the_bomb_bound_accepts_every_legitimate_png(
    interlace: bool, color_type: int, bands: int, h: int, w: int
) -> None:
    """Incompressible pixels in stored deflate blocks, interlaced or not, stay within the bound."""
    pix = RNG.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if bands == 4:
        pix[..., 3] = 255
    x = decode_image(_stored_png(pix.squeeze(2) if bands == 1 else pix, color_type, interlace), 3, name="p")
    expected = np.repeat(pix, 3, 2) if bands == 1 else pix[..., :3]
    assert np.array_equal(np.rint(x * 255).astype(np.uint8), expected.transpose(2, 0, 1))


def test_compressed_text_chunks_are_never_inflated() -> None:
    """Sixty zTXt chunks of 1 MiB each (60 KiB on the wire): dropped unread, the pixels still decode."""
    g = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    good = encode(Image.fromarray(g), "PNG")
    text = b"".join(png_chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"a" * (2**20 - 64), 9)) for i in range(60))
    data = good[:33] + text + good[33:]
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        x = decode_image(data, 1, name="t.png")
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(x[0], g / np.float32(255))
    assert peak < 4 * 2**20 and seconds < 0.2, (peak, seconds)


# --------------------------------------------------------------------------------------------------
# Through the real app: refused images cost nothing


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[TestClient, KeyStore]]:
    torch.manual_seed(0)
    save_model(create_model("lenet5").eval(), tmp_path / "victim")
    settings = ServeSettings(tmp_path / "victim", tmp_path / "keys.db", max_batch=8)
    store = KeyStore(settings.keys_path, create=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, store
    store.close()


def test_server_answers_sixteen_bit_faithfully_and_refuses_bombs_free(
    app_client: tuple[TestClient, KeyStore],
) -> None:
    client, store = app_client
    key = store.add("t", budget=100)[1]
    ramp = np.linspace(0, 65535, 784).round().astype(np.uint16).reshape(28, 28)
    post = lambda files: client.post("/v1/predict", files=files, headers={"X-API-Key": key})  # noqa: E731
    ok = post([("files", ("ramp.png", encode(Image.fromarray(ramp), "PNG"), "image/png"))])
    assert ok.status_code == 200, ok.text
    assert ok.json()["queries_used"] == 1
    refused = [
        (_bomb(), 413, "decompression bomb"),
        (raw_png(100_000, 100_000, 8, 0, b"\x00"), 422, "expected 28x28"),
        (encode(Image.fromarray(np.zeros((28, 28), np.int32)), "TIFF"), 422, "not a PNG"),
    ]
    good = encode(Image.fromarray(np.zeros((28, 28), np.uint8)), "PNG")
    for data, status, fragment in refused:
        r = post([("files", ("ok.png", good, "image/png")), ("files", ("bad.png", data, "image/png"))])
        assert r.status_code == status and fragment in r.json()["message"], r.text
        assert "file 1 ('bad.png')" in r.json()["message"]
    assert store.authenticate(key).used == 1  # only the answered ramp was charged


# --------------------------------------------------------------------------------------------------
# The .npy body: header and dtype limits answered with our own messages


def _npy_v2(header: str, payload: bytes = b"") -> str:
    raw = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode("latin1") + payload
    return base64.b64encode(raw).decode()


def _npy(arr: Arr) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype.hasobject)
    return base64.b64encode(buf.getvalue()).decode()


def test_npy_header_and_dtype_limits_are_ours_and_free(app_client: tuple[TestClient, KeyStore]) -> None:
    client, store = app_client
    key = store.add("t", budget=100)[1]
    zeros = np.zeros((1, 1, 28, 28), np.float32)
    huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 28, 28), }" + " " * 2**20 + "\n"
    cases = [
        (_npy_v2(huge, zeros.tobytes()), 413, "npy header is 1,048,644 bytes, over the limit of 4,096 bytes"),
        (_npy(np.array([{"a": 1}], dtype=object)), 422, "npy has dtype object, expected a float array"),
        (_npy(np.zeros((1, 1, 28, 28), dtype=[("a", "<f4")])), 422, "expected a float array"),
        (_npy(np.zeros((1, 1, 28, 28), np.complex64)), 422, "expected a float array"),
        (_npy(np.zeros((0, 1, 28, 28), np.float32)), 422, "npy has shape (0, 1, 28, 28)"),
        (_npy_v2("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 28, 28), }\n")[:12], 422, "ends inside"),
    ]
    for body, status, fragment in cases:
        r = client.post("/v1/predict", json={"npy": body}, headers={"X-API-Key": key})
        assert r.status_code == status and fragment in r.json()["message"], r.text
        assert "allow_pickle" not in r.text
    ok = client.post("/v1/predict", json={"npy": _npy(zeros)}, headers={"X-API-Key": key})
    assert ok.status_code == 200 and ok.json()["queries_used"] == 1  # nothing refused was charged
