"""Odd but valid images: each is answered 200 with a reconstruction of the model's size, the JSON `input`
is exactly what carvae.preprocess.prepare makes of the bytes, and that view is the picture a person sees
(first frame, transparency on the documented white background, 16-bit scaled, EXIF rotation applied)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hostile_support import assert_healthy, encode, noise, png_rgb16
from PIL import Image
from service_fixtures import TINY, decode_png, make_settings

from carvae.preprocess import BACKGROUND, PreprocessPolicy, prepare, to_model_array, to_tensor, to_uint8
from service.main import create_app

pytest_plugins = ["service_fixtures"]

S = TINY.image_size
W, H = 60, 40  # not square, so a wrong rotation or a transposed array cannot pass
RED, BLUE, GREEN = (220, 30, 40), (20, 40, 210), (30, 200, 60)


@pytest.fixture(scope="module")
def client(service_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(service_checkpoint)), raise_server_exceptions=False) as c:
        yield c
        assert_healthy(c)


def policy_of(client: TestClient) -> PreprocessPolicy:
    policy: PreprocessPolicy = client.app.state.pipeline.served.policy  # type: ignore[attr-defined]
    return policy


def solid(color: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (H, W, 3)).copy()


def gradient() -> np.ndarray:
    """A smooth picture (JPEG-friendly): red across, green down, blue constant."""
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    return np.stack([x, y, np.full((H, W), 128.0)], axis=2).round().astype(np.uint8)


def on_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing onto BACKGROUND, the documented policy for transparent pixels."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return (rgb * a + np.array(BACKGROUND) * (1 - a)).round().astype(np.uint8)


# -- the cases: (file bytes, the RGB picture a person sees, tolerance in levels) ----------------------
Case = tuple[bytes, np.ndarray, float]


def animated(fmt: str) -> Case:
    frames = [Image.fromarray(solid(c)) for c in (RED, BLUE, GREEN)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=80, loop=0, **extra)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    return data, solid(RED), 0


def png16_rgb() -> Case:
    levels = np.random.default_rng(1).integers(0, 65536, size=(H, W, 3), dtype=np.uint16)
    return png_rgb16(levels), (levels >> 8).astype(np.uint8), 1  # the top byte (±1 for rounding)


def grey16(fmt: str) -> Case:
    ramp = np.linspace(0, 65535, W).round().astype(np.uint16)[None, :].repeat(H, 0)
    data = encode(Image.fromarray(ramp), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    grey = (ramp / 257.0).round().astype(np.uint8)  # full range kept: 65535 → 255, not clipped
    return data, np.repeat(grey[..., None], 3, axis=2), 1


def float_unit_tiff() -> Case:
    ramp = np.linspace(0, 1, W, dtype=np.float32)[None, :].repeat(H, 0)
    data = encode(Image.fromarray(ramp), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    grey = (ramp.astype(np.float64) * 255).round().astype(np.uint8)  # [0, 1] → 0..255, not all black
    return data, np.repeat(grey[..., None], 3, axis=2), 1


def cmyk_jpeg() -> Case:
    data = encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data, gradient(), 6


def palette_with_transparency() -> Case:
    idx = np.zeros((H, W), np.uint8)
    idx[:, W // 2 :] = 1  # left half: index 0 (transparent); right half: red
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    data = encode(img, "PNG", transparency=0)
    expected = solid(RED)
    expected[:, : W // 2] = BACKGROUND
    return data, expected, 0


def grey_alpha() -> Case:
    grey = np.full((H, W), 60, np.uint8)
    alpha = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))
    data = encode(Image.fromarray(np.stack([grey, alpha], axis=2), "LA"), "PNG")
    return data, on_background(np.repeat(grey[..., None], 3, axis=2), alpha), 1


def rgba() -> Case:
    rgb, alpha = noise(W, H, seed=4), np.random.default_rng(5).integers(0, 256, (H, W), dtype=np.uint8)
    data = encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    return data, on_background(rgb, alpha), 1


def one_bit() -> Case:
    checker = (np.indices((H, W)).sum(axis=0) // 4 % 2).astype(bool)
    data = encode(Image.fromarray(checker), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    return data, np.repeat((checker * 255).astype(np.uint8)[..., None], 3, axis=2), 0


def plain(fmt: str, **save: object) -> Callable[[], Case]:
    def make() -> Case:
        rgb = noise(W, H, seed=6)
        return encode(Image.fromarray(rgb), fmt, **save), rgb, 0

    return make


def lossy_webp() -> Case:
    return encode(Image.fromarray(gradient()), "WEBP", quality=90), gradient(), 6


CASES: dict[str, Callable[[], Case]] = {
    "gif-animated": lambda: animated("GIF"),
    "webp-animated": lambda: animated("WEBP"),
    "png-16bit-rgb": png16_rgb,
    "png-16bit-grey-I;16": lambda: grey16("PNG"),
    "tiff-16bit-grey-I;16": lambda: grey16("TIFF"),
    "tiff-float-grey-0-to-1": float_unit_tiff,
    "jpeg-cmyk": cmyk_jpeg,
    "png-palette-transparency": palette_with_transparency,
    "png-LA": grey_alpha,
    "png-RGBA": rgba,
    "png-1bit": one_bit,
    "webp-lossless": plain("WEBP", lossless=True),
    "webp-lossy": lossy_webp,
    "bmp": plain("BMP"),
    "tiff": plain("TIFF"),
    "tiff-deflate": plain("TIFF", compression="tiff_adobe_deflate"),
}


def post_json(
    client: TestClient, data: bytes, filename: str = "car", ctype: str | None = "image/png"
) -> dict:
    part = (filename, data) if ctype is None else (filename, data, ctype)
    r = client.post("/reconstruct", files={"file": part}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body: dict = r.json()
    return body


def expected_reconstruction(client: TestClient, view: np.ndarray) -> np.ndarray:
    model = client.app.state.pipeline.served.checkpoint.model  # type: ignore[attr-defined]
    with torch.inference_mode():
        return to_uint8(model.reconstruct(to_tensor(view)))[0]


def assert_close(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= atol, f"max diff {diff.max()} > {atol}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_odd_but_valid_image_gets_a_sensible_reconstruction(client: TestClient, case: str) -> None:
    data, seen, atol = CASES[case]()
    body = post_json(client, data)
    view = decode_png(base64.b64decode(body["input"]))
    assert view.shape == (S, S, 3)
    assert np.array_equal(view, prepare(data, policy_of(client)))  # the trainer's preprocessing, exactly
    # ... and it is the picture a person sees, resized the same way (bicubic overshoot: +1 level)
    assert_close(view, to_model_array(Image.fromarray(seen), policy_of(client)), atol + 1 if atol else 0)
    recon = decode_png(base64.b64decode(body["image"]))
    assert recon.shape == (S, S, 3)
    assert_close(recon, expected_reconstruction(client, view), 1)
    assert len(body["mu"]) == TINY.latent_dim and np.isfinite(body["mu"]).all()


# -- EXIF orientation ----------------------------------------------------------------------------------
# What each EXIF orientation value asks a viewer to do to the stored pixels (the TIFF/EXIF spec).
ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # rotate 90° clockwise
    7: lambda a: np.rot90(a[:, ::-1], k=-1),  # mirror, then rotate 90° clockwise
    8: lambda a: np.rot90(a, k=1),
}


def with_orientation(rgb: np.ndarray, value: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    save: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {}
    return encode(Image.fromarray(rgb), fmt, exif=exif.tobytes(), **save)


@pytest.mark.parametrize("orientation", sorted(ORIENT))
def test_exif_orientation_is_applied_before_resizing(client: TestClient, orientation: int) -> None:
    stored = noise(W, H, seed=orientation)  # 60 wide, 40 high as stored
    upright = np.ascontiguousarray(ORIENT[orientation](stored))  # as a viewer shows it
    got = decode_png(
        base64.b64decode(post_json(client, with_orientation(stored, orientation, "PNG"))["input"])
    )
    want = prepare(encode(Image.fromarray(upright), "PNG"), policy_of(client))
    assert np.array_equal(got, want)
    if orientation != 1:  # the test can tell: ignoring the tag gives another picture
        assert not np.array_equal(got, prepare(encode(Image.fromarray(stored), "PNG"), policy_of(client)))


@pytest.mark.parametrize("resize", ["stretch", "center-crop", "pad"])
def test_exif_rotated_photo_equals_the_physically_rotated_one_under_every_resize_policy(resize: str) -> None:
    """A phone photo: a 3:2 JPEG stored sideways with orientation 6. Whatever the policy does to the
    aspect ratio (stretch, crop the long side, pad the short side), it must act on the upright picture."""
    policy = PreprocessPolicy(image_size=S, resize=resize)
    stored = gradient()[:, ::-1].copy()
    tagged = with_orientation(stored, 6, "JPEG")
    rotated = encode(Image.fromarray(np.ascontiguousarray(ORIENT[6](stored))), "JPEG", quality=95)
    got, want = prepare(tagged, policy), prepare(rotated, policy)
    # JPEG blocks fall differently on the two files: a few levels; a wrong orientation is off by ~100
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 3
    unrotated = prepare(encode(Image.fromarray(stored), "JPEG", quality=95), policy)
    assert np.abs(got.astype(int) - unrotated.astype(int)).mean() > 20


# -- the bytes decide, not the names -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("filename", "ctype"),
    [
        ("car", None),
        ("blob.bin", "application/octet-stream"),
        ("car.jpg", "image/jpeg"),
        ("x.txt", "text/plain"),
    ],
)
def test_the_format_is_sniffed_from_the_bytes(client: TestClient, filename: str, ctype: str | None) -> None:
    data, _, _ = plain("WEBP", lossless=True)()
    reference = post_json(client, data, "car.webp", "image/webp")
    body = post_json(client, data, filename, ctype)
    assert body["input"] == reference["input"] and body["image"] == reference["image"]
