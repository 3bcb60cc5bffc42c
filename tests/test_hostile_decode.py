"""Property tests of the decode path (carvae.preprocess): whatever the bytes, `prepare` either returns the
model's (S, S, 3) uint8 view or raises ImageError with a known code and HTTP status, never anything else;
and every valid image of any mode, size and format within the limits is accepted."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hostile_support import (
    encode,
    header_only_png,
    png_chunk,
    png_of_rows,
    truncated_pngs,
    truncation_sources,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from carvae.preprocess import DecodeLimits, ImageError, PreprocessPolicy, decode_image, prepare

# Each code with its one HTTP status; the service maps ImageError.status straight onto the response.
CODES = {
    "empty_file": 400,
    "unsupported_media_type": 415,
    "corrupt_image": 422,
    "image_too_small": 422,
    "bad_aspect_ratio": 422,
    "image_too_large": 413,
}
LIMITS = DecodeLimits(max_pixels=1_000_000)
POLICIES = [
    PreprocessPolicy(image_size=16),
    PreprocessPolicy(image_size=32, resize="center-crop"),
    PreprocessPolicy(image_size=64, resize="pad", resample="lanczos"),
]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns, then copes or fails
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def prepare_or_image_error(data: bytes, policy: PreprocessPolicy) -> np.ndarray | ImageError:
    try:
        out = prepare(data, policy, LIMITS)
    except ImageError as e:  # anything else propagates and fails the test
        assert CODES[e.code] == e.status, (e.code, e.status)
        assert e.message and "\n" not in e.message.strip()
        return e
    s = policy.image_size
    assert out.shape == (s, s, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    return out


# -- valid images of every mode, size and format --------------------------------------------------------
# (mode, formats that can store it)
MODES: dict[str, tuple[str, ...]] = {
    "RGB": ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"),
    "RGBA": ("PNG", "WEBP", "TIFF"),
    "L": ("PNG", "JPEG", "BMP", "GIF", "TIFF"),
    "LA": ("PNG",),
    "P": ("PNG", "GIF", "BMP", "TIFF"),
    "1": ("PNG", "BMP", "TIFF", "GIF"),
    "CMYK": ("JPEG", "TIFF"),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
    "YCbCr": ("JPEG",),
}


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[bytes, str, str, tuple[int, int]]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    short = draw(st.integers(8, 96))
    long = draw(st.integers(short, min(10 * short, 400)))
    w, h = (long, short) if draw(st.booleans()) else (short, long)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I;16", "I"):
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert(mode)
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32) * 255)
    elif mode == "LA":
        img = rgb.convert("LA")
    else:
        img = rgb.convert(mode)
    if mode == "P" and draw(st.booleans()):
        img.info["transparency"] = 0
    return encode(img, fmt), mode, fmt, (w, h)


@FAST
@given(image=valid_images(), policy=st.sampled_from(POLICIES))
def test_every_valid_image_is_accepted(
    image: tuple[bytes, str, str, tuple[int, int]], policy: PreprocessPolicy
) -> None:
    data, mode, fmt, size = image
    decoded = decode_image(data, LIMITS)
    assert decoded.mode == "RGB" and decoded.size == size, (mode, fmt)
    out = prepare_or_image_error(data, policy)
    assert isinstance(out, np.ndarray), (mode, fmt, size, out)


# -- hostile bytes ----------------------------------------------------------------------------------------
@FAST
@given(data=st.binary(max_size=4096), policy=st.sampled_from(POLICIES))
def test_random_bytes_are_refused_cleanly(data: bytes, policy: PreprocessPolicy) -> None:
    prepare_or_image_error(data, policy)


SEEDS: list[bytes] = []


def seeds() -> list[bytes]:
    """One small valid file per format and interesting mode, mutated by the test below."""
    if not SEEDS:
        rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
        grey16 = Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
        exif = Image.Exif()
        exif[0x0112] = 6
        SEEDS.extend(
            [
                encode(rgb, "PNG"),
                encode(rgb.convert("P"), "PNG", transparency=3),
                encode(grey16, "PNG"),
                encode(rgb, "JPEG", exif=exif.tobytes()),
                encode(rgb.convert("CMYK"), "JPEG"),
                encode(rgb, "WEBP"),
                encode(rgb, "WEBP", lossless=True),
                encode(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)]),
                encode(rgb, "BMP"),
                encode(rgb, "TIFF", compression="tiff_lzw"),
                encode(grey16, "TIFF"),
            ]
        )
    return SEEDS


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "header-byte"]))
        n = len(data)
        if kind == "flip" and n:
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif kind == "header-byte" and n:  # sizes, chunk lengths and offsets live in the first bytes
            data[draw(st.integers(0, min(n, 64) - 1))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[draw(st.integers(0, n)) :]
        elif kind == "insert":
            at = draw(st.integers(0, n))
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "splice" and n > 8:
            a, b = draw(st.integers(0, n - 4)), draw(st.integers(0, n - 4))
            data[a : a + 4] = data[b : b + 4]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_images(), policy=st.sampled_from(POLICIES))
def test_mutated_images_decode_or_are_refused_cleanly(data: bytes, policy: PreprocessPolicy) -> None:
    prepare_or_image_error(data, policy)


# -- the limits, from the header alone ------------------------------------------------------------------
@FAST
@given(w=st.integers(0, 200_000), h=st.integers(0, 200_000))
def test_size_limits_are_judged_from_the_header(w: int, h: int) -> None:
    """Headers that declare any size (with almost no data): the verdict follows the documented rules in
    their order: pixel count (413), smallest side (422), aspect ratio (422); otherwise the missing data."""
    result = prepare_or_image_error(header_only_png(w, h), POLICIES[0])
    assert isinstance(result, ImageError)
    if w * h > LIMITS.max_pixels:
        assert result.code == "image_too_large"
    elif min(w, h) == 0:  # Pillow itself refuses a 0-wide PNG header
        assert result.code in ("image_too_small", "corrupt_image")
    elif min(w, h) < LIMITS.min_side:
        assert result.code == "image_too_small"
    elif max(w, h) / min(w, h) > LIMITS.max_aspect:
        assert result.code == "bad_aspect_ratio"
    else:
        assert result.code == "corrupt_image"  # a fine size, but the pixels are not there


@pytest.mark.parametrize("size", [(8, 8), (80, 8), (8, 80), (1000, 1000)])
def test_sizes_at_the_limits_are_accepted(size: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", size, (10, 20, 30)), "PNG")
    assert isinstance(prepare_or_image_error(data, POLICIES[0]), np.ndarray)


@pytest.mark.parametrize(
    ("size", "code"),
    [((7, 8), "image_too_small"), ((81, 8), "bad_aspect_ratio"), ((1001, 1000), "image_too_large")],
)
def test_sizes_just_past_the_limits_are_refused(size: tuple[int, int], code: str) -> None:
    result = prepare_or_image_error(encode(Image.new("RGB", size), "PNG"), POLICIES[0])
    assert isinstance(result, ImageError) and result.code == code


def tiff_claiming(width: int, height: int) -> bytes:
    """A small little-endian TIFF whose ImageWidth/ImageLength entries are rewritten as LONGs."""
    data = bytearray(encode(Image.new("L", (16, 16)), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # type 4 = LONG, count 1, value inline
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def test_a_tiff_bomb_is_refused_from_its_header() -> None:
    bomb = tiff_claiming(50_000, 50_000)
    assert Image.open(io.BytesIO(bomb)).size == (50_000, 50_000)
    result = prepare_or_image_error(bomb, POLICIES[0])
    assert isinstance(result, ImageError) and result.code == "image_too_large"


# -- incomplete files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(truncation_sources()))
def test_the_whole_files_the_truncation_cases_are_cut_from_decode_exactly(kind: str) -> None:
    pixels, *_ = truncation_sources()[kind]
    decoded = Image.open(io.BytesIO(png_of_rows(kind)))
    decoded.load()
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
    assert isinstance(prepare_or_image_error(png_of_rows(kind), POLICIES[0]), np.ndarray)


@pytest.mark.parametrize("case", sorted(truncated_pngs()))
def test_a_truncated_png_is_refused_not_decoded_with_blank_rows(case: str) -> None:
    """Pillow decodes a PNG cut after its image data, or whose data ends at a row boundary, filling the
    missing rows with black; the decode path refuses them like any other truncated file."""
    result = prepare_or_image_error(truncated_pngs()[case], POLICIES[0])
    assert isinstance(result, ImageError), "decoded"
    assert result.code == "corrupt_image" and "truncated" in result.message


@pytest.mark.parametrize(
    "extra",
    [b"", b"trailing garbage after IEND" * 4, png_chunk(b"tEXt", b"Comment\0after IEND")],
    ids=["plain", "garbage-after-IEND", "chunk-after-IEND"],
)
@pytest.mark.parametrize("bottom", ["black", "transparent"])
def test_whole_pngs_with_a_blank_bottom_or_bytes_after_iend_are_accepted(extra: bytes, bottom: str) -> None:
    """The rows Pillow leaves blank look like a black (or fully transparent) bottom row, which real photos
    have: those are told apart by the data, not refused."""
    mode, fill = ("RGB", (0, 0, 0)) if bottom == "black" else ("RGBA", (0, 0, 0, 0))
    img = Image.new(mode, (40, 30), fill)
    img.paste(Image.new(mode, (40, 20), (200, 100, 50, 255)[: len(mode)]))
    data = encode(img, "PNG", pnginfo=_ancillary()) + extra
    out = decode_image(data)
    assert out.size == (40, 30) and out.getpixel((0, 0)) == (200, 100, 50)


def _ancillary() -> PngInfo:
    info = PngInfo()
    info.add_text("Software", "a camera")
    info.add_text("Comment", "zTXt chunk", zip=True)
    return info
