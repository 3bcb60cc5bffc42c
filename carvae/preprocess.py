"""The ONLY code that turns image bytes into model tensors and model tensors back into image bytes.

Trainer and service both call `decode_image` + `to_model_array` with the policy stored in the checkpoint,
so an image is prepared identically at training and serving time.

Decoding is defensive: the container format is sniffed from the bytes (never the file name or content
type), the pixel count is checked from the header before any pixel is allocated, and every PIL failure is
turned into an `ImageError` with a stable code.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from carvae import png_integrity

# Formats we accept; restricting PIL's plugins means PDF/EPS/SVG-like inputs are never handed to a decoder.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Transparent pixels are composited onto this colour (documented in the README).
BACKGROUND = (255, 255, 255)
RESIZE_POLICIES = ("stretch", "center-crop", "pad")
# The preprocessing this code implements. A checkpoint recorded with another version was trained on inputs
# this code cannot reproduce, so it is refused rather than served with different preprocessing.
PREPROCESS_VERSION = 1
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}

# PIL's own bomb guard would fire on the library-wide default; our per-call limit replaces it.
Image.MAX_IMAGE_PIXELS = None
# Malformed files make Pillow warn (corrupt EXIF, oversized tags...) before it fails or copes; we answer
# with an ImageError instead. A filter set once, because warnings.catch_warnings() swaps process-wide
# state and is not safe in the service's decode threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# _DECODE_ERRORS: Pillow documents no closed set of exceptions for malformed input (KeyError, struct.error,
# ZeroDivisionError... all occur) and its own fuzzers treat any Exception as a rejection, so decode_image
# turns every Exception from Pillow into an ImageError; a property test holds it to that.


class FootprintExceeded(Exception):
    """Raised by decode_image before decoding when the image would take more memory than the caller
    allows at once: the caller decides when to decode it (the service's decode budget)."""

    def __init__(self, footprint: int) -> None:
        super().__init__(f"decoding takes about {footprint} bytes")
        self.footprint = footprint


class ImageError(ValueError):
    """A rejected image. `code` is stable and machine-readable; `status` is the HTTP status it maps to."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000  # width × height from the header, checked before decoding
    min_side: int = 8  # smaller images carry too little to reconstruct
    max_aspect: float = 10.0  # longer side / shorter side


@dataclass(frozen=True)
class PreprocessPolicy:
    """How a photo becomes a model input. Stored in every checkpoint; the service uses the stored one."""

    image_size: int = 64
    resize: str = "stretch"  # whole photo resized to the square (no crop, no padding)
    resample: str = "bicubic"
    background: tuple[int, int, int] = BACKGROUND
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.version != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {self.version!r} is not the one this carvae implements "
                f"({PREPROCESS_VERSION})"
            )
        if type(self.image_size) is not int or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {tuple(_RESAMPLE)}, got {self.resample!r}")
        bg = tuple(self.background)
        if len(bg) != 3 or any(type(c) is not int or not 0 <= c <= 255 for c in bg):
            raise ValueError(f"background must be three integers from 0 to 255, got {list(bg)}")
        object.__setattr__(self, "background", bg)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["background"] = list(self.background)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessPolicy:
        return cls(
            **{k: d[k] for k in ("image_size", "resize", "resample", "background", "version") if k in d}
        )


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16/32-bit greyscale: PIL's convert() clips to 0..255 instead of scaling, which whitens the image.
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # a float image in [0, 1], the usual convention (was decoded black)
        elif mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _openable_formats() -> tuple[str, ...]:
    # Pillow opens MPO through its JPEG opener and registers no "MPO" opener; naming one raises KeyError.
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def _sniff(data: bytes) -> str | None:
    """The accepted format whose magic bytes `data` starts with, if any (Pillow's own check)."""
    prefix = data[:16]  # what Image.open hands each plugin's accept()
    for fmt in _openable_formats():
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(prefix):
            return fmt
    return None


def decode_image(
    data: bytes,
    limits: DecodeLimits | None = None,
    draft_size: int | None = None,
    max_footprint: int | None = None,
) -> Image.Image:
    """Bytes of any accepted format -> an RGB PIL image, EXIF orientation applied, first frame only.

    `draft_size` lets JPEG decode at a reduced DCT scale that still covers the target size — a large
    speed-up for big photos that trainer and service share because both pass the policy's size.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise ImageError("empty_file", "the uploaded file is empty", 400)
    try:
        img = Image.open(io.BytesIO(data), formats=_openable_formats())
    except UnidentifiedImageError:
        if (fmt := _sniff(data)) is not None:  # the right magic bytes, then a header Pillow refused
            raise ImageError("corrupt_image", f"the {fmt} header is invalid or truncated", 422) from None
        raise ImageError(
            "unsupported_media_type",
            "the file is not an image in a supported format ("
            + ", ".join(f.lower() for f in ACCEPTED_FORMATS)
            + ")",
            415,
        ) from None
    except Exception as e:  # see _DECODE_ERRORS
        raise ImageError("corrupt_image", f"the image header could not be read: {e}", 422) from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(
            "image_too_large", f"image is {w}×{h} = {w * h} pixels; the limit is {limits.max_pixels}", 413
        )
    if min(w, h) < limits.min_side:
        raise ImageError(
            "image_too_small", f"image is {w}×{h}; each side must be at least {limits.min_side} px", 422
        )
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageError(
            "bad_aspect_ratio",
            f"image is {w}×{h}; the aspect ratio must be at most {limits.max_aspect:g}:1",
            422,
        )
    if img.format == "PNG" and (problem := png_integrity.missing_end(data)):
        raise ImageError("corrupt_image", f"the PNG file is truncated: {problem}", 422)
    if max_footprint is not None and (footprint := _footprint(img, draft_size)) > max_footprint:
        raise FootprintExceeded(footprint)
    try:
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        # The cheap may_be_short first: short_pixel_data inflates the data again.
        if (
            img.format == "PNG"
            and png_integrity.may_be_short(img)
            and (problem := png_integrity.short_pixel_data(data))
        ):
            raise ImageError("corrupt_image", f"the PNG file is truncated: {problem}", 422)
        # exif_transpose after load: it needs the decoded pixels and the EXIF block.
        oriented: Image.Image = ImageOps.exif_transpose(img) or img
        return _to_rgb(oriented, BACKGROUND)
    except ImageError:
        raise
    except (Image.DecompressionBombError, MemoryError) as e:
        raise ImageError("image_too_large", f"the image is too large to decode ({e})", 413) from None
    except Exception as e:  # see _DECODE_ERRORS
        raise ImageError("corrupt_image", f"the image data is corrupt or truncated ({e})", 422) from None


# Peak bytes per pixel of `prepare` by the mode an image decodes to: the decoded pixels plus the RGB
# (and alpha-composited) copies made from them. Measured 2026-11-30 with Pillow on 16 M-pixel images,
# each in a fresh process (peak RSS minus RSS before): RGB 8, RGBA/LA 24, L/P/1 6, I;16 28, F 32, CMYK 12;
# WebP decodes through a buffer of its own (RGB 16).
_PEAK_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 6, "RGB": 8, "CMYK": 12, "YCbCr": 12, "RGBA": 24, "LA": 24}
_PEAK_BYTES_OTHER = 32  # 16-bit and float modes, and anything not measured
_WEBP_EXTRA = 8


def decode_footprint(data: bytes, draft_size: int | None = None) -> int:
    """About how many bytes decoding `data` with `prepare` holds at its peak, from the header alone
    (nothing is decoded). 0 when the header cannot be read: decode_image reports that."""
    try:
        with Image.open(io.BytesIO(data), formats=_openable_formats()) as img:
            return _footprint(img, draft_size)
    except Exception:
        return 0


def _footprint(img: Image.Image, draft_size: int | None) -> int:
    """decode_footprint of an opened (not yet loaded) image."""
    (w, h), mode, fmt = img.size, img.mode, img.format
    if mode == "P" and "transparency" in img.info:
        mode = "RGBA"  # _to_rgb composites it through RGBA (measured 2026-11-30: ~17 B/px)
    if draft_size and fmt in ("JPEG", "MPO"):
        # decode_image decodes a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the size.
        scale = 1
        while scale < 8 and min(w, h) // (2 * scale) >= draft_size:
            scale *= 2
        w, h = -(-w // scale), -(-h // scale)
    per_pixel = _PEAK_BYTES_PER_PIXEL.get(mode, _PEAK_BYTES_OTHER) + (_WEBP_EXTRA if fmt == "WEBP" else 0)
    return w * h * per_pixel


def to_model_array(img: Image.Image, policy: PreprocessPolicy) -> np.ndarray:
    """RGB image -> (S, S, 3) uint8 array following the policy."""
    s = policy.image_size
    resample = _RESAMPLE[policy.resample]
    if policy.resize == "center-crop":
        img = ImageOps.fit(img, (s, s), method=resample)
    elif policy.resize == "pad":
        img = ImageOps.pad(img, (s, s), method=resample, color=policy.background)
    elif img.size != (s, s):
        img = img.resize((s, s), resample)
    return np.asarray(img, dtype=np.uint8).copy()


def prepare(
    data: bytes,
    policy: PreprocessPolicy,
    limits: DecodeLimits | None = None,
    max_footprint: int | None = None,
) -> np.ndarray:
    """Bytes -> (S, S, 3) uint8, the model's view of the image. FootprintExceeded, before decoding, when
    that would take more than `max_footprint` bytes."""
    image = decode_image(data, limits, draft_size=policy.image_size, max_footprint=max_footprint)
    return to_model_array(image, policy)


def to_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1]."""
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        batch = batch.copy()  # torch warns on (and must not alias) read-only buffers, e.g. PIL's
    t = torch.as_tensor(batch)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) float in [0, 1] -> (N, S, S, 3) uint8."""
    t = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows·H, cols·W, 3) uint8 grid, row-major."""
    n, h, w, c = images.shape
    ncol = max(1, min(nrow, n))
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(
    array: np.ndarray, fmt: str = "png", quality: int = 95, png_compress_level: int = 1
) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes. PNG level 1: these are tiny images, and level 6+ costs several
    times the CPU for a few percent fewer bytes."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"format must be one of {tuple(IMAGE_FORMATS)}, got {fmt!r}")
    buf = io.BytesIO()
    img = Image.fromarray(array, "RGB")
    if fmt == "png":
        img.save(buf, "PNG", compress_level=png_compress_level)
    else:
        img.save(buf, IMAGE_FORMATS[fmt], quality=quality)
    return buf.getvalue()
