"""HTTP contracts of every endpoint and its error paths, in-process (TestClient, lifespan included)."""

from __future__ import annotations

import base64
import functools
import gzip
import io
import json
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import TINY, block_handler, decode_png, make_settings, photo_bytes

from carvae.checkpoint import save_checkpoint
from carvae.losses import psnr
from carvae.model import VAE
from carvae.preprocess import PreprocessPolicy, prepare, to_tensor, to_uint8
from service.config import Settings, unknown_variables
from service.deps import Output, negotiate
from service.main import STATIC_DIR, create_app
from service.pipeline import Pipeline
from service.threads import GIL_SWITCH_INTERVAL_S

pytest_plugins = ["service_fixtures"]

S = TINY.image_size
JSON_ACCEPT = {"Accept": "application/json"}


def upload(
    data: bytes | None = None, name: str = "file", filename: str = "car.png", ctype: str = "image/png"
) -> Any:
    return {name: (filename, photo_bytes() if data is None else data, ctype)}


def assert_error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    return dict(err)


def pipeline_of(client: TestClient) -> Pipeline:
    pipeline: Pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
    return pipeline


def metric_samples(text: str, name: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


# -- threads -----------------------------------------------------------------------------------------
def threads_of_a_new_thread() -> int:
    """torch's thread count as a thread started now sees it on its first torch call."""
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_a_batch_alone_gets_every_core_and_every_other_thread_keeps_its_share(make_client: Any) -> None:
    client = make_client(MODEL_WORKERS=2, TORCH_THREADS=1, TORCH_THREADS_ALONE=2)
    batcher = pipeline_of(client).batcher
    assert batcher.has_alone_executor
    on_loop = client.portal.call
    assert on_loop(functools.partial(batcher.run_in_worker, torch.get_num_threads, alone=True)) == 2
    assert on_loop(functools.partial(batcher.run_in_worker, torch.get_num_threads)) == 1
    # A thread that first uses torch after start-up (an io thread, say) gets one torch thread, not the
    # alone thread's count: start-up put torch's default back.
    assert threads_of_a_new_thread() == 1
    assert client.post("/reconstruct", files=upload()).status_code == 200
    # Model threads on two torch threads each, no alone path: still one for every other thread.
    two = make_client(MODEL_WORKERS=1, TORCH_THREADS=2, TORCH_THREADS_ALONE=1)
    assert not pipeline_of(two).batcher.has_alone_executor
    on_loop = two.portal.call
    assert on_loop(functools.partial(pipeline_of(two).batcher.run_in_worker, torch.get_num_threads)) == 2
    assert threads_of_a_new_thread() == 1


# -- happy paths -----------------------------------------------------------------------------------
def test_reconstruct_png_matches_the_model_on_the_shared_preprocessing(client: TestClient) -> None:
    data = photo_bytes(60, 45, seed=3)
    r = client.post("/reconstruct", files=upload(data))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert len(r.headers["x-request-id"]) >= 8
    got = decode_png(r.content)
    assert got.shape == (S, S, 3)
    ck = pipeline_of(client).served.checkpoint
    view = prepare(data, ck.policy)  # the trainer's preprocessing
    with torch.inference_mode():
        expected = to_uint8(ck.model.reconstruct(to_tensor(view)))[0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("fmt", "media", "magic"), [("jpeg", "image/jpeg", b"\xff\xd8"), ("webp", "image/webp", b"RIFF")]
)
def test_reconstruct_other_formats(client: TestClient, fmt: str, media: str, magic: bytes) -> None:
    r = client.post(f"/reconstruct?format={fmt}", files=upload())
    assert r.status_code == 200 and r.headers["content-type"] == media
    assert r.content.startswith(magic)
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (S, S)


def test_reconstruct_json_carries_input_view_mu_and_psnr(client: TestClient) -> None:
    data = photo_bytes(seed=5)
    r = client.post("/reconstruct", files=upload(data), headers=JSON_ACCEPT)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model_id"] == pipeline_of(client).served.model_id
    assert body["image_size"] == S and body["format"] == "png"
    view = decode_png(base64.b64decode(body["input"]))
    recon = decode_png(base64.b64decode(body["image"]))
    assert np.array_equal(view, prepare(data, pipeline_of(client).served.policy))
    assert body["psnr"] == pytest.approx(float(psnr(to_tensor(recon), to_tensor(view))[0]), abs=1e-3)
    enc = client.post("/encode", files=upload(data)).json()
    assert len(body["mu"]) == TINY.latent_dim
    assert np.allclose(body["mu"], enc["mu"], atol=1e-6)


def test_encode_returns_the_posterior(client: TestClient) -> None:
    data = photo_bytes(seed=9)
    r = client.post("/encode", files=upload(data))
    assert r.status_code == 200
    body = r.json()
    assert body["latent_dim"] == TINY.latent_dim
    ck = pipeline_of(client).served.checkpoint
    with torch.inference_mode():
        mu, logvar = ck.model.encode(to_tensor(prepare(data, ck.policy)))
    assert np.allclose(body["mu"], mu[0].numpy(), atol=1e-5)
    assert np.allclose(body["logvar"], logvar[0].numpy(), atol=1e-5)


def test_sample_is_reproducible_and_equals_model_sample(client: TestClient) -> None:
    r1 = client.post("/sample", json={"n": 3, "seed": 123, "temperature": 0.8}, headers=JSON_ACCEPT)
    r2 = client.post("/sample", json={"n": 3, "seed": 123, "temperature": 0.8}, headers=JSON_ACCEPT)
    assert r1.status_code == 200 and r1.headers["x-seed"] == "123"
    assert r1.json()["images"] == r2.json()["images"]
    assert r1.json()["seed"] == 123
    model = pipeline_of(client).served.checkpoint.model
    with torch.inference_mode():
        expected = to_uint8(model.sample(3, generator=torch.Generator().manual_seed(123), temperature=0.8))
    got = np.stack([decode_png(base64.b64decode(b)) for b in r1.json()["images"]])
    assert np.array_equal(got, expected)


def test_sample_without_seed_reports_the_seed_it_drew(client: TestClient) -> None:
    r = client.post("/sample")  # no body at all: every default
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    seed = int(r.headers["x-seed"])
    grid = decode_png(r.content)
    assert grid.shape == (2 * (S + 2) + 2, 8 * (S + 2) + 2, 3)  # 16 images, 8 per row, 2 px padding
    again = client.post("/sample", json={"seed": seed})
    assert again.content == r.content


def test_decode_grid_and_json(client: TestClient) -> None:
    z = [[0.0] * TINY.latent_dim, [0.5] * TINY.latent_dim, [-1.0] * TINY.latent_dim]
    r = client.post("/decode", json={"z": z})
    assert r.status_code == 200 and decode_png(r.content).shape == (S + 4, 3 * (S + 2) + 2, 3)
    body = client.post("/decode?format=webp", json={"z": z}, headers=JSON_ACCEPT).json()
    assert body["format"] == "webp" and len(body["images"]) == 3
    png = client.post("/decode", json={"z": z[:1]}, headers=JSON_ACCEPT).json()["images"][0]
    model = pipeline_of(client).served.checkpoint.model
    with torch.inference_mode():
        expected = to_uint8(model.decode(torch.zeros(1, TINY.latent_dim)))[0]
    assert np.array_equal(decode_png(base64.b64decode(png)), expected)


def test_interpolate_strip_ends_at_the_two_inputs(client: TestClient) -> None:
    a, b = photo_bytes(seed=1), photo_bytes(seed=2)
    files = {"file_a": ("a.png", a, "image/png"), "file_b": ("b.jpg", b, "image/png")}
    r = client.post("/interpolate", files=files, data={"steps": "5"})
    assert r.status_code == 200 and decode_png(r.content).shape == (S + 4, 5 * (S + 2) + 2, 3)
    r = client.post("/interpolate?steps=3", files=files, headers=JSON_ACCEPT)
    frames = [decode_png(base64.b64decode(x)) for x in r.json()["images"]]
    assert len(frames) == 3
    recon_a = decode_png(client.post("/reconstruct", files=upload(a)).content)
    recon_b = decode_png(client.post("/reconstruct", files=upload(b)).content)
    assert np.abs(frames[0].astype(int) - recon_a).max() <= 1
    assert np.abs(frames[-1].astype(int) - recon_b).max() <= 1
    default = client.post("/interpolate", files=files, headers=JSON_ACCEPT).json()
    assert len(default["images"]) == 8


def test_a_parameter_given_twice_is_refused_not_silently_one_of_them(client: TestClient) -> None:
    """FastAPI keeps the last of repeated query values: `?format=png&format=jpeg` answered JPEG, and
    `steps` in both the form and the query used the form's without a word."""
    files = {
        "file_a": ("a.png", photo_bytes(seed=1), "image/png"),
        "file_b": ("b.png", photo_bytes(), "image/png"),
    }
    err = assert_error(
        client.post("/reconstruct?format=png&format=jpeg", files=upload()), 422, "validation_error"
    )
    assert "'format' given 2 times" in err["message"]
    assert_error(client.post("/sample?format=webp&format=webp", json={"n": 1}), 422, "validation_error")
    assert_error(client.post("/interpolate?steps=3&steps=4", files=files), 422, "validation_error")
    assert_error(
        client.post("/interpolate?steps=3", files=files, data={"steps": "4"}), 422, "validation_error"
    )
    assert_error(
        client.post("/interpolate", files=files, data={"steps": ["3", "4"]}), 422, "validation_error"
    )
    # once, in either place, is fine
    for kwargs in ({"params": {"steps": "3"}}, {"data": {"steps": "3"}}):
        r = client.post("/interpolate", files=files, headers=JSON_ACCEPT, **kwargs)
        assert r.status_code == 200 and len(r.json()["images"]) == 3, kwargs
    r = client.post("/reconstruct?format=jpeg", files=upload())
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def test_an_empty_steps_field_is_refused_as_an_empty_query_value_is(client: TestClient) -> None:
    files = {
        "file_a": ("a.png", photo_bytes(seed=1), "image/png"),
        "file_b": ("b.png", photo_bytes(), "image/png"),
    }
    assert_error(client.post("/interpolate?steps=", files=files), 422, "validation_error")
    err = assert_error(client.post("/interpolate", files=files, data={"steps": ""}), 422, "validation_error")
    assert err["message"] == "body.steps: empty; give a value or leave the field out"


@pytest.mark.parametrize(
    ("path", "kwargs", "said"),
    [
        # n belongs in the JSON body: FastAPI ignored it in the query and 16 cars came back.
        ("/sample?n=3", {"json": {}}, "'n' (its query parameters are format; n goes in the request body)"),
        ("/reconstruct?fmt=jpeg", {}, "'fmt' (its query parameters are format)"),
        ("/encode?format=jpeg&x=1", {}, "'format' and 1 more (it takes no query parameters)"),
        ("/decode?z=0", {"json": {"z": [[0.0] * TINY.latent_dim]}}, "'z' (its query parameters are format;"),
        ("/interpolate?step=3", {}, "'step' (its query parameters are steps, format)"),
    ],
)
def test_a_query_parameter_the_route_does_not_take_is_refused_not_ignored(
    client: TestClient, path: str, kwargs: dict[str, Any], said: str
) -> None:
    if path.startswith(("/reconstruct", "/encode")):
        kwargs = {"files": upload()}
    elif path.startswith("/interpolate"):
        kwargs = {"files": [("file_a", upload()["file"]), ("file_b", upload()["file"])]}
    r = client.post(path, **kwargs)
    assert_error(r, 422, "validation_error")
    assert r.json()["error"]["message"].startswith(f"unknown query parameter {said}"), r.text


def test_the_query_parameters_a_route_takes_and_a_get_cache_buster_still_work(client: TestClient) -> None:
    assert client.post("/reconstruct?format=jpeg", files=upload()).headers["content-type"] == "image/jpeg"
    assert client.post("/sample?format=webp", json={"n": 1}).headers["content-type"] == "image/webp"
    files = [("file_a", upload()["file"]), ("file_b", upload()["file"])]
    assert client.post("/interpolate?steps=3", files=files).status_code == 200
    assert client.get("/v1/model?_=1700000000").status_code == 200


def test_model_health_ready(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    for key in (
        "model_id",
        "content_hash",
        "architecture",
        "image_size",
        "latent_dim",
        "preprocess",
        "training",
        "device",
        "parameters",
        "package_version",
    ):
        assert key in info
    assert info["device"] == "cpu" and info["latent_dim"] == TINY.latent_dim and info["parameters"] > 0
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_is_503_when_not_ready(client: TestClient) -> None:
    client.app.state.ready = False  # type: ignore[attr-defined]
    try:
        assert_error(client.get("/readyz"), 503, "not_ready")
        assert_error(client.post("/reconstruct", files=upload()), 503, "overloaded")
    finally:
        client.app.state.ready = True  # type: ignore[attr-defined]


# -- bad input -------------------------------------------------------------------------------------
def test_refusals_before_the_model_is_loaded_and_while_stopping_are_counted(client: TestClient) -> None:
    """Their 503s were in no carvae_rejected_total series: an alert on refusals missed a service that
    refused everything because it was stopping (or not loaded). Each has its reason, and says which."""
    state = client.app.state  # type: ignore[attr-defined]
    pipeline = state.pipeline
    try:
        state.ready = False  # as the lifespan's stop leaves it: the pipeline is still there
        err = assert_error(client.post("/reconstruct", files=upload()), 503, "overloaded")
        assert "stopping" in err["message"]
        state.pipeline = None  # as before the lifespan has loaded the model
        err = assert_error(client.post("/encode", files=upload()), 503, "overloaded")
        assert "not loaded" in err["message"]
        assert_error(client.get("/v1/model"), 503, "overloaded")
    finally:
        state.pipeline, state.ready = pipeline, True
    text = client.get("/metrics").text
    rejected = {s.labels["reason"]: s.value for s in metric_samples(text, "carvae_rejected_total")}
    assert rejected == {"in_flight": 0, "queue_full": 0, "not_running": 0, "not_loaded": 2, "stopping": 1}


def test_upload_errors(client: TestClient) -> None:
    assert_error(client.post("/reconstruct", files=upload(b"")), 400, "empty_file")
    assert_error(client.post("/reconstruct"), 422, "missing_field")
    assert_error(client.post("/reconstruct", files=upload(name="image")), 422, "missing_field")
    two = [("file", ("a.png", photo_bytes(), "image/png")), ("file", ("b.png", photo_bytes(), "image/png"))]
    assert (
        "one 'file' part"
        in assert_error(client.post("/reconstruct", files=two), 422, "validation_error")["message"]
    )
    assert_error(
        client.post("/encode", files=upload(b"<html>hello</html>", filename="car.jpg")),
        415,
        "unsupported_media_type",
    )
    png = photo_bytes()
    assert_error(client.post("/reconstruct", files=upload(png[: len(png) // 2])), 422, "corrupt_image")
    assert_error(client.post("/reconstruct", files=upload(photo_bytes(4, 4))), 422, "image_too_small")
    assert_error(client.post("/reconstruct", files=upload(photo_bytes(400, 8))), 422, "bad_aspect_ratio")
    assert_error(client.post("/reconstruct?format=gif", files=upload()), 422, "validation_error")
    err = assert_error(
        client.post(
            "/interpolate",
            files={"file_a": ("a.png", png, "image/png"), "file_b": ("b.png", b"xx", "image/png")},
        ),
        415,
        "unsupported_media_type",
    )
    assert err["message"].startswith("file_b:")
    files = {"file_a": ("a.png", png, "image/png"), "file_b": ("b.png", png, "image/png")}
    assert_error(client.post("/interpolate", files=files, data={"steps": "1"}), 422, "validation_error")
    assert_error(client.post("/interpolate?steps=33", files=files), 422, "validation_error")
    # the service is still healthy after all that
    assert client.post("/reconstruct", files=upload()).status_code == 200


def test_a_compressed_body_is_refused_with_415_not_parsed_as_if_it_were_plain(client: TestClient) -> None:
    """The service decodes no Content-Encoding, and nothing looked at the header: a gzipped JSON body was
    answered "not valid JSON (not UTF-8 text)", a gzipped form "Missing boundary in multipart." and a
    plain body labelled `br` was used as if the label were not there. RFC 9110 §15.5.16: 415, naming the
    coding, with Accept-Encoding saying what is taken."""
    json_headers = {"Content-Type": "application/json"}
    sample = client.post(
        "/sample",
        content=gzip.compress(b'{"n": 1, "seed": 1}'),
        headers={**json_headers, "Content-Encoding": "gzip"},
    )
    assert "gzip" in assert_error(sample, 415, "unsupported_content_encoding")["message"]
    assert sample.headers["accept-encoding"] == "identity"
    form = client.build_request("POST", "/reconstruct", files=upload())
    compressed_form = client.post(
        "/reconstruct",
        content=gzip.compress(form.read()),
        headers={"Content-Type": form.headers["content-type"], "Content-Encoding": "GZIP"},
    )
    assert "gzip" in assert_error(compressed_form, 415, "unsupported_content_encoding")["message"]
    decode = {"z": [[0.0] * TINY.latent_dim]}
    labelled = client.post(
        "/decode", content=json.dumps(decode), headers={**json_headers, "Content-Encoding": "br"}
    )
    assert_error(labelled, 415, "unsupported_content_encoding")
    # identity is no coding at all, and a GET has no body to decode
    identity = {**json_headers, "Content-Encoding": "identity"}
    assert client.post("/decode", content=json.dumps(decode), headers=identity).status_code == 200
    assert client.get("/v1/model", headers={"Content-Encoding": "gzip"}).status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/reconstruct", "/encode", "/interpolate", "/sample", "/decode"):
        assert "Content-Encoding" in spec["paths"][path]["post"]["responses"]["415"]["description"], path


def test_image_pixel_limit_comes_from_settings(make_client: Any) -> None:
    client = make_client(MAX_IMAGE_PIXELS=1000)
    assert_error(client.post("/reconstruct", files=upload(photo_bytes(48, 40))), 413, "image_too_large")
    assert client.post("/reconstruct", files=upload(photo_bytes(30, 30))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"z": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}',
        b'{"z": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}',
        b'{"z": [[1e999, 0, 0, 0, 0, 0, 0, 0]]}',
        b'{"z": [[1e300, 0, 0, 0, 0, 0, 0, 0]]}',
        b'{"z": [["1", 0, 0, 0, 0, 0, 0, 0]]}',
        b'{"z": [[0, 0, 0]]}',
        b'{"z": []}',
        b'{"z": [[0]]}',
        b'{"z": 5}',
        b'{"zz": [[0]]}',
        b"[1, 2]",
        b'{"z": [[0, 0, 0, 0, 0, 0, 0, 0]], "extra": NaN}',
        b"{not json",
        b"[" * 50_000 + b"]" * 50_000,
    ],
)
def test_decode_rejects_bad_latents_without_500(client: TestClient, body: bytes) -> None:
    r = client.post("/decode", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["code"] in ("validation_error", "missing_field", "bad_request")


@pytest.mark.parametrize(("length", "said"), [(1, "1 value;"), (3, "3 values;")])
def test_a_latent_of_the_wrong_length_is_named_like_other_fields(
    client: TestClient, length: int, said: str
) -> None:
    z = [[0.0] * TINY.latent_dim, [0.0] * length]
    r = client.post("/decode", json={"z": z})
    assert_error(r, 422, "validation_error")
    assert r.json()["error"]["message"] == (
        f"body.z[1] has {said} this model's latent_dim is {TINY.latent_dim}"
    )


def test_decode_row_limit(client: TestClient) -> None:
    z = [[0.0] * TINY.latent_dim] * 65
    assert_error(client.post("/decode", json={"z": z}), 422, "validation_error")


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": NaN}',
        b'{"n": 0}',
        b'{"n": 65}',
        b'{"n": 1.5}',
        b'{"n": true}',
        b'{"temperature": 0}',
        b'{"temperature": Infinity}',
        b'{"temperature": -1}',
        b'{"seed": -1}',
        b'{"seed": 1e400}',
        b'{"seed": 9007199254740992}',
        b'{"seed": ' + b"9" * 5000 + b"}",
        b'{"N": 4}',
    ],
)
def test_sample_rejects_bad_parameters_without_500(client: TestClient, body: bytes) -> None:
    r = client.post("/sample", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_body_limits(make_client: Any) -> None:
    client = make_client(MAX_UPLOAD_BYTES=4096, MAX_JSON_BYTES=2048)
    big = photo_bytes(64, 64)  # ~12 KB of noise
    assert len(big) > 4096
    err = assert_error(client.post("/reconstruct", files=upload(big)), 413, "payload_too_large")
    assert "4096 bytes (0.00391 MiB)" in err["message"]  # the bytes exact, and a size people read

    def chunks() -> Any:  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b"x" * 1000

    r = client.post(
        "/reconstruct", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert_error(r, 413, "payload_too_large")
    z = [[0.123456789] * TINY.latent_dim] * 40  # a valid body, but over the 2 KB JSON limit
    assert_error(client.post("/decode", json={"z": z}), 413, "payload_too_large")
    assert client.post("/reconstruct", files=upload(photo_bytes(20, 20))).status_code == 200


def test_request_ids_and_unknown_routes(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123.def"})
    assert r.headers["x-request-id"] == "abc-123.def"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 100})
    made = r.headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert len({client.get("/healthz").headers["x-request-id"] for _ in range(50)} | {made}) == 51
    assert_error(client.get("/no/such/thing"), 404, "not_found")
    err = assert_error(client.get("/reconstruct"), 405, "method_not_allowed")
    assert "GET" in err["message"]
    assert_error(client.put("/sample"), 405, "method_not_allowed")


def test_405_allow_names_every_method_that_works(client: TestClient) -> None:
    """HEAD works on every GET route (HeadAsGetMiddleware), so a 405 there must list it in Allow."""
    for path in ("/healthz", "/readyz", "/v1/model", "/metrics"):
        r = client.post(path)
        assert_error(r, 405, "method_not_allowed")
        assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD"}, path
        assert client.head(path).status_code == 200, path
    r = client.get("/sample")
    err = assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    # a browser opening an API path is told how to call it
    assert err["message"] == "method GET is not allowed here; use POST (see /docs)"
    assert client.delete("/healthz").json()["error"]["message"].endswith("; use GET or HEAD (see /docs)")


# -- security --------------------------------------------------------------------------------------
def test_api_key(make_client: Any) -> None:
    client = make_client(API_KEY="s3cret-key", METRICS_REQUIRE_KEY=False)
    assert_error(client.post("/reconstruct", files=upload()), 401, "unauthorized")
    assert_error(
        client.post("/sample", json={"n": 1}, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"
    )
    assert_error(client.get("/v1/model", headers={"X-API-Key": "s3cret-ke"}), 401, "unauthorized")
    assert (
        client.post(
            "/reconstruct", files=upload(), headers={"Authorization": "Bearer s3cret-key"}
        ).status_code
        == 200
    )
    assert client.post("/sample", json={"n": 1}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}

    locked = make_client(API_KEY="k", METRICS_REQUIRE_KEY=True)
    assert_error(locked.get("/metrics"), 401, "unauthorized")
    assert locked.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200


def test_no_key_no_auth_and_cors_closed_by_default(client: TestClient) -> None:
    r = client.post("/sample", json={"n": 1}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured(make_client: Any) -> None:
    client = make_client(CORS_ORIGINS=["https://cars.example"])
    r = client.options(
        "/reconstruct", headers={"Origin": "https://cars.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://cars.example"
    r = client.post("/sample", json={"n": 1}, headers={"Origin": "https://other.example"})
    assert "access-control-allow-origin" not in r.headers


# -- batching, faults, overload, deadlines ---------------------------------------------------------
def test_results_do_not_depend_on_batching(client: TestClient) -> None:
    """The same image alone and inside a batch of 32 (one forward pass) gives the same μ within 1e-5."""
    target = photo_bytes(seed=42)
    alone = client.post("/encode", files=upload(target)).json()["mu"]
    batcher = pipeline_of(client).batcher
    batcher.max_wait_s = 0.5  # let all 32 concurrent requests gather into one batch
    before = batcher.stats.max_rows
    datas = [target] + [photo_bytes(seed=100 + i) for i in range(31)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda d: client.post("/encode", files=upload(d)), datas))
    assert all(r.status_code == 200 for r in results)
    assert batcher.stats.max_rows > max(before, 1), "no batch formed"
    assert np.allclose(results[0].json()["mu"], alone, atol=1e-5)


def test_fault_in_a_batch_fails_only_that_request(client: TestClient) -> None:
    batcher = pipeline_of(client).batcher
    original = batcher.handlers["reconstruct"]
    calls = {"n": 0}

    def flaky(payloads: list[Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return original(payloads)

    batcher.handlers["reconstruct"] = flaky
    err = assert_error(client.post("/reconstruct", files=upload()), 500, "internal_error")
    assert err["request_id"] in err["message"]
    assert client.post("/reconstruct", files=upload()).status_code == 200


def test_unexpected_exception_is_a_logged_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    encoder = pipeline_of(client).encoder

    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("bug")

    encoder.latents = broken  # type: ignore[method-assign,assignment]  # fault injection
    err = assert_error(client.post("/encode", files=upload()), 500, "internal_error")
    assert any(err["request_id"] in rec.getMessage() for rec in caplog.records)
    assert "bug" not in err["message"]  # internals stay in the log


def test_full_queue_gives_503_with_retry_after(make_client: Any) -> None:
    client = make_client(QUEUE_SIZE=1, MAX_BATCH_SIZE=1)
    entered, gate = block_handler(pipeline_of(client).batcher)
    batcher = pipeline_of(client).batcher
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/reconstruct", files=upload())
        assert entered.wait(5)
        queued = pool.submit(client.post, "/reconstruct", files=upload())
        deadline = time.monotonic() + 5
        while batcher.depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = client.post("/reconstruct", files=upload())
        assert time.perf_counter() - t0 < 2
        assert_error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    text = client.get("/metrics").text
    assert sum(s.value for s in metric_samples(text, "carvae_rejected_total")) >= 1


def test_in_flight_cap_refuses_before_reading_the_body(make_client: Any) -> None:
    client = make_client(MAX_IN_FLIGHT=1)
    entered, gate = block_handler(pipeline_of(client).batcher)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/reconstruct", files=upload())
        assert entered.wait(5)
        r = client.post("/reconstruct", files=upload())
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200  # only model routes are capped
        gate.set()
        assert running.result().status_code == 200
    text = client.get("/metrics").text
    refused = [s for s in metric_samples(text, "carvae_requests_total") if s.labels["status"] == "503"]
    assert [s.labels["route"] for s in refused] == ["/reconstruct"]  # labelled although never routed


def test_deadline_gives_504(make_client: Any) -> None:
    client = make_client(REQUEST_TIMEOUT_S=0.3)
    _entered, gate = block_handler(pipeline_of(client).batcher)
    try:
        assert_error(client.post("/reconstruct", files=upload()), 504, "timeout")
    finally:
        gate.set()
    text = client.get("/metrics").text
    assert sum(s.value for s in metric_samples(text, "carvae_timeouts_total")) >= 1
    assert client.post("/reconstruct", files=upload()).status_code == 200


# -- paths -------------------------------------------------------------------------------------------
def test_a_trailing_slash_is_the_same_route_not_an_empty_redirect(make_client: Any) -> None:
    """`curl -F file=@car.jpg .../reconstruct/ -o out.png` got a 307 with an empty body, which curl wrote
    to out.png and exited 0."""
    client = make_client(API_KEY="k")
    key = {"X-API-Key": "k"}
    plain = client.post("/reconstruct", files=upload(), headers=key)
    slashed = client.post("/reconstruct/", files=upload(), headers=key, follow_redirects=False)
    assert slashed.status_code == 200, slashed.text
    assert slashed.headers["content-type"] == "image/png" and slashed.content == plain.content
    assert client.get("/healthz/", follow_redirects=False).status_code == 200  # an open path stays open
    assert_error(client.post("/reconstruct/", files=upload(), follow_redirects=False), 401, "unauthorized")
    twice = client.post("/reconstruct//", files=upload(), headers=key, follow_redirects=False)
    assert twice.status_code == 200 and twice.content == plain.content
    assert_error(client.post("/no-such-route/", headers=key, follow_redirects=False), 404, "not_found")
    # the folder of the page's files keeps its slash (without it Starlette redirects back to it: a loop)
    assert client.get("/static/app.js", follow_redirects=False).status_code == 200
    assert_error(client.get("/static/", headers=key, follow_redirects=False), 404, "not_found")
    routes = {s.labels["route"] for s in metric_samples(client.get("/metrics").text, "carvae_requests_total")}
    assert not any(route.endswith("/") and route != "/" for route in routes), routes


def test_device_and_log_level_take_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARVAE_DEVICE", " CPU ")
    monkeypatch.setenv("CARVAE_LOG_LEVEL", "INFO")
    settings = Settings()
    assert settings.DEVICE == "cpu" and settings.LOG_LEVEL == "info"
    monkeypatch.setenv("CARVAE_DEVICE", "GPU")
    with pytest.raises(ValueError, match="DEVICE"):
        Settings()


# -- metrics and docs ------------------------------------------------------------------------------
def test_metrics_parse_with_bounded_labels(client: TestClient) -> None:
    client.post("/reconstruct", files=upload())
    client.get("/no/such/path/12345")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    routes = {s.labels["route"] for s in metric_samples(text, "carvae_requests_total")}
    assert "/reconstruct" in routes and "unmatched" in routes
    assert not any("12345" in route for route in routes)
    (info,) = metric_samples(text, "carvae_model_info")
    assert info.labels["device"] == "cpu" and info.labels["latent_dim"] == str(TINY.latent_dim)
    assert metric_samples(text, "carvae_ready")[0].value == 1
    for name in (
        "carvae_batch_size_count",
        "carvae_queue_wait_seconds_count",
        "carvae_batch_wait_seconds_count",
        "carvae_compute_seconds_count",
        "carvae_request_duration_seconds_count",
        "carvae_queue_depth",
        "carvae_in_flight_requests",
    ):
        assert metric_samples(text, name), name


def test_metrics_include_the_python_runtime_gc_and_version(client: TestClient) -> None:
    """The service tunes the cyclic GC (gc.freeze after warm-up: its full collections were the slowest 1 %
    of requests); without the GC collector a regression there shows up only as latency."""
    text = client.get("/metrics").text
    collections = {s.labels["generation"] for s in metric_samples(text, "python_gc_collections_total")}
    assert collections == {"0", "1", "2"}
    assert metric_samples(text, "python_gc_objects_collected_total")
    (info,) = metric_samples(text, "python_info")
    assert info.labels["implementation"] and info.value == 1


def test_openapi_declares_the_metrics_content_type_it_sends(client: TestClient) -> None:
    declared = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    sent = client.get("/metrics").headers["content-type"]
    assert list(declared) == [sent]


def test_an_unusual_method_is_labelled_other(client: TestClient) -> None:
    for method in ("PROPFIND", "BREW", "PATCH"):
        assert client.request(method, "/healthz").status_code in (400, 405)
    assert client.request("OPTIONS", "/healthz").status_code == 405
    text = client.get("/metrics").text
    methods = {s.labels["method"] for s in metric_samples(text, "carvae_requests_total")}
    assert methods == {"OPTIONS", "other"}  # this scrape is counted after it is written
    durations = {s.labels["method"] for s in metric_samples(text, "carvae_request_duration_seconds_count")}
    assert durations == methods


def test_files_under_a_mount_are_labelled_by_the_mount_and_no_created_series(client: TestClient) -> None:
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert client.get("/static/js/api.js").status_code == 200
    assert client.get("/static/no-such-file.js").status_code == 404
    text = client.get("/metrics").text
    seen = {(s.labels["route"], s.labels["status"]) for s in metric_samples(text, "carvae_requests_total")}
    assert {("/docs/assets", "200"), ("/static", "200"), ("/static", "404")} <= seen
    assert "unmatched" not in {route for route, _ in seen}
    # Counters and histograms without their `_created` twins (half the series, nothing lost).
    assert not [line for line in text.splitlines() if "_created" in line]


def test_probes_and_scrapes_are_logged_at_debug_requests_at_info(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    def lines(level: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(level, logger="carvae.service"):
            for path in ("/healthz", "/readyz", "/metrics", "/v1/model"):
                client.get(path)
        return [r.getMessage() for r in caplog.records if "route=" in r.getMessage()]

    at_info = lines(logging.INFO)
    assert len(at_info) == 1 and "route=/v1/model status=200" in at_info[0]
    assert len(lines(logging.DEBUG)) == 4


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose.yml passes every setting as ${CARVAE_X:-}: unset there must not be invalid here."""
    for name in Settings.model_fields:
        monkeypatch.setenv(f"CARVAE_{name}", "")
    defaults = Settings()
    assert defaults.QUEUE_SIZE == 256 and defaults.API_KEY is None and defaults.CORS_ORIGINS == []
    assert defaults.KEEP_ALIVE_S == 5 and defaults.SHUTDOWN_DELAY_S == 0
    monkeypatch.setenv("CARVAE_QUEUE_SIZE", "7")
    assert Settings().QUEUE_SIZE == 7


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "CARVAE_MAX_BATCH": "64",
        "CARVAE_APIKEY": "k",
        "CARVAE_FOO": "1",
        "CARVAE_QUEUE_SIZE": "8",  # settings, in any case
        "carvae_log_level": "debug",
        "CARVAE_TRAIN_EPOCHS": "3",  # the trainer's, the compose file's and CI's: not typos
        "CARVAE_PUBLISH_PORT": "8080",
        "CARVAE_CI_KEEP": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        "CARVAE_APIKEY is not a setting (ignored); did you mean CARVAE_API_KEY?",
        "CARVAE_FOO is not a setting (ignored)",
        "CARVAE_MAX_BATCH is not a setting (ignored); did you mean CARVAE_MAX_BATCH_SIZE?",
    ]


def test_refusal_and_timeout_counters_exist_at_zero_before_any_event(service_checkpoint: Path) -> None:
    """Alerts on rate(carvae_rejected_total[5m]) need the series before the first refusal."""
    with TestClient(create_app(make_settings(service_checkpoint))) as fresh:
        text = fresh.get("/metrics").text
    rejected = {s.labels["reason"]: s.value for s in metric_samples(text, "carvae_rejected_total")}
    timeouts = {s.labels["stage"]: s.value for s in metric_samples(text, "carvae_timeouts_total")}
    assert rejected == {"in_flight": 0, "queue_full": 0, "not_running": 0, "not_loaded": 0, "stopping": 0}
    assert timeouts == {"decode": 0, "queue": 0, "wait": 0}


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    return {k for v in node for k in _keys(v)} if isinstance(node, list) else set()


def test_openapi_bounds_are_json_schema_keywords(client: TestClient) -> None:
    """pydantic writes a bound on an optional, validated integer as "ge"/"le", which JSON Schema does not
    know: clients and schema-driven testers then treat a negative seed as valid (schemathesis did)."""
    spec = client.get("/openapi.json").json()
    assert not _keys(spec) & {"ge", "le", "gt", "lt"}
    seed = spec["components"]["schemas"]["SampleRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["minimum"] == 0 and seed["type"] == "integer"


def test_openapi_documents_images_errors_and_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ops = {(path, m): op for path, item in spec["paths"].items() for m, op in item.items()}
    for path in ("/reconstruct", "/sample", "/decode", "/interpolate"):
        content = ops[(path, "post")]["responses"]["200"]["content"]
        assert {"image/png", "image/jpeg", "image/webp", "application/json"} <= set(content), path
    for (path, _), op in ops.items():
        if path in ("/reconstruct", "/encode", "/sample", "/decode", "/interpolate"):
            for status in ("413", "422", "503"):
                ref = json.dumps(op["responses"][status])
                assert "ErrorResponse" in ref, (path, status)
    schemas = spec["components"]["schemas"]
    for name in ("SampleRequest", "DecodeRequest", "ReconstructResponse", "EncodeResponse", "ErrorResponse"):
        assert schemas[name].get("examples"), name
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 shape is not what we send


def test_openapi_describes_each_operation_its_inputs_limits_and_errors_as_they_are(
    client: TestClient,
) -> None:
    """/encode, /v1/model and the probes had no description and answered "Successful Response"; the JSON
    routes' 413 named CARVAE_MAX_UPLOAD_BYTES and images (their limit is CARVAE_MAX_JSON_BYTES, 1 MiB);
    the photo parts said nothing of their limits (file_b not even the formats)."""
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op.get("summary") and op.get("description"), (method, path)
            assert op["responses"]["200"]["description"] != "Successful Response", (method, path)
    for path in ("/sample", "/decode"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "CARVAE_MAX_JSON_BYTES (1 MiB by default)" in responses["413"]["description"], path
        assert "image" not in responses["413"]["description"] + responses["422"]["description"], path
    assert "METRICS_REQUIRE_KEY" in spec["paths"]["/metrics"]["get"]["responses"]["401"]["description"]
    schemas = spec["components"]["schemas"]
    parts = {
        name: prop["description"]
        for body in ("Body_reconstruct_reconstruct_post", "Body_interpolate_interpolate_post")
        for name, prop in schemas[body]["properties"].items()
    }
    for name in ("file", "file_a", "file_b"):
        for limit in (
            "JPEG, PNG",
            "at least 8 px",
            "at most 10:1",
            "CARVAE_MAX_IMAGE_PIXELS",
            "10 MiB by default",
        ):
            assert limit in parts[name], (name, limit)
    assert "2 to 32 (default 8)" in parts["steps"]
    steps_query = next(p for p in spec["paths"]["/interpolate"]["post"]["parameters"] if p["name"] == "steps")
    assert steps_query["description"] == parts["steps"]


def test_openapi_says_the_multipart_bodies_take_no_other_parts(client: TestClient) -> None:
    """The upload routes refuse a part they do not take (`-F format=jpeg`), as the JSON bodies refuse an
    unknown field: their schemas say so, so that generated clients and schema-driven testers know."""
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, parts in (
        ("/reconstruct", {"file"}),
        ("/encode", {"file"}),
        ("/interpolate", {"file_a", "file_b", "steps"}),
    ):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        body = schemas[ref.rsplit("/", 1)[1]]
        assert body["additionalProperties"] is False and set(body["properties"]) == parts, path
    assert schemas["SampleRequest"]["additionalProperties"] is False


def _check_documented_headers(spec: dict[str, Any], method: str, path: str, r: Any) -> set[str]:
    """The response's headers against what /openapi.json documents for its status: every required one is
    there and every documented one present has its schema's type and bounds. Returns the names checked."""
    documented = spec["paths"][path][method.lower()]["responses"][str(r.status_code)].get("headers", {})
    for name, header in documented.items():
        value = r.headers.get(name)
        assert value is not None or not header.get("required"), (method, path, r.status_code, name)
        if value is not None and header["schema"]["type"] == "integer":
            assert value.isdigit() and int(value) >= header["schema"].get("minimum", 0), (path, name, value)
    return set(documented)


def test_openapi_documents_the_response_headers_clients_act_on(client: TestClient) -> None:
    """X-Seed (the seed to send back), Retry-After (when to retry) and X-Request-ID (what to quote) were
    only in prose: generated clients did not expose them and schemathesis did not check them."""
    spec = client.get("/openapi.json").json()
    sample = client.post("/sample", json={"n": 1})
    assert {"X-Seed", "X-Request-ID", "Vary"} <= _check_documented_headers(spec, "POST", "/sample", sample)
    sample_json = client.post("/sample", json={"n": 1, "seed": 5}, headers=JSON_ACCEPT)
    assert sample_json.json()["seed"] == int(sample_json.headers["x-seed"]) == 5
    _check_documented_headers(spec, "POST", "/sample", sample_json)
    for path in ("/healthz", "/v1/model"):
        assert "X-Request-ID" in _check_documented_headers(spec, "GET", path, client.get(path))
    assert "X-Request-ID" in _check_documented_headers(
        spec, "POST", "/encode", client.post("/encode", files=upload())
    )
    bad = client.post("/reconstruct?format=gif", files=upload())
    assert "X-Request-ID" in _check_documented_headers(spec, "POST", "/reconstruct", bad)
    client.app.state.ready = False  # type: ignore[attr-defined]
    try:
        for method, path in (("POST", "/sample"), ("GET", "/v1/model")):
            r = client.request(method, path)
            assert_error(r, 503, "overloaded")
            assert "Retry-After" in _check_documented_headers(spec, method, path, r), path
            assert "retry-after" in r.headers
    finally:
        client.app.state.ready = True  # type: ignore[attr-defined]


@pytest.mark.skipif(not (STATIC_DIR / "index.html").is_file(), reason="the web page is not there")
def test_web_page_and_static_files_stay_open(make_client: Any) -> None:
    client = make_client(API_KEY="k")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    asset = next(p for p in STATIC_DIR.rglob("*") if p.is_file())
    r = client.get("/static/" + asset.relative_to(STATIC_DIR).as_posix())
    assert r.status_code == 200 and r.content == asset.read_bytes()
    assert_error(client.get("/static/no-such-file.js"), 404, "not_found")
    assert_error(client.get("/static/%2e%2e/config.py"), 404, "not_found")  # no way out of the folder


@pytest.mark.skipif(not (STATIC_DIR / "index.html").is_file(), reason="the web page is not there")
def test_the_page_is_revalidated_and_api_answers_are_never_stored(client: TestClient) -> None:
    """After a redeploy a browser must not run cached JavaScript against the new API: the page, its
    assets and the docs are `no-cache` (kept, revalidated on every use: 304 while unchanged), and API
    answers (reconstructions, the model card, errors) `no-store`."""
    asset = "/static/" + next(p for p in STATIC_DIR.rglob("*.js")).relative_to(STATIC_DIR).as_posix()
    for path in ("/", asset, "/docs", "/docs/assets/swagger-ui.css"):
        first = client.get(path)
        assert first.status_code == 200 and first.headers["cache-control"] == "no-cache", path
        if path == "/docs":
            continue  # generated per request: no validator, a revalidation fetches it again
        for validator in (
            {"If-None-Match": first.headers["etag"]},
            {"If-Modified-Since": first.headers["last-modified"]},
        ):
            again = client.get(path, headers=validator)
            assert again.status_code == 304 and again.content == b"", (path, validator)
            assert (
                again.headers["cache-control"] == "no-cache"
                and again.headers["etag"] == first.headers["etag"]
            )
    photo = {"file": ("c.png", photo_bytes(), "image/png")}
    answers = [
        client.post("/reconstruct", files=photo),
        client.post("/reconstruct", files=photo, headers=JSON_ACCEPT),
        client.post("/sample", json={"n": 1, "seed": 1}),
        client.get("/v1/model"),
        client.get("/healthz"),
        client.post("/reconstruct", files={"file": ("c.png", b"not an image", "image/png")}),  # 415
        client.get("/static/no-such-file.js"),  # 404 rewritten into the JSON shape
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 415, 404]
    assert [r.headers.get("cache-control") for r in answers[:-1]] == ["no-store"] * 6
    assert answers[-1].headers["cache-control"] == "no-cache"  # under the page's files: revalidated too


@pytest.mark.skipif(not (STATIC_DIR / "index.html").is_file(), reason="the web page is not there")
def test_browsers_get_a_content_security_policy_for_every_kind_of_response(client: TestClient) -> None:
    """nosniff and no Referer on everything; the web page may load from its own origin only and not be
    framed; the docs page allows Swagger UI's inline script by its hash alone; API answers, errors
    included, may load and run nothing. A browser test checks that the page and the docs work under them."""

    def policy(r: Any) -> str:
        assert (
            r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        )
        values = r.headers.get_list("content-security-policy")
        assert len(values) == 1, values
        return str(values[0])

    asset = "/static/" + next(p for p in STATIC_DIR.rglob("*.js")).relative_to(STATIC_DIR).as_posix()
    for path in ("/", asset):
        page = policy(client.get(path))
        assert "script-src 'self';" in page and "frame-ancestors 'none'" in page
        assert "unsafe" not in page
    docs = policy(client.get("/docs"))
    assert re.search(r"script-src 'self' 'sha256-[A-Za-z0-9+/]{43}='", docs) and "unsafe-eval" not in docs
    assert "'unsafe-inline'" not in docs.split("script-src")[1].split(";")[0]
    photo = {"file": ("c.png", photo_bytes(), "image/png")}
    answers = [
        client.post("/reconstruct", files=photo),
        client.get("/v1/model"),
        client.get("/openapi.json"),
        client.post("/reconstruct", files={"file": ("c.png", b"not an image", "image/png")}),  # 415
        client.get("/no-such-page"),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 415, 404]
    assert {policy(r) for r in answers} == {"default-src 'none'; frame-ancestors 'none'"}


def test_negotiated_responses_vary_on_accept(client: TestClient) -> None:
    """Image endpoints answer image bytes or JSON by Accept: both forms say `Vary: Accept`, so a cache
    between client and service never hands the PNG to a client that asked for JSON, or back."""
    photo = {"file": ("c.png", photo_bytes(), "image/png")}
    two = {
        "file_a": ("a.png", photo_bytes(), "image/png"),
        "file_b": ("b.png", photo_bytes(seed=1), "image/png"),
    }
    calls: dict[str, dict[str, Any]] = {
        "/reconstruct": {"files": photo},
        "/interpolate": {"files": two, "data": {"steps": "3"}},
        "/sample": {"json": {"n": 2, "seed": 1}},
        "/decode": {"json": {"z": [[0.0] * TINY.latent_dim]}},
    }
    for path, kwargs in calls.items():
        for headers in ({}, JSON_ACCEPT):
            r = client.post(path, headers=headers, **kwargs)
            assert r.status_code == 200 and r.headers["vary"] == "Accept", (path, headers, r.headers)


@pytest.mark.parametrize(
    ("accept", "query", "fmt", "as_json"),
    [
        (None, None, "png", False),
        ("*/*", None, "png", False),
        ("image/*", None, "png", False),
        ("image/webp", None, "webp", False),
        ("image/jpeg", None, "jpeg", False),
        ("image/webp;q=0.5, image/jpeg", None, "jpeg", False),
        ("image/jpeg, image/png", None, "png", False),  # a tie goes to the default
        ("image/webp, image/jpeg", None, "webp", False),  # else to the first listed
        ("image/avif", None, "png", False),  # a type we do not make: the default, not a 406
        ("image/webp", "png", "png", False),  # ?format= wins
        ("application/json", None, "png", True),
        ("application/json", "webp", "webp", True),
        ("image/png, application/json", None, "png", True),
        ("image/png, application/json;q=0.5", None, "png", False),
        ("application/json;q=0", None, "png", False),
        # Each type is rated by the most specific range that matches it (RFC 9110), wildcards included:
        ("*/*;q=0.9, application/json;q=0.5", None, "png", False),  # any image is preferred to JSON
        ("image/jpeg;q=0.5, image/*", None, "png", False),  # PNG rated 1 through image/*, JPEG 0.5
        ("image/png;q=0.1, image/*", None, "jpeg", False),  # anything but PNG
        ("application/*", None, "png", True),  # JSON is the only application type we make
        ("application/json, text/plain, */*", None, "png", True),  # axios' default
    ],
)
def test_negotiate(accept: str | None, query: Any, fmt: Any, as_json: bool) -> None:
    assert negotiate(accept, query) == Output(fmt, as_json)


def test_accept_picks_the_encoding_of_the_image(client: TestClient) -> None:
    photo = {"file": ("c.png", photo_bytes(), "image/png")}
    webp = client.post("/reconstruct", files=photo, headers={"Accept": "image/webp"})
    assert webp.headers["content-type"] == "image/webp" and webp.content[:4] == b"RIFF"
    jpeg = client.post("/sample", json={"n": 2, "seed": 3}, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    query_wins = client.post("/reconstruct?format=png", files=photo, headers={"Accept": "image/webp"})
    assert query_wins.headers["content-type"] == "image/png"


def test_encode_refuses_an_accept_that_rules_out_json_with_406(client: TestClient) -> None:
    """/encode answered JSON to `Accept: image/png` with a 200: a client told it got what it did not ask
    for. Accept is judged as the image routes judge it; what takes JSON at all still gets it."""
    for accept in ("image/png", "text/html", "image/*", "application/json;q=0, */*"):
        err = assert_error(
            client.post("/encode", files=upload(), headers={"Accept": accept}), 406, "not_acceptable"
        )
        assert "/encode answers application/json" in err["message"] and accept in err["message"], err
    takes_json = [
        None,
        "*/*",
        "application/*",
        "application/json",
        "image/png, application/json;q=0.1",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser's
    ]
    for accept in takes_json:
        r = client.post("/encode", files=upload(), headers={} if accept is None else {"Accept": accept})
        assert r.status_code == 200 and len(r.json()["mu"]) == TINY.latent_dim, (accept, r.text)
    responses = client.get("/openapi.json").json()["paths"]["/encode"]["post"]["responses"]
    assert "application/json" in responses["406"]["description"]
    assert "ErrorResponse" in json.dumps(responses["406"])


def test_the_format_query_takes_any_case_as_the_settings_do(client: TestClient) -> None:
    """`?format=PNG` was a 422 (the enum is lower case) while CARVAE_DEVICE=CPU is taken: a word, not a
    name. /openapi.json still lists the lower-case values."""
    photo = {"file": ("c.png", photo_bytes(), "image/png")}
    for given, media in (("PNG", "image/png"), (" Jpeg ", "image/jpeg"), ("WebP", "image/webp")):
        r = client.post("/reconstruct", params={"format": given}, files=photo)
        assert r.status_code == 200 and r.headers["content-type"] == media, (given, r.text)
    sampled = client.post("/sample?format=JPEG", json={"n": 1, "seed": 1}, headers=JSON_ACCEPT)
    assert sampled.status_code == 200 and sampled.json()["format"] == "jpeg"
    assert_error(client.post("/reconstruct?format=GIF", files=photo), 422, "validation_error")
    spec = client.get("/openapi.json").json()
    (param,) = [p for p in spec["paths"]["/reconstruct"]["post"]["parameters"] if p["name"] == "format"]
    assert param["schema"]["anyOf"][0]["enum"] == ["png", "jpeg", "webp"]


def test_the_gil_switch_interval_is_short_while_serving_and_restored_after(service_checkpoint: Path) -> None:
    original = sys.getswitchinterval()  # other apps of this test session may be serving (and have set it)
    sys.setswitchinterval(0.004)
    try:
        with TestClient(create_app(make_settings(service_checkpoint))):
            assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(original)


def test_serving_an_unfinished_run_says_so_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer saves its best epoch so far while it runs; pointing the service at it (a look at a run
    in progress, or a killed one) works, with a warning that it is not the run's model."""
    unfinished = {"complete": False, "epochs_done": 2, "lr_schedule": {"planned_epochs": 30}}
    for training, warned in ((unfinished, True), ({**unfinished, "complete": True}, False)):
        path = tmp_path / f"{warned}.safetensors"
        save_checkpoint(path, VAE(TINY), PreprocessPolicy(image_size=S), training=training)
        caplog.clear()
        app = create_app(make_settings(path))
        with caplog.at_level(logging.WARNING, logger="carvae.service"), TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
        lines = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
        assert len(lines) == warned, lines
        if warned:
            assert lines[0].startswith(f"{path} is from a training run that did not finish")
            assert "weights of epoch 2 of 30 planned" in lines[0] and "N(0, I)" in lines[0]
