"""SIGTERM on a real `python -m service` with requests in flight: it stops accepting at once, answers
every request it had accepted (0 lost), and exits 0 within a bound."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import ServerProcess, decode_png, photo_bytes

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.slow

IN_FLIGHT = 6
BOUNDARY = "carvaeboundary"
EXIT_BOUND_S = 15  # REQUEST_TIMEOUT_S (5) + uvicorn's grace of 5 s + slack for a loaded CI machine


def _split_upload(port: int, data: bytes) -> tuple[socket.socket, bytes]:
    """Send the head and half of a /reconstruct upload; return the socket and the half still to send."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        "POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def _in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return next(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "carvae_in_flight_requests"
    )


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(20)
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_sigterm_finishes_every_accepted_request_then_exits_0(service_checkpoint: Path) -> None:
    srv = ServerProcess(
        CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, REQUEST_TIMEOUT_S=5, LOG_LEVEL="info"
    )
    try:
        srv.wait_ready()
        photos = [photo_bytes(seed=i) for i in range(IN_FLIGHT)]
        uploads = [_split_upload(srv.port, p) for p in photos]
        end = time.monotonic() + 10
        while _in_flight(srv.url) < IN_FLIGHT:  # the server has accepted all of them and reads their bodies
            assert time.monotonic() < end, "uploads not accepted"
            time.sleep(0.05)
        idle = socket.create_connection(("127.0.0.1", srv.port))  # a keep-alive connection with no request

        t0 = time.monotonic()
        srv.proc.terminate()
        end = time.monotonic() + 5
        while not _refuses_connections(srv.port):  # stops accepting new connections at once
            assert time.monotonic() < end, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        assert srv.proc.poll() is None, "exited with requests in flight"

        time.sleep(0.5)  # the accepted clients are slow: they finish their uploads after the signal
        for sock, rest in uploads:
            sock.sendall(rest)
        answers = [_read_response(sock) for sock, _ in uploads]
        for sock, _ in uploads:
            sock.close()
        idle.settimeout(10)
        assert idle.recv(1) == b"", "the idle keep-alive connection is closed, not left hanging"
        idle.close()

        code = srv.proc.wait(EXIT_BOUND_S)
        elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    log = srv.output()
    assert code == 0, log
    assert elapsed < EXIT_BOUND_S
    for status, headers, body in answers:  # 0 lost: every accepted request got its reconstruction
        assert status == 200, body[:200]
        assert headers["content-type"] == "image/png" and decode_png(body).shape == (32, 32, 3)
    assert "Traceback" not in log and "stopped" in log


def _status(url: str) -> int:
    return httpx.get(url, timeout=5).status_code


def test_sigterm_drains_with_readyz_503_while_serving_then_stops(service_checkpoint: Path) -> None:
    """CARVAE_SHUTDOWN_DELAY_S: a load balancer's probe sees 503 while requests are still answered, and
    only then does the port close. Also: CARVAE_KEEP_ALIVE_S closes idle connections, and every log line,
    uvicorn's included, has one format."""
    delay = 2.0
    srv = ServerProcess(
        CHECKPOINT=service_checkpoint,
        DEVICE="cpu",
        TORCH_THREADS=1,
        LOG_LEVEL="info",
        SHUTDOWN_DELAY_S=delay,
        KEEP_ALIVE_S=1,
    )
    try:
        srv.wait_ready()
        with socket.create_connection(("127.0.0.1", srv.port)) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.settimeout(10)
            response = b""
            while b"\r\n\r\n" not in response:
                response += idle.recv(65536)
            head, _, body = response.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            assert length is not None
            while len(body) < int(length.group(1)):
                body += idle.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
            t_idle = time.monotonic()
            assert idle.recv(1) == b"", "the idle connection is closed by the server"
            idle_for = time.monotonic() - t_idle
        assert 0.5 < idle_for < 4, idle_for  # 1 s, not uvicorn's default of 5

        t0 = time.monotonic()
        srv.proc.terminate()
        end = time.monotonic() + 1.5
        while _status(srv.url + "/readyz") != 503:
            assert time.monotonic() < end, "/readyz still 200 after SIGTERM"
            time.sleep(0.05)
        assert _status(srv.url + "/healthz") == 200
        files = {"file": ("c.png", photo_bytes(), "image/png")}
        served = httpx.post(srv.url + "/reconstruct", files=files, timeout=10)
        assert served.status_code == 200 and decode_png(served.content).shape == (32, 32, 3)
        assert served.headers["connection"] == "close"  # clients leave this instance's pooled connections
        # An error the middleware rewrites as JSON too (StaticFiles' plain-text 416): before, it kept the
        # connection open.
        unsatisfiable = httpx.get(srv.url + "/static/app.js", headers={"Range": "bytes=999999-"}, timeout=5)
        assert unsatisfiable.status_code == 416 and unsatisfiable.headers["connection"] == "close"
        ready = [
            s.value
            for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics", timeout=5).text)
            for s in fam.samples
            if s.name == "carvae_ready"
        ]
        assert ready == [0]
        assert time.monotonic() - t0 < delay, "the checks above ran inside the delay"
        end = time.monotonic() + delay + 5
        while not _refuses_connections(srv.port):
            assert time.monotonic() < end, "the port is still open long after the delay"
            time.sleep(0.05)
        closed_after = time.monotonic() - t0
        code = srv.proc.wait(EXIT_BOUND_S)
    finally:
        srv.stop()
    log = srv.output()
    assert code == 0, log
    assert closed_after >= delay - 0.2, closed_after
    assert "draining: /readyz answers 503" in log and "Traceback" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert any("uvicorn" in line for line in lines)
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ", line), line


def test_a_second_signal_cuts_the_drain_delay_short(service_checkpoint: Path) -> None:
    srv = ServerProcess(CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, SHUTDOWN_DELAY_S=60)
    try:
        srv.wait_ready()
        srv.proc.terminate()
        end = time.monotonic() + 1.5
        while _status(srv.url + "/readyz") != 503:
            assert time.monotonic() < end, "/readyz still 200 after SIGTERM"
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.proc.terminate()
        code = srv.proc.wait(10)
        assert time.monotonic() - t0 < 5
    finally:
        srv.stop()
    assert code == 0, srv.output()


def test_sigterm_while_the_model_loads_stops_with_status_0(service_checkpoint: Path) -> None:
    srv = ServerProcess(CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, LOG_LEVEL="debug")
    try:
        code = _signal_after_line(srv, "loading")  # main() has read the settings; the model loads next
    finally:
        srv.stop()
    assert code == 0, srv.output()


def _signal_after_line(srv: ServerProcess, marker: str) -> int:
    """SIGTERM as soon as the server prints `marker`; its exit status (it must come within 10 s)."""
    assert srv.proc.stdout is not None
    seen = ""
    while marker not in seen:
        line = srv.proc.stdout.readline()
        assert line, f"exited before {marker!r}: {seen}"
        seen += line
    srv.proc.terminate()
    return srv.proc.wait(10)


def test_sigterm_while_importing_stops_with_status_0(service_checkpoint: Path) -> None:
    """The handler goes in before torch is imported (~2 s): a stop that early is not lost either."""
    srv = ServerProcess(CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1)
    try:
        time.sleep(0.4)
        assert srv.proc.poll() is None
        srv.proc.terminate()
        code = srv.proc.wait(10)
    finally:
        srv.stop()
    assert code == 0, srv.output()


def test_sigterm_while_warming_up_skips_the_drain_delay(service_checkpoint: Path) -> None:
    """An instance that never became ready has no traffic to drain: it stops without the delay."""
    srv = ServerProcess(
        CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, LOG_LEVEL="info", SHUTDOWN_DELAY_S=60
    )
    try:
        code = _signal_after_line(srv, "Waiting for application startup")
    finally:
        srv.stop()
    assert code == 0, srv.output()


def test_a_request_cancelled_by_the_stop_gets_a_json_503() -> None:
    """uvicorn cancels what is still running when its graceful stop times out: the client gets the one
    error shape (not uvicorn's plain-text 500) and the cancellation ends at the outermost layer."""
    from service.metrics import Metrics
    from service.middleware import RequestContextMiddleware

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(60)

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    metrics = Metrics()

    async def run() -> None:
        scope = {"type": "http", "method": "POST", "path": "/reconstruct", "headers": []}
        task = asyncio.create_task(RequestContextMiddleware(stuck, metrics)(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        await task  # does not raise

    asyncio.run(run())
    assert sent[0]["status"] == 503
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "unavailable"
    # a 503 of the stop: counted with the service's other refusals
    assert metrics.registry.get_sample_value("carvae_rejected_total", {"reason": "stopping"}) == 1
