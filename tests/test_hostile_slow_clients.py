"""Slow and stalled request bodies against a real `python -m service`, on raw sockets: a body that stops
arriving is answered 408 (JSON, connection closed) once CARVAE_BODY_TIMEOUT_S has passed, and the request
slot it held is free again; a slow body that arrives in time is served. Found by a hostile-input probe: a
short Content-Length lie or an unfinished chunked body held its admission slot for as long as the client
kept the connection open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_support import read_response
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import ServerProcess, photo_bytes, serving

from service.middleware import BodyLimitMiddleware

pytest_plugins = ["service_fixtures"]

TIMEOUT_S = 1.5
BOUNDARY = "slowboundary"


@pytest.fixture(scope="module")
def server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    with serving(service_checkpoint, MAX_IN_FLIGHT=2, BODY_TIMEOUT_S=TIMEOUT_S) as srv:
        yield srv


def _multipart(data: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n"
    ).encode()


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT_S + 10)


def _in_flight(srv: ServerProcess) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return next(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "carvae_in_flight_requests"
    )


@pytest.mark.slow
def test_stalled_bodies_get_408_and_free_their_slots(server: ServerProcess) -> None:
    body = _multipart(photo_bytes())
    short = _connect(server)  # declares the whole body, sends half of it, then stalls
    short.sendall(_head(len(body)) + body[: len(body) // 2])
    chunked = _connect(server)  # a chunked body whose last chunk never comes
    chunked.sendall(_head(None) + f"{len(body):x}\r\n".encode() + body + b"\r\n")
    started = time.monotonic()
    try:
        time.sleep(0.3)
        files = {"file": ("c.png", photo_bytes(), "image/png")}
        # Both slots (MAX_IN_FLIGHT=2) are held by the stalled uploads meanwhile.
        assert _in_flight(server) == 2
        assert httpx.post(server.url + "/reconstruct", files=files).status_code == 503
        for sock in (short, chunked):
            status, headers, payload = read_response(sock)
            waited = time.monotonic() - started
            assert status == 408 and headers["content-type"] == "application/json", (status, payload)
            error = json.loads(payload)["error"]
            assert error["code"] == "request_timeout" and error["request_id"] == headers["x-request-id"]
            assert f"{TIMEOUT_S:g} s" in error["message"]
            assert TIMEOUT_S - 0.2 <= waited <= TIMEOUT_S + 5, waited
            assert headers["connection"] == "close" and sock.recv(1) == b""  # closed after the answer
    finally:
        short.close()
        chunked.close()
    assert _in_flight(server) == 0
    response = httpx.post(server.url + "/reconstruct", files=files)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


@pytest.mark.slow
def test_a_slow_body_that_arrives_in_time_is_served(server: ServerProcess) -> None:
    body = _multipart(photo_bytes())
    pieces = [body[i : i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with _connect(server) as sock:
        sock.sendall(_head(len(body)))
        for piece in pieces:  # four pieces over ~0.8 s, inside the 1.5 s deadline
            time.sleep(0.2)
            sock.sendall(piece)
        status, headers, payload = read_response(sock)
    assert status == 200 and headers["content-type"] == "image/png" and payload.startswith(b"\x89PNG")


def test_the_deadline_covers_the_body_only_not_the_wait_for_a_disconnect() -> None:
    """After the body, the app's receive() waits for a disconnect (the batcher withdraws jobs of clients
    that left) for as long as the response takes: that wait must not turn into a 408."""
    sent: list[MutableMapping[str, Any]] = []
    disconnect = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["more_body"] is False
        with contextlib.suppress(asyncio.TimeoutError):  # a model pass longer than the body deadline
            await asyncio.wait_for(receive(), 0.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        if not sent and not disconnect.is_set():
            disconnect.set()
            return {"type": "http.request", "body": b"x", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/reconstruct", "headers": [], "state": {}}
    asyncio.run(BodyLimitMiddleware(app, default_limit=100, timeout_s=0.1)(scope, receive, send))
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200]
