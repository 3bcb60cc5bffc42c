"""Bad input, in-process: every kind of broken upload or body gets a 4xx JSON error that names the
problem, never a 500, and the service keeps serving (checked after every test)."""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hostile_support import (
    assert_error,
    assert_healthy,
    encode,
    gif_claiming,
    header_only_png,
    jpeg_claiming,
    noise,
    raw_png,
    truncated_pngs,
    zero_png,
)
from PIL import Image, ImageFile
from pydantic import ValidationError
from service_fixtures import TINY, make_settings, photo_bytes

from service.main import create_app
from service.schemas import DecodeRequest, SampleRequest

pytest_plugins = ["service_fixtures"]

D = TINY.latent_dim
JSON = {"content-type": "application/json"}
IMAGE_ROUTES = ("/reconstruct", "/encode")


@pytest.fixture(scope="module")
def client(service_checkpoint: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(service_checkpoint))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(autouse=True)
def still_healthy(client: TestClient) -> Iterator[None]:
    yield
    assert_healthy(client)


def post_file(client: TestClient, data: bytes, route: str = "/reconstruct", **part: Any) -> Any:
    name = part.get("name", "file")
    return client.post(
        route, files={name: (part.get("filename", "car.png"), data, part.get("ctype", "image/png"))}
    )


# -- the multipart envelope ------------------------------------------------------------------------
@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_no_body_at_all_is_a_missing_field(client: TestClient, route: str) -> None:
    err = assert_error(client.post(route), 422, "missing_field")
    assert "file" in err["message"]


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_empty_file_part(client: TestClient, route: str) -> None:
    err = assert_error(post_file(client, b"", route), 400, "empty_file")
    assert "empty" in err["message"]


@pytest.mark.parametrize("name", ["image", "File", "file ", ""])
def test_misnamed_field(client: TestClient, name: str) -> None:
    err = assert_error(post_file(client, photo_bytes(), name=name), 422, "missing_field")
    assert "body.file" in err["message"]


@pytest.mark.parametrize("name", ["image", "photo"])
def test_a_misnamed_part_is_named_beside_the_missing_one(client: TestClient, name: str) -> None:
    err = assert_error(post_file(client, photo_bytes(), name=name), 422, "missing_field")
    assert err["message"] == (
        f"body.file: Field required; unknown field '{name}' (extra fields are not permitted; "
        "the fields are file)"
    )


@pytest.mark.parametrize(
    ("route", "extra", "words"),
    [
        ("/reconstruct", {"format": "jpeg"}, "the fields are file; format goes in the query string"),
        (
            "/encode",
            {"steps": "8"},
            "unknown field 'steps' (extra fields are not permitted; the fields are file)",
        ),
        ("/interpolate", {"extra": "1", "more": "2"}, "unknown field 'extra' and 1 more"),
    ],
)
def test_a_part_the_route_does_not_take_is_refused_not_ignored(
    client: TestClient, route: str, extra: dict[str, str], words: str
) -> None:
    """`-F format=jpeg` answered PNG and `-F steps=8` on /encode was dropped without a word, while an
    unknown JSON field is refused: a form part the route does not take is refused too."""
    png = photo_bytes()
    names = ("file_a", "file_b") if route == "/interpolate" else ("file",)
    files = {name: ("car.png", png, "image/png") for name in names}
    err = assert_error(client.post(route, files=files, data=extra), 422, "validation_error")
    assert words in err["message"], err


@pytest.mark.parametrize("route", ["/reconstruct", "/encode", "/interpolate"])
@pytest.mark.parametrize(
    "ctype",
    ["image/jpeg", "application/octet-stream", "application/json", "application/x-www-form-urlencoded", None],
)
def test_a_body_that_is_not_a_form_says_to_send_multipart(
    client: TestClient, route: str, ctype: str | None
) -> None:
    """A photo posted as the raw body (`--data-binary @car.jpg`, requests' `data=`) was answered only
    "body.file: Field required", with the file right there in the body (and, as curl's default
    urlencoded form, with its bytes named back as unknown fields)."""
    headers = {"content-type": ctype} if ctype else {}
    err = assert_error(client.post(route, content=photo_bytes(), headers=headers), 422, "validation_error")
    parts = "file_a, file_b" if route == "/interpolate" else "file"
    assert err["message"].startswith(
        f"the body must be multipart/form-data with the part(s) {parts} (curl -F"
    )
    assert err["message"].endswith(f"got {f'Content-Type {ctype}' if ctype else 'no Content-Type'}"), err


@pytest.mark.parametrize("route", ["/reconstruct", "/encode", "/interpolate"])
@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "image/jpeg"])
def test_a_photo_of_a_real_size_posted_as_the_raw_body_gets_the_same_advice(
    client: TestClient, route: str, ctype: str
) -> None:
    """The advice above reached only small photos. FastAPI parses an urlencoded body (curl's
    `--data-binary @car.jpg`) into fields before any check of the route runs, and a photo of a real size
    ended there in a 400 "Too many fields. Maximum number of fields is 1000." (its bytes hold `&`s) or
    "Field exceeded maximum size of 1024KB." (they do not): words about sizes, not about the form."""
    with_ampersands = photo_bytes(600, 400)  # ~720 KB of noise: thousands of `&`
    assert with_ampersands.count(b"&") > 1000
    without = with_ampersands.replace(b"&", b"x") + b"x" * 2**20  # one field over 1 MiB
    parts = "file_a, file_b" if route == "/interpolate" else "file"
    for body in (with_ampersands, without):
        r = client.post(route, content=body, headers={"content-type": ctype})
        err = assert_error(r, 422, "validation_error")
        assert err["message"].startswith(f"the body must be multipart/form-data with the part(s) {parts}"), (
            err
        )


@pytest.mark.parametrize("route", ["/reconstruct", "/encode", "/interpolate"])
def test_a_photo_part_without_a_filename_is_told_so_whatever_its_size(client: TestClient, route: str) -> None:
    """A part without a filename is a text field to the form parser, not a file (OkHttp's
    `createFormData(name, null, body)`, curl's `-F 'file=<car.jpg'`, requests' `(None, data)`). A small
    photo sent so was told "must be a file: a multipart part with a filename"; one over 1 MiB, as most
    photos are, got Starlette's 400 "Part exceeded maximum size of 1024KB.", which reads as an upload
    limit ten times below the documented one."""
    names = ("file_a", "file_b") if route == "/interpolate" else ("file",)
    small, large = photo_bytes(), photo_bytes(800, 600)
    assert len(small) < 2**20 < len(large)
    for photo in (small, large):
        files = {name: (None, photo, "image/png") for name in names}
        err = assert_error(client.post(route, files=files), 422, "validation_error")
        assert "with a filename (curl -F 'file=@car.jpg')" in err["message"], err


def test_interpolate_names_the_missing_part(client: TestClient) -> None:
    r = client.post("/interpolate", files={"file_a": ("a.png", photo_bytes(), "image/png")})
    assert "file_b" in assert_error(r, 422, "missing_field")["message"]


@pytest.mark.parametrize(
    ("route", "name"), [("/reconstruct", "file"), ("/encode", "file"), ("/interpolate", "file_a")]
)
def test_two_parts_with_the_same_name(client: TestClient, route: str, name: str) -> None:
    parts = [
        (name, ("a.png", photo_bytes(seed=1), "image/png")),
        (name, ("b.png", photo_bytes(seed=2), "image/png")),
    ]
    if name == "file_a":
        parts.append(("file_b", ("c.png", photo_bytes(), "image/png")))
    err = assert_error(client.post(route, files=parts), 422, "validation_error")
    assert f"one '{name}' part, got 2" in err["message"]


def test_file_sent_as_a_plain_form_field(client: TestClient) -> None:
    r = client.post("/reconstruct", files={"file": (None, b"not a file")})  # a part without a filename
    err = assert_error(r, 422, "validation_error")
    assert err["message"].startswith("body.file: must be a file") and "UploadFile" not in err["message"]


@pytest.mark.parametrize(
    ("body", "ctype", "words"),
    [
        (b"whatever", "multipart/form-data", "boundary"),
        (b"--zz\r\nContent-Disposition: form-data\r\n\r\nx", "multipart/form-data; boundary=zz", "name"),
        (b'{"file": "x"}', "application/json", "file"),
        (b"\x00\xff" * 100, "application/octet-stream", "file"),
    ],
)
def test_malformed_or_foreign_envelopes(client: TestClient, body: bytes, ctype: str, words: str) -> None:
    r = client.post("/reconstruct", content=body, headers={"content-type": ctype})
    err = assert_error(r, r.status_code, ("bad_request", "missing_field", "validation_error"))
    assert r.status_code in (400, 422) and words in err["message"]


def test_too_many_parts(client: TestClient) -> None:
    parts = [(f"f{i}", (None, b"1")) for i in range(1100)] + [("file", ("a.png", photo_bytes(), "image/png"))]
    err = assert_error(client.post("/reconstruct", files=parts), 400, "bad_request")
    assert "Too many fields" in err["message"]


# -- bytes that are not a (usable) image -----------------------------------------------------------
def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("car.png", photo_bytes())
    return buf.getvalue()


NOT_IMAGES = {
    "text": b"just some text, no pixels here\n",
    "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>',
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "zip": _zip(),
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
    "ico-ish": b"\x00\x00\x01\x00" + bytes(200),
    "random": bytes(range(256)) * 8,
}


@pytest.mark.parametrize("kind", sorted(NOT_IMAGES))
@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_non_images_with_an_image_name_and_type(client: TestClient, kind: str, route: str) -> None:
    r = post_file(client, NOT_IMAGES[kind], route, filename="car.jpg", ctype="image/jpeg")
    err = assert_error(r, 415, "unsupported_media_type")
    assert "not an image in a supported format" in err["message"]


def _cut(data: bytes, keep: float) -> bytes:
    return data[: max(1, int(len(data) * keep))]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_images(client: TestClient, fmt: str, keep: float) -> None:
    data = encode(Image.fromarray(noise(64, 48)), fmt)
    # the magic bytes survive the cut, so it is a broken file of a known format, not an unknown one
    err = assert_error(post_file(client, _cut(data, keep)), 422, "corrupt_image")
    assert any(word in err["message"] for word in ("truncated", "corrupt", "header"))


@pytest.mark.parametrize("case", sorted(truncated_pngs()))
def test_a_png_cut_off_in_transit_is_refused_not_reconstructed_with_blank_rows(
    client: TestClient, case: str
) -> None:
    err = assert_error(post_file(client, truncated_pngs()[case]), 422, "corrupt_image")
    assert "truncated" in err["message"]


@pytest.mark.parametrize("cut", [8, 12, 20, 30])
def test_a_cut_inside_the_header_is_a_corrupt_image_not_an_unknown_format(
    client: TestClient, cut: int
) -> None:
    data = encode(Image.fromarray(noise(64, 48)), "PNG")
    err = assert_error(post_file(client, data[:cut]), 422, "corrupt_image")
    assert "header" in err["message"]


GARBAGE = bytes([0xFF, 0x00, 0xAB, 0x17]) * 1500


def _garbage_after_header(kind: str) -> bytes:
    if kind == "png-bad-zlib":  # IHDR and IDAT framing (lengths, CRCs) valid, the compressed data not
        return raw_png(64, 48, GARBAGE)
    if kind == "png-too-little-data":  # valid zlib stream, but a few bytes for 64×48 pixels
        return raw_png(64, 48, zlib.compress(GARBAGE[:100]))
    fmt = kind.upper()
    data = encode(Image.fromarray(noise(64, 48)), fmt)
    head = data.index(b"\xff\xda") + 14 if fmt == "JPEG" else 30  # after the scan header / VP8 header
    return data[:head] + GARBAGE[: len(data) - head]


@pytest.mark.parametrize("kind", ["png-bad-zlib", "png-too-little-data", "jpeg", "webp"])
def test_valid_header_with_garbage_data(client: TestClient, kind: str) -> None:
    err = assert_error(post_file(client, _garbage_after_header(kind)), 422, "corrupt_image")
    assert "corrupt or truncated" in err["message"]


# -- sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("w", "h"), [(0, 0), (0, 64), (1, 1), (7, 64), (64, 7), (7, 7)])
def test_zero_size_tiny_and_below_the_minimum(client: TestClient, w: int, h: int) -> None:
    # 0-pixel images cannot be written by Pillow: a raw header declares them
    data = header_only_png(w, h) if 0 in (w, h) else photo_bytes(w, h)
    err = assert_error(post_file(client, data), 422, ("image_too_small", "corrupt_image"))
    if min(w, h) > 0:
        assert err["code"] == "image_too_small" and "at least 8 px" in err["message"]


def test_the_documented_minimum_is_accepted(client: TestClient) -> None:
    assert post_file(client, photo_bytes(8, 8)).status_code == 200


@pytest.mark.parametrize(("w", "h"), [(100_000, 1), (1, 100_000), (100_000, 8), (8, 100_000), (81, 8)])
def test_extreme_aspect_ratios(client: TestClient, w: int, h: int) -> None:
    err = assert_error(post_file(client, zero_png(w, h)), 422, ("bad_aspect_ratio", "image_too_small"))
    if min(w, h) >= 8:
        assert err["code"] == "bad_aspect_ratio" and "10:1" in err["message"]


def test_aspect_ratio_at_the_limit_is_accepted(client: TestClient) -> None:
    assert post_file(client, zero_png(80, 8)).status_code == 200


# -- decompression bombs -----------------------------------------------------------------------------
BOMBS = {
    "png-100000x100000-header": lambda: header_only_png(100_000, 100_000),
    "jpeg-60000x50000-header": lambda: jpeg_claiming(60_000, 50_000),
    "gif-60000x60000-header": lambda: gif_claiming(60_000, 60_000),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_bomb_headers_are_refused_before_any_pixel_is_decoded(
    client: TestClient, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Any] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: Any) -> Any:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = BOMBS[kind]()
    assert len(data) < 2000
    err = assert_error(post_file(client, data), 413, "image_too_large")
    assert "the limit is 40000000" in err["message"]
    assert loads == [], loads  # refused from the header alone


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_a_real_bomb_costs_no_memory(client: TestClient) -> None:
    """A 12000×12000 all-black PNG: ~420 KB on the wire, 432 MB of pixels if anyone decoded it."""
    bomb = zero_png(12_000, 12_000)
    assert len(bomb) < 1_000_000
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM)
    before = _peak_rss_mb()
    assert_error(post_file(client, bomb), 413, "image_too_large")
    assert _peak_rss_mb() - before < 100, "the bomb's pixels were allocated"


# -- body limits (the streaming version with a real server is in test_hostile_uploads_server.py) -----
def test_upload_over_the_limit(service_checkpoint: Path) -> None:
    with TestClient(create_app(make_settings(service_checkpoint, MAX_UPLOAD_BYTES=8192))) as small:
        err = assert_error(post_file(small, photo_bytes(96, 96)), 413, "payload_too_large")
        assert "8192 bytes" in err["message"]
        assert_healthy(small)


# -- JSON bodies ------------------------------------------------------------------------------------
ROW = ", ".join(["0"] * D)


@pytest.mark.parametrize(
    ("route", "body", "words"),
    [
        ("/sample", b'{"n": "4"}', "n"),
        ("/sample", b'{"n": [4]}', "n"),
        ("/sample", b'{"seed": "abc"}', "seed"),
        ("/sample", b'{"temperature": "hot"}', "temperature"),
        ("/sample", b'{"n": 4, "n": 65}', "n"),
        ("/sample", b'"n=4"', "body"),
        ("/sample", b"[]", "body"),
        ("/sample", b'{"n": NaN}', "n"),
        ("/sample", b'{"temperature": NaN}', "temperature"),
        ("/sample", b'{"temperature": -Infinity}', "temperature"),
        ("/sample", b'{"temperature": 1e999}', "temperature"),
        ("/sample", b'{"n": 1e999}', "n"),
        ("/sample", b'{"n": 0}', "n"),
        ("/sample", b'{"n": 65}', "n"),
        ("/sample", b'{"n": -9223372036854775809}', "n"),
        ("/sample", b'{"seed": 1e30}', "seed"),
        ("/sample", b'{"n": ' + b"9" * 5000 + b"}", "digits"),
        ("/sample", b'{"n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("/sample", b'{"n": "\xff\xfe"}', "UTF-8"),
        ("/sample", b"{bad json", "JSON"),
        ("/decode", b"", "body"),
        ("/decode", b"null", "body"),
        ("/decode", b'{"z": "0,0"}', "z"),
        ("/decode", b'{"z": {"0": [0]}}', "z"),
        ("/decode", b'{"z": [[[0]]]}', "z"),
        ("/decode", b'{"z": [[' + ROW.encode() + b", 0]]}", "latent_dim"),
        ("/decode", b'{"z": [[' + ", ".join(["0"] * 4097).encode() + b"]]}", "z"),
        ("/decode", b'{"z": [[NaN' + b", 0" * (D - 1) + b"]]}", "finite"),
        ("/decode", b'{"z": [[-Infinity' + b", 0" * (D - 1) + b"]]}", "finite"),
        ("/decode", b'{"z": [[1e999' + b", 0" * (D - 1) + b"]]}", "z"),
        ("/decode", b'{"z": [[1e300' + b", 0" * (D - 1) + b"]]}", "1000"),
        ("/decode", b'{"z": [[true' + b", 0" * (D - 1) + b"]]}", "z"),
        ("/decode", b'{"z": [[' + ROW.encode() + b']], "extra": Infinity}', "extra"),
        ("/decode", b'{"z": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("/decode", b'{"z": [' + ROW.encode() + b"]}", "send [[...]], not [...]"),  # one flat vector
    ],
)
def test_bad_json_bodies_are_422_and_never_echo_the_input(
    client: TestClient, route: str, body: bytes, words: str
) -> None:
    err = assert_error(
        client.post(route, content=body, headers=JSON), 422, ("validation_error", "missing_field")
    )
    assert words in err["message"], err
    assert "NaN" not in err["message"] and "Infinity" not in err["message"]  # the input is never echoed
    assert len(err["message"]) <= 1000


@pytest.mark.parametrize("route", ["/sample", "/decode"])
@pytest.mark.parametrize(("body", "offset"), [(b"{bad json", 1), (b'{"n": 2,}', 8), (b'{"z": [[1]]', 11)])
def test_a_json_syntax_error_says_where_in_words(
    client: TestClient, route: str, body: bytes, offset: int
) -> None:
    """FastAPI puts the error's character offset into the location: the message read `body.8: body is
    not valid JSON (...)`, as if `8` were a field of the body."""
    err = assert_error(client.post(route, content=body, headers=JSON), 422, "validation_error")
    assert err["message"].startswith("body is not valid JSON ("), err
    assert err["message"].endswith(f" at character {offset})"), err


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/sample", b'{"count": 4}', "body: unknown field 'count' (extra fields are not permitted; "),
        ("/sample", b'{"n": "4"}', "body.n: must be a JSON number"),
        ("/decode", b'{"z": [0, 1]}', "body.z: z is a list of latent vectors, one list per image: "),
        ("/decode", b'{"z": [["a"]]}', "body.z: z[0][0] should be a number"),
    ],
)
def test_our_validators_messages_come_without_pydantics_prefix(
    client: TestClient, route: str, body: bytes, message: str
) -> None:
    """pydantic starts a validator's ValueError with "Value error, ", which read as noise in the middle of
    the message ("body.n: Value error, must be a JSON number")."""
    err = assert_error(client.post(route, content=body, headers=JSON), 422, "validation_error")
    assert err["message"].startswith(message), err


@pytest.mark.parametrize(
    ("value", "words"), [("NaN", "finite"), ('"0"', "number"), ("{}", "number"), ("1e9", "1000")]
)
def test_a_body_full_of_bad_latents_is_described_by_its_first(
    client: TestClient, value: str, words: str
) -> None:
    """64 rows of 4000 bad values (~1 MiB, within the limits): pydantic made one error per value and
    FastAPI described each, on the event loop, for 2-3 s per request while every other request waited;
    the answer only ever showed five of them. Now the first bad value is the error."""
    row = "[" + ",".join([value] * 4000) + "]"
    body = ('{"z": [' + ",".join([row] * 64) + "]}").encode()
    err = assert_error(client.post("/decode", content=body, headers=JSON), 422, "validation_error")
    assert "z[0][0]" in err["message"] and words in err["message"] and "more" not in err["message"], err
    with pytest.raises(ValidationError) as caught:
        DecodeRequest.model_validate_json(body)
    assert caught.value.error_count() == 1


@pytest.mark.parametrize(("route", "model"), [("/sample", SampleRequest), ("/decode", DecodeRequest)])
def test_a_body_full_of_unknown_fields_is_one_error(client: TestClient, route: str, model: Any) -> None:
    """~1 MiB of unknown keys: extra="forbid" alone made one error per key (100,000), described one by one
    on the event loop (~0.4 s a request)."""
    keys = ",".join(f'"{i:x}": 0' for i in range(80_000))
    body = ('{"z": [[' + ROW + "]], " + keys + "}" if route == "/decode" else "{" + keys + "}").encode()
    err = assert_error(client.post(route, content=body, headers=JSON), 422, "validation_error")
    assert "unknown field '0' and 79999 more" in err["message"], err
    with pytest.raises(ValidationError) as caught:
        model.model_validate_json(body)
    assert caught.value.error_count() == 1


@pytest.mark.parametrize("route", ["/sample", "/decode"])
def test_oversized_json_body(client: TestClient, route: str) -> None:
    body = b'{"z": [[' + b"0.00000000001, " * 100_000 + b"0]]}"  # 1.5 MB, over the 1 MiB JSON limit
    assert_error(client.post(route, content=body, headers=JSON), 413, "payload_too_large")


# text/json and friends say "json" but FastAPI does not parse them as JSON: before, they got pydantic's
# "body: Input should be a valid dictionary" instead of the hint.
@pytest.mark.parametrize("route", ["/sample", "/decode"])
@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        None,
        "text/json",
        "application/x-json",
        "application/jsonl",
    ],
)
def test_json_sent_with_another_content_type(client: TestClient, route: str, ctype: str | None) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(route, content=b'{"n": 1}', headers=headers)
    message = assert_error(r, 422, "validation_error")["message"]
    assert "Content-Type: application/json" in message and (ctype or "no Content-Type") in message


@pytest.mark.parametrize(
    "query", ["steps=1", "steps=33", "steps=NaN", "steps=1e3", "steps=", "format=gif", "format=PNG%00"]
)
def test_bad_query_parameters(client: TestClient, query: str) -> None:
    png = photo_bytes()
    files = {"file_a": ("a.png", png, "image/png"), "file_b": ("b.png", png, "image/png")}
    r = client.post(f"/interpolate?{query}", files=files)
    err = assert_error(r, 422, "validation_error")
    assert query.split("=")[0] in err["message"]


# -- wrong methods ----------------------------------------------------------------------------------
POST_ROUTES = ("/reconstruct", "/encode", "/interpolate", "/sample", "/decode")
GET_ROUTES = ("/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


@pytest.mark.parametrize(
    ("method", "path"),
    [(m, p) for p in POST_ROUTES for m in ("GET", "PUT", "DELETE", "PATCH")]
    + [(m, p) for p in GET_ROUTES for m in ("POST", "PUT", "DELETE")],
)
def test_wrong_method_is_405_json(client: TestClient, method: str, path: str) -> None:
    err = assert_error(client.request(method, path), 405, "method_not_allowed")
    assert method in err["message"]


# -- errors Starlette writes itself ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("range_header", "status", "code"),
    [
        ("bytes=100000000-", 416, "range_not_satisfiable"),
        ("bytes=5-1", 400, "bad_request"),
        ("bytes=abc", 400, "bad_request"),
    ],
)
def test_bad_range_headers_on_static_files_are_json_errors(
    client: TestClient, range_header: str, status: int, code: str
) -> None:
    """StaticFiles answers a bad Range header itself, in plain text: held to the shared shape, its text as
    the message and its other headers (Content-Range on a 416) kept."""
    r = client.get("/static/app.js", headers={"Range": range_header})
    err = assert_error(r, status, code)
    if status == 416:
        assert r.headers["content-range"].startswith("bytes */")
    else:
        assert "range" in err["message"].lower()
    partial = client.get("/static/app.js", headers={"Range": "bytes=0-9"})  # a good range still works
    assert partial.status_code == 206 and len(partial.content) == 10
