"""Helpers for the hostile-input, fault and security tests: the error-shape assertion, a health check,
reading one raw HTTP response off a socket, and image builders for files Pillow will not write by itself
(16-bit RGB PNGs, decompression bombs, headers that lie about their size)."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from carvae.png_integrity import ADAM7


def assert_error(r: Any, status: int, code: str | tuple[str, ...]) -> dict[str, Any]:
    """The shared error shape, with the request id of the X-Request-ID header, as strict JSON (no NaN)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = json.loads(r.text, parse_constant=_no_constants)
    assert set(body) == {"error"}, body
    err = body["error"]
    codes = (code,) if isinstance(code, str) else code
    assert err["code"] in codes, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["request_id"] == r.headers["x-request-id"], err
    return dict(err)


def _no_constants(name: str) -> None:
    raise AssertionError(f"response holds {name}, which is not JSON")


def assert_healthy(client: Any) -> None:
    """Alive, ready, and still answering a model request correctly."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    png = encode(Image.fromarray(noise(40, 30, seed=99)), "PNG")
    r = client.post("/reconstruct", files={"file": ("car.png", png, "image/png")})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text


def encode(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# -- raw PNG writing ----------------------------------------------------------------------------------
def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def raw_png(
    width: int,
    height: int,
    idat: bytes,
    bit_depth: int = 8,
    color_type: int = 2,
    interlace: int = 0,
    palette: bytes = b"",
) -> bytes:
    """A PNG with the given header and compressed image data, whatever they hold."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    plte = png_chunk(b"PLTE", palette) if palette else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + plte
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_rgb16(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint16 → a 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(h, w * 3).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    return raw_png(w, h, zlib.compress(raw), bit_depth=16, color_type=2)


def png_rows(pixels: np.ndarray, interlace: bool = False) -> list[bytes]:
    """The rows a PNG encoder compresses, in order, each behind filter byte 0: those of the image, or of
    the seven Adam7 sub-images. (H, W) or (H, W, C) uint8, or uint16 for 16 bits a sample."""
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2")
    images = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlace else [pixels]
    return [b"\0" + row.tobytes() for sub in images if sub.shape[1] for row in sub]


# Test PNGs for the truncation tests: (pixels, bit depth, colour type, palette)
def truncation_sources() -> dict[str, tuple[np.ndarray, int, int, bytes]]:
    rgb = noise(64, 48)
    grey16 = np.random.default_rng(1).integers(0, 65536, size=(48, 64), dtype=np.uint16)
    indices = np.random.default_rng(2).integers(0, 256, size=(48, 64), dtype=np.uint8)
    palette = noise(256, 1, seed=3).tobytes()
    return {
        "rgb8": (rgb, 8, 2, b""),
        "palette": (indices, 8, 3, palette),
        "grey16": (grey16, 16, 0, b""),
        "interlaced": (rgb, 8, 2, b""),
    }


def png_of_rows(kind: str, keep: int | None = None) -> bytes:
    """A `truncation_sources` PNG whose compressed data ends cleanly after its first `keep` rows (all of
    them when None): framing, checksums and IEND all valid, only the pixel data short."""
    pixels, bit_depth, color_type, palette = truncation_sources()[kind]
    interlace = kind == "interlaced"
    rows = png_rows(pixels, interlace)[:keep]
    h, w = pixels.shape[:2]
    return raw_png(w, h, zlib.compress(b"".join(rows)), bit_depth, color_type, int(interlace), palette)


def truncated_pngs() -> dict[str, bytes]:
    """PNGs cut short in each way that matters, by name: a file cut off after its image data (before
    IEND, inside IEND), image data that ends cleanly at a row boundary (with and without the rest of the
    file), and cuts Pillow already refused (inside IDAT, right after IHDR)."""
    cases: dict[str, bytes] = {}
    for kind in truncation_sources():
        whole = png_of_rows(kind)
        rows = len(png_rows(truncation_sources()[kind][0], kind == "interlaced"))
        half = png_of_rows(kind, rows // 2)
        cases[f"{kind}-cut-before-IEND"] = whole[:-12]
        cases[f"{kind}-half-the-rows"] = half
        cases[f"{kind}-half-the-rows-then-cut"] = half[:-12]
    whole = png_of_rows("rgb8")
    cases["rgb8-cut-inside-IEND"] = whole[:-4]
    cases["rgb8-all-but-the-last-row"] = png_of_rows("rgb8", 47)
    cases["rgb8-cut-inside-IDAT"] = whole[: len(whole) // 2]
    cases["rgb8-cut-after-IHDR"] = whole[:33]
    return cases


def zero_png(width: int, height: int, level: int = 9) -> bytes:
    """An all-black 8-bit RGB PNG of any size, compressed row by row: a tiny file for a huge image."""
    packer = zlib.compressobj(level)
    row = bytes(1 + 3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return raw_png(width, height, idat)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares width × height but carries a few bytes of data: a lie only the header tells.
    63 bytes, not 64: Pillow loads a PNG whose data ends exactly at the end of a row without a word (the
    rows after it black), and 64 bytes are one whole row of a 21-pixel-wide RGB image (1 + 3 × 21), so a
    21 × h header decoded. 63 bytes end a row only of images 0 or 2 pixels wide, which the header rules
    refuse anyway."""
    return raw_png(width, height, zlib.compress(bytes(63)))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare width × height."""
    data = bytearray(encode(Image.fromarray(noise(16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A real small GIF whose logical screen and image descriptor declare width × height."""
    data = bytearray(encode(Image.fromarray(noise(16, 16)).convert("P"), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)  # logical screen descriptor
    pos = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    while data[pos] == 0x21:  # extension blocks: label, then sub-blocks up to a zero length
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "image descriptor expected"
    struct.pack_into("<HH", data, pos + 5, width, height)
    return bytes(data)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the next response on a raw connection, read by its Content-Length
    (none: no body), so the connection stays usable for the next one."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a whole response: {raw!r}"
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, f"closed in the middle of a body: {raw!r}"
        body += chunk
    return int(status_line.split()[1]), headers, body
