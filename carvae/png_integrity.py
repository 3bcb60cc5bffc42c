"""Is a PNG whole? Pillow decodes two kinds of incomplete PNG without an error, leaving the rows it never
received black: a file cut off after its compressed image data (the rest of the file, IEND included, is
missing), and a file whose compressed data ends cleanly before every row the header declares is there.
An upload cut off in transit, or a photo half-copied into the training folder, is the first kind.

JPEG, WebP, BMP and TIFF cut short make Pillow raise (checked with Pillow 12.3), so only PNG needs this.
GIF is left as it is: Pillow decodes a GIF cut after its first frame (later frames or the trailer byte
missing), but that frame, the only one read, is complete.

Pillow's own `verify()` is not used: it also checks the CRCs of the image data and the chunks after it,
which decoding does not (files with a bad IDAT CRC decode today), and it does not see pixel data that
ends early.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from PIL import Image

_SIGNATURE_LEN = 8
_CHUNK_OVERHEAD = 12  # length, type, CRC
# (first column, first row, column step, row step) of the seven Adam7 passes
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_INFLATE_STEP = 1 << 16  # bytes inflated at a time: counting never holds the whole image


def missing_end(data: bytes) -> str | None:
    """Why the file ends before its IEND chunk, or None when every chunk up to IEND is whole.

    Bytes after IEND are ignored, as Pillow ignores them. Cheap: a few header reads per chunk, no CRCs.
    """
    for tag, pos, length in _chunks(data):
        if pos + length + _CHUNK_OVERHEAD > len(data):
            name = tag.decode("latin-1")
            return f"it ends inside its {name} chunk, {len(data) - pos} of {length + _CHUNK_OVERHEAD} bytes"
        if tag == b"IEND":
            return None
    return "it ends before the IEND chunk that closes every PNG"


def may_be_short(img: Image.Image) -> bool:
    """Whether a decoded PNG could lack rows: Pillow leaves the rows it never received all zero, and the
    last row of the image (non-interlaced) or of Adam7's last pass (the last odd row) is written last.
    A cheap filter in front of `short_pixel_data`, which costs about as much as the decode did."""
    w, h = img.size
    return any(not img.crop((0, y, w, y + 1)).tobytes().strip(b"\0") for y in range(max(0, h - 2), h))


def short_pixel_data(data: bytes) -> str | None:
    """Why the compressed image data holds fewer bytes than the header declares, or None when it holds
    them all. Call it on a file that `missing_end` passed."""
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type, interlace = data[24], data[25], data[28]
    bits = _CHANNELS.get(colour_type, 0) * bit_depth
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        cols, rows = _ceil_div(width - x0, dx), _ceil_div(height - y0, dy)
        if cols > 0 and rows > 0:
            expected += rows * (1 + _ceil_div(cols * bits, 8))  # each row: a filter byte, then the pixels
    inflater, got = zlib.decompressobj(), 0
    try:
        for idat in _idat_chunks(data):
            chunk: bytes | memoryview = idat
            while chunk and got < expected and not inflater.eof:
                got += len(inflater.decompress(chunk, _INFLATE_STEP))
                chunk = inflater.unconsumed_tail
    except zlib.error as e:
        return f"its image data is corrupt ({e})"
    if got < expected:
        return f"its image data holds {got} of the {expected} bytes its {width}×{height} header declares"
    return None


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, data length) of each chunk whose header is in the file, up to IEND included."""
    pos = _SIGNATURE_LEN
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        tag = data[pos + 4 : pos + 8]
        yield tag, pos, length
        if tag == b"IEND":
            return
        pos += length + _CHUNK_OVERHEAD


def _idat_chunks(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for tag, pos, length in _chunks(data):
        if tag == b"IDAT":
            yield view[pos + 8 : pos + 8 + length]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
