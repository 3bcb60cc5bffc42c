"""The service as deployed: `python -m service` start-up failures, and real uvicorn servers on loopback
with concurrent clients (batching, the README's curl line, client disconnects, SIGTERM)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import (
    ROOT,
    SERVICE_COMMAND,
    ServerProcess,
    decode_png,
    free_port,
    make_settings,
    photo_bytes,
    run_service,
    serving,
)

from service.__main__ import main
from service.config import Settings
from service.main import create_app

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.slow


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("carvae: error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "bit-flipped"])
def test_bad_checkpoint_stops_startup_with_one_line(
    case: str, service_checkpoint: Path, tmp_path: Path
) -> None:
    good = service_checkpoint.read_bytes()
    path = tmp_path / "model.safetensors"
    if case == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "bit-flipped":
        flipped = bytearray(good)
        flipped[-10] ^= 0x01  # inside the last tensor's data
        path.write_bytes(bytes(flipped))
    line = _one_line_error(run_service(CHECKPOINT=path, DEVICE="cpu"))
    assert str(path) in line
    expected = {
        "missing": "does not exist",
        "garbage": "not a readable",
        "truncated": "",
        "bit-flipped": "integrity",
    }[case]
    assert expected in line


def test_a_taken_port_exits_3(service_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_service(CHECKPOINT=service_checkpoint, DEVICE="cpu", HOST="127.0.0.1", PORT=port)
    assert result.returncode == 3, result.stderr
    # One line, before the model is loaded: uvicorn's own report came after "ready" was logged.
    assert result.stderr.strip() == (
        f"carvae: error: cannot listen on 127.0.0.1 port {port} (address already in use): another server "
        "is there; stop it or choose another CARVAE_PORT"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(service_checkpoint: Path) -> None:
    assert "CUDA is not available" in _one_line_error(
        run_service(CHECKPOINT=service_checkpoint, DEVICE="cuda")
    )


def test_invalid_setting_is_named(service_checkpoint: Path) -> None:
    assert "CARVAE_PORT" in _one_line_error(run_service(CHECKPOINT=service_checkpoint, PORT="eighty"))


def test_an_invalid_setting_shows_the_value_it_got(service_checkpoint: Path) -> None:
    """ "Input should be less than or equal to 1000" alone left CARVAE_MAX_WAIT_MS=nan a riddle."""
    line = _one_line_error(run_service(CHECKPOINT=service_checkpoint, MAX_WAIT_MS="nan"))
    assert line == (
        "carvae: error: invalid setting CARVAE_MAX_WAIT_MS: Input should be less than or equal to 1000 "
        "(got 'nan')"
    )


def _readme_defaults() -> dict[str, str]:
    """README's settings table: variable -> its default cell."""
    defaults = {}
    for row in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`CARVAE_"):
            names = cells[0].split(" / ")  # `CARVAE_HOST` / `CARVAE_PORT` share a row
            values = cells[1].split(" / ") if len(names) > 1 else [cells[1]]
            for name, value in zip(names, values, strict=True):
                defaults[name.strip("`")] = value
    return defaults


def test_help_lists_every_setting_with_the_readme_default(capsys: pytest.CaptureFixture[str]) -> None:
    """The README says --help "prints the same list": it printed Python's reprs ([True], [5.0], [[]])
    where the table and the variable say true, 5 and empty."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    entries = re.split(r"\n  (?=CARVAE_)", capsys.readouterr().out.split("(defaults in brackets):")[1])
    shown = {e.split()[0]: " ".join(e.split()) for e in entries if e.strip()}
    documented = _readme_defaults()
    for name in Settings.model_fields:
        variable = f"CARVAE_{name}"
        cell = documented[variable]
        literal = re.fullmatch(r"`([^`]*)`", cell)
        expected = literal.group(1) if literal else "empty" if cell == "empty" else "unset"
        assert shown[variable].endswith(f"[{expected}]"), (shown[variable], cell)


def test_a_mistyped_variable_is_warned_about(tmp_path: Path) -> None:
    """extra="ignore" dropped CARVAE_MAX_BATCH=64 without a word: the service ran with 32."""
    proc = run_service(CHECKPOINT=tmp_path / "missing.safetensors", MAX_BATCH="64")
    assert proc.returncode == 2, proc.stderr
    warning, error = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert warning.endswith(
        "WARNING carvae.service: CARVAE_MAX_BATCH is not a setting (ignored); did you mean "
        "CARVAE_MAX_BATCH_SIZE?"
    ), warning
    assert error.startswith("carvae: error: checkpoint ") and "does not exist" in error


def test_a_host_that_does_not_resolve_is_named(service_checkpoint: Path) -> None:
    """It used to load the model, log "ready", then exit 3 with uvicorn's bare "[Errno -2] Name or
    service not known": neither the setting nor the value in sight."""
    line = _one_line_error(run_service(CHECKPOINT=service_checkpoint, DEVICE="cpu", HOST="999.1.1.1"))
    assert "CARVAE_HOST" in line and "'999.1.1.1'" in line, line


# -- a real `python -m service` --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    with serving(service_checkpoint, MAX_WAIT_MS=10) as srv:
        yield srv


async def _hammer(url: str, datas: list[bytes], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(data: bytes) -> httpx.Response:
            async with sem:
                return await client.post(
                    "/encode",
                    files={"file": ("car.png", data, "image/png")},
                    headers={"Accept": "application/json"},
                )

        return list(await asyncio.gather(*(one(d) for d in datas)))


def test_concurrent_clients_form_batches_with_identical_results(server: ServerProcess) -> None:
    target = photo_bytes(seed=7)
    alone = httpx.post(server.url + "/encode", files={"file": ("car.png", target, "image/png")}).json()["mu"]
    datas = [target if i % 8 == 0 else photo_bytes(seed=i) for i in range(128)]
    responses = asyncio.run(_hammer(server.url, datas, concurrency=32))
    assert [r.status_code for r in responses] == [200] * len(datas)
    for i in range(0, len(datas), 8):  # the target, answered from whatever batch it landed in
        assert np.allclose(responses[i].json()["mu"], alone, atol=1e-5)

    text = httpx.get(server.url + "/metrics").text
    samples = {
        (s.name, s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("carvae_batch_size") and s.labels.get("op") == "encode"
    }
    batches, rows = samples[("carvae_batch_size_count", None)], samples[("carvae_batch_size_sum", None)]
    singles = samples[("carvae_batch_size_bucket", "1.0")]
    assert rows == len(datas) + 1
    assert batches < rows and singles < batches, samples  # some forward passes carried several requests


def _gc_collections(url: str, generation: str | None = None) -> float:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == "python_gc_collections_total" and generation in (None, s.labels["generation"])
    )


_CONSOLE_SCRIPT = shutil.which("carvae-serve", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(SERVICE_COMMAND, id="python -m service"),
        pytest.param(
            (_CONSOLE_SCRIPT or "carvae-serve",),
            id="carvae-serve",
            marks=pytest.mark.skipif(_CONSOLE_SCRIPT is None, reason="the package is not installed"),
        ),
    ],
)
def test_start_up_runs_without_the_collector_and_serving_with_it(
    service_checkpoint: Path, command: tuple[str, ...]
) -> None:
    """Both launchers start with the cyclic GC off (start-up speed: importing torch with it on runs
    several full collections) and the lifespan turns it back on: left off, every reference cycle a request
    makes would be memory never returned. A stop is still status 0."""
    with serving(service_checkpoint, command=command, MAX_WAIT_MS=10) as srv:
        assert _gc_collections(srv.url, generation="2") == 0
        before = _gc_collections(srv.url)
        asyncio.run(_hammer(srv.url, [photo_bytes(seed=i) for i in range(64)], concurrency=8))
        assert _gc_collections(srv.url) > before
        assert srv.stop() == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_line(server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "car.jpg").write_bytes(photo_bytes(80, 50, seed=1, fmt="JPEG"))
    subprocess.run(
        ["curl", "-sS", "-f", "-F", "file=@car.jpg", f"{server.url}/reconstruct", "-o", "reconstruction.png"],
        cwd=tmp_path,
        check=True,
        timeout=30,
    )
    assert decode_png((tmp_path / "reconstruction.png").read_bytes()).shape == (32, 32, 3)


def test_head_on_get_routes_sends_headers_only(server: ServerProcess) -> None:
    """Monitors probe with HEAD: the GET route's status and headers, no body on the wire (the next
    response on the same keep-alive connection parses cleanly, so no stray body bytes were sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            conn.request("GET", path)
            got = conn.getresponse()
            body = got.read()
            conn.request("HEAD", path)
            head = conn.getresponse()
            assert head.status == got.status == 200, path
            assert head.getheader("content-type") == got.getheader("content-type"), path
            assert head.read() == b"" and len(body) > 0
        conn.request("GET", "/healthz")
        assert conn.getresponse().read().startswith(b"{")
        conn.request("HEAD", "/reconstruct")  # a POST route: still 405
        refused = conn.getresponse()
        assert refused.status == 405 and refused.read() == b""
    finally:
        conn.close()


def test_sigterm_exits_cleanly(server: ServerProcess) -> None:
    t0 = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - t0 < 15


def test_a_start_up_error_is_one_json_line_under_json_logs(tmp_path: Path) -> None:
    result = run_service(CHECKPOINT=tmp_path / "missing.safetensors", DEVICE="cpu", LOG_FORMAT="json")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "does not exist" in record["message"]


def test_json_logs_one_object_per_line(service_checkpoint: Path) -> None:
    """CARVAE_LOG_FORMAT=json: every line a collector reads is JSON, uvicorn's included, and a request's
    fields are keys, not text inside the message."""
    with serving(service_checkpoint, LOG_FORMAT="json", LOG_LEVEL="info") as srv:
        assert httpx.get(srv.url + "/v1/model", headers={"X-Request-ID": "json-log-test"}).status_code == 200
        assert srv.stop() == 0
    records = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
    assert {"uvicorn.error", "carvae.service"} <= {r["logger"] for r in records}
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert not any("color_message" in r for r in records)  # uvicorn's ANSI-coloured duplicate
    (request,) = [r for r in records if r.get("request_id") == "json-log-test"]
    assert request["route"] == "/v1/model" and request["status"] == 200 and request["method"] == "GET"
    assert isinstance(request["ms"], float) and request["time"].endswith("Z")


# -- in-process uvicorn, so a slow model can be injected -------------------------------------------
class ThreadedServer:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _raw_upload(port: int, data: bytes) -> socket.socket:
    """Send a complete multipart /reconstruct request on a raw socket and return it without reading."""
    boundary = "carvaeboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + body)
    return sock


def test_disconnected_client_costs_no_forward_pass(service_checkpoint: Path) -> None:
    app = create_app(make_settings(service_checkpoint, MAX_BATCH_SIZE=1))
    with ThreadedServer(app) as srv:
        batcher = app.state.pipeline.batcher
        original = batcher.handlers["reconstruct"]
        entered, gate, seen = threading.Event(), threading.Event(), []

        def slow(payloads: list[Any]) -> Any:
            seen.append(len(payloads))
            entered.set()
            gate.wait(10)
            return original(payloads)

        batcher.handlers["reconstruct"] = slow
        first = _raw_upload(srv.port, photo_bytes(seed=1))
        assert entered.wait(10)
        leaver = _raw_upload(srv.port, photo_bytes(seed=2))
        end = time.monotonic() + 5
        while batcher.depth() < 1 and time.monotonic() < end:
            time.sleep(0.01)
        assert batcher.depth() == 1
        leaver.close()  # the client gives up while its job waits for the model
        end = time.monotonic() + 5
        while batcher.depth() and time.monotonic() < end:
            time.sleep(0.01)  # withdrawn: the future is cancelled; the worker drops it on its next pass
        gate.set()
        first.settimeout(10)
        assert first.recv(64).startswith(b"HTTP/1.1 200")
        first.close()
        ok = httpx.post(
            f"http://127.0.0.1:{srv.port}/reconstruct", files={"file": ("c.png", photo_bytes(), "image/png")}
        )
        assert ok.status_code == 200
        assert seen == [1, 1], seen  # the first request and the last one; never the abandoned one
        assert batcher.stats.skipped == 1


def test_root_path_setting_is_checked(service_checkpoint: Path) -> None:
    assert "CARVAE_ROOT_PATH" in _one_line_error(
        run_service(CHECKPOINT=service_checkpoint, ROOT_PATH="carvae/")
    )


def test_behind_a_prefix_stripping_proxy(service_checkpoint: Path) -> None:
    """CARVAE_ROOT_PATH=/carvae: the proxy serves /carvae/x and forwards /x. The docs and the schema must
    point at /carvae/..., while auth, the page's cache rules, per-route body limits and metrics labels
    still see the app's own paths (uvicorn puts the prefix in front of every path it hands the app)."""
    key = {"X-API-Key": "k"}
    with serving(service_checkpoint, ROOT_PATH="/carvae", API_KEY="k", MAX_JSON_BYTES=2048) as srv:
        docs = httpx.get(srv.url + "/docs").text
        assert "/carvae/openapi.json" in docs and "/carvae/docs/assets/swagger-ui-bundle.js" in docs
        assert httpx.get(srv.url + "/openapi.json").json()["servers"] == [{"url": "/carvae"}]
        assert httpx.get(srv.url + "/healthz").status_code == 200  # open without the key
        assert httpx.head(srv.url + "/readyz").status_code == 200
        files = {"file": ("car.png", photo_bytes(), "image/png")}
        assert httpx.post(srv.url + "/reconstruct", files=files).status_code == 401
        answer = httpx.post(srv.url + "/reconstruct", files=files, headers=key)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        page_file = httpx.get(srv.url + "/static/app.js")
        assert page_file.status_code == 200 and page_file.headers["cache-control"] == "no-cache"
        big_json = httpx.post(srv.url + "/sample", json={"n": 1, "pad": "x" * 4096}, headers=key)
        assert big_json.status_code == 413  # the JSON limit, not the upload limit
        metrics = httpx.get(srv.url + "/metrics").text
    counted = {
        (s.labels["route"], s.labels["status"])
        for family in text_string_to_metric_families(metrics)
        if family.name == "carvae_requests"
        for s in family.samples
        if s.name == "carvae_requests_total"
    }
    assert {("/docs", "200"), ("/reconstruct", "200"), ("/static", "200"), ("/sample", "413")} <= counted
    assert not any(route == "unmatched" for route, _ in counted), counted


def test_forwarded_proto_is_believed_only_from_the_allowed_proxies(service_checkpoint: Path) -> None:
    """A proxy in another container is not 127.0.0.1: CARVAE_FORWARDED_ALLOW_IPS names it, and the
    service's own redirects then keep the client's https (a test client on loopback stands in for it,
    so the default, which trusts loopback, is told to trust nobody here instead)."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    for allowed, scheme in (("192.0.2.1", "http"), ("127.0.0.1", "https")):
        with serving(service_checkpoint, FORWARDED_ALLOW_IPS=allowed) as srv:
            moved = httpx.get(srv.url + "/static", headers=forwarded)
        assert moved.status_code == 307 and moved.headers["location"].startswith(f"{scheme}://"), allowed


@pytest.mark.parametrize("allowed", ["nginx", "192.0.2.1, 10.0.0.1/8"])
def test_a_forwarded_allow_entry_that_can_never_match_is_refused(
    allowed: str, service_checkpoint: Path
) -> None:
    """uvicorn keeps a host name (the compose service name "nginx") or a network with host bits set as a
    literal that no TCP peer's address equals: the service started and ignored the proxy's headers."""
    started = run_service(
        timeout=30, CHECKPOINT=service_checkpoint, DEVICE="cpu", PORT=free_port(), FORWARDED_ALLOW_IPS=allowed
    )
    line = _one_line_error(started)
    bad = allowed.split(", ")[-1]
    assert f"invalid setting CARVAE_FORWARDED_ALLOW_IPS: {bad!r} is not an IP address or network" in line


@pytest.mark.parametrize("origins", ["https://cars.example/", "https://a.example, cars.example"])
def test_a_cors_origin_that_can_never_match_is_refused(origins: str, service_checkpoint: Path) -> None:
    """A browser's Origin is scheme://host[:port]; Starlette compares it as a string. An entry with a
    trailing slash or without its scheme used to start a service whose CORS stayed shut, unexplained."""
    started = run_service(
        timeout=30, CHECKPOINT=service_checkpoint, DEVICE="cpu", PORT=free_port(), CORS_ORIGINS=origins
    )
    bad = origins.split(", ")[-1]
    assert f"invalid setting CARVAE_CORS_ORIGINS: {bad!r} is not an origin" in _one_line_error(started)


def test_cors_origins_take_origins_and_star() -> None:
    valid = "https://cars.example, http://localhost:3000,*"
    assert Settings(CORS_ORIGINS=valid).CORS_ORIGINS == ["https://cars.example", "http://localhost:3000", "*"]


def test_forwarded_allow_ips_takes_addresses_networks_and_star() -> None:
    valid = ["*", "127.0.0.1,::1", "192.0.2.1, 10.0.0.0/8, fd00::/8", ""]
    assert [Settings(FORWARDED_ALLOW_IPS=v).FORWARDED_ALLOW_IPS for v in valid] == valid


def test_every_answer_on_the_docs_paths_has_one_content_security_policy(service_checkpoint: Path) -> None:
    """/docs and /docs/oauth2-redirect set their own policy (a hash for Swagger UI's inline script), so the
    middleware adds none there. Whatever else answers on those paths sets none either: before, a 405, a
    CORS preflight and the 400 for a refused origin went out with no Content-Security-Policy at all."""
    origin = "http://ui.example"
    with serving(service_checkpoint, CORS_ORIGINS=origin) as srv:
        preflight = {"Access-Control-Request-Method": "GET"}
        answers = {
            "page": httpx.get(srv.url + "/docs"),
            "HEAD": httpx.head(srv.url + "/docs"),
            "405": httpx.post(srv.url + "/docs"),
            "405 redirect page": httpx.delete(srv.url + "/docs/oauth2-redirect"),
            "preflight": httpx.options(srv.url + "/docs", headers={"Origin": origin, **preflight}),
            "refused origin": httpx.options(
                srv.url + "/docs", headers={"Origin": "http://x.example", **preflight}
            ),
        }
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {
        "page": 200,
        "HEAD": 200,
        "405": 405,
        "405 redirect page": 405,
        "preflight": 200,
        "refused origin": 400,
    }
    policies = {name: r.headers.get_list("content-security-policy") for name, r in answers.items()}
    assert all(len(p) == 1 for p in policies.values()), policies
    assert "'sha256-" in policies["page"][0] and policies["HEAD"] == policies["page"]
    others = {name: p[0] for name, p in policies.items() if name not in ("page", "HEAD")}
    assert set(others.values()) == {"default-src 'none'; frame-ancestors 'none'"}, others
    assert all(r.headers["x-content-type-options"] == "nosniff" for r in answers.values())
