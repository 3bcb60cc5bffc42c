"""Checks a running carvae service from the outside, the way a user would (standard library only, so it
runs with any host Python 3.10+, no project venv needed).

    python3 .ci/docker_smoke.py --base http://127.0.0.1:8000 --car car.jpg --reconstruction reconstruction.png

The reconstruction is the file the README's curl line wrote; this script verifies it and then calls
/encode, /sample, /metrics and one bad upload. Exits 1 with one line per failed check.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Response:
    # The URL is always the CI's own service (http://127.0.0.1:...), never user input.
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 (the loopback URL above)
            return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG after checking every chunk's CRC and that the pixel data inflates to the
    size IHDR promises (8-bit, non-interlaced, which is what PIL writes for RGB)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    pos, idat, ihdr, seen_end = len(PNG_SIGNATURE), b"", None, False
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated PNG")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 12 + length > len(data):
            raise ValueError("truncated PNG")
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat += payload
        elif kind == b"IEND":
            seen_end = True
            break
        pos += 12 + length
    if ihdr is None or not seen_end:
        raise ValueError("PNG without IHDR or IEND")
    width, height, depth, colour, _, _, interlace = ihdr
    if depth != 8 or interlace != 0 or colour not in CHANNELS:
        raise ValueError(
            f"unexpected PNG format (depth {depth}, colour type {colour}, interlace {interlace})"
        )
    expected = height * (1 + width * CHANNELS[colour])
    try:
        pixels = zlib.decompress(idat)
    except zlib.error as e:
        raise ValueError(f"PNG pixel data does not inflate ({e})") from None
    if len(pixels) != expected:
        raise ValueError("PNG pixel data has the wrong length")
    return width, height


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)
        return ok


def run(base: str, car_path: str, reconstruction_path: str, api_key: str | None) -> list[str]:
    c = Checks()
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with open(car_path, "rb") as f:
        car = f.read()

    info = request("GET", f"{base}/v1/model", headers=auth)
    if not c.check(info.status == 200, f"GET /v1/model -> {info.status}"):
        return c.failures
    model = info.json()
    size, latent = int(model["image_size"]), int(model["latent_dim"])
    print(f"  model {model['model_id']}: {size}x{size}, latent {latent}")

    with open(reconstruction_path, "rb") as f:
        recon = f.read()
    try:
        c.check(png_size(recon) == (size, size), f"reconstruction.png is a valid {size}x{size} PNG")
    except ValueError as e:
        c.check(False, f"reconstruction.png is a valid PNG ({e})")

    body, headers = multipart("file", "car.jpg", car, "image/jpeg")
    enc = request("POST", f"{base}/encode", body, {**headers, **auth})
    if c.check(enc.status == 200, f"POST /encode -> {enc.status}"):
        latents = enc.json()
        mu, logvar = latents["mu"], latents["logvar"]
        c.check(
            len(mu) == len(logvar) == latent == latents["latent_dim"]
            and all(map(math.isfinite, mu + logvar)),
            f"/encode gives {latent} finite mu and logvar values",
        )
        c.check(mu != logvar, "/encode: mu and logvar are different vectors")

    sample_body = json.dumps({"n": 16, "seed": 7}).encode()
    json_headers = {"Content-Type": "application/json", **auth}
    s1 = request("POST", f"{base}/sample", sample_body, json_headers)
    if c.check(
        s1.status == 200 and s1.headers.get("content-type") == "image/png", f"POST /sample -> {s1.status} PNG"
    ):
        try:
            w, h = png_size(s1.body)
            c.check(
                8 * size <= w < 8 * (size + 8) and 2 * size <= h < 2 * (size + 8),
                f"/sample n=16: {w}x{h} grid",
            )
        except ValueError as e:
            c.check(False, f"/sample PNG is valid ({e})")
        c.check(s1.headers.get("x-seed") == "7", "/sample echoes the seed in X-Seed")
        s2 = request("POST", f"{base}/sample", sample_body, json_headers)
        c.check(s2.body == s1.body, "/sample with the same seed gives the same image")

    bad_body, bad_headers = multipart("file", "car.jpg", b"this is not an image", "image/jpeg")
    bad = request("POST", f"{base}/reconstruct", bad_body, {**bad_headers, **auth})
    try:
        err = bad.json()["error"]
        shaped = {"code", "message", "request_id"} <= err.keys()
    except (ValueError, KeyError, TypeError):
        shaped = False
    c.check(400 <= bad.status < 500 and shaped, f"a corrupt upload -> {bad.status} with a JSON error body")

    metrics = request("GET", f"{base}/metrics", headers=auth)
    text = metrics.body.decode(errors="replace")
    if c.check(metrics.status == 200, f"GET /metrics -> {metrics.status}"):
        for name in (
            "carvae_requests_total",
            "carvae_request_duration_seconds_bucket",
            "carvae_batch_size_count",
            "carvae_ready 1.0",
        ):
            c.check(name in text, f"/metrics has {name}")
    return c.failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--car", required=True, help="the image the curl line uploaded")
    p.add_argument("--reconstruction", required=True, help="the PNG the curl line wrote")
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    failures = run(a.base.rstrip("/"), a.car, a.reconstruction, a.api_key)
    if failures:
        print(f"{len(failures)} check(s) failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("all service checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
