"""Hostile request heads against a real server: a connection that sends nothing, a head that never ends,
a head that never stops growing. uvicorn limits none of them (service.connections does).

Before: the idle and the half-sent connections stayed open as long as the client liked (slowloris), and
one endless header line grew the process without bound (~500 MB in two minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from service_fixtures import ServerProcess, free_port, make_settings, photo_bytes, serving
from starlette.types import Receive, Scope, Send

from service.connections import protocol_for
from service.metrics import SERVER_REFUSALS

pytest_plugins = ["service_fixtures"]

HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
MAX_HEADER_BYTES = 8192
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    with serving(
        service_checkpoint,
        HEADER_TIMEOUT_S=HEADER_TIMEOUT_S,
        KEEP_ALIVE_S=KEEP_ALIVE_S,
        MAX_HEADER_BYTES=MAX_HEADER_BYTES,
        BODY_TIMEOUT_S=BODY_TIMEOUT_S,
    ) as srv:
        yield srv


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start, raw = time.monotonic(), b""
    while chunk := sock.recv(65536):
        raw += chunk
    return raw, time.monotonic() - start


def _json_error(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["request_id"] == headers["x-request-id"]
    return int(lines[0].split()[1]), headers, error


def _flood_until_answered(srv: ServerProcess, start: bytes, chunk: bytes) -> tuple[int, bytes]:
    """Send `start`, then `chunk` after `chunk` until the server answers (at most 4 MiB); how many bytes
    of chunks went out, and everything the server sent until it closed. What the kernel still buffers after
    a close would only show up as a reset, so the flood stops at the first sign of an answer."""
    sent = 0
    with _connect(srv) as sock:
        sock.sendall(start)
        while sent < 4 * 1024 * 1024 and not select.select([sock], [], [], 0.002)[0]:
            sock.sendall(chunk)
            sent += len(chunk)
        raw, _ = _read_until_closed(sock)
    return sent, raw


def test_a_connection_that_sends_nothing_is_closed_like_an_idle_keep_alive_one(server: ServerProcess) -> None:
    with _connect(server) as sock:
        raw, took = _read_until_closed(sock)
    assert raw == b""  # nothing was asked: nothing to answer
    assert KEEP_ALIVE_S - 0.2 < took < KEEP_ALIVE_S + 3


def test_a_head_that_stops_halfway_gets_408_within_the_header_timeout(server: ServerProcess) -> None:
    for partial in (b"G", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"POST /sample HTTP/1.1\r\nContent-Le"):
        with _connect(server) as sock:
            sock.sendall(partial)
            raw, took = _read_until_closed(sock)
        status, _, error = _json_error(raw)
        assert (status, error["code"]) == (408, "request_timeout"), raw
        assert f"{HEADER_TIMEOUT_S:g} s" in error["message"]
        assert HEADER_TIMEOUT_S - 0.2 < took < HEADER_TIMEOUT_S + 3


def test_a_head_sent_a_byte_at_a_time_cannot_outlast_the_timeout(server: ServerProcess) -> None:
    """Slowloris: each byte arrives well within any idle timeout, the head never ends."""
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        try:
            while time.monotonic() - start < HEADER_TIMEOUT_S + 5:
                sock.sendall(b"X-a: b\r\n")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw, _ = _read_until_closed(sock)
        took = time.monotonic() - start
    assert _json_error(raw)[0] == 408
    assert took < HEADER_TIMEOUT_S + 3


@pytest.mark.parametrize("where", ["header", "url", "many headers"])
def test_an_endless_head_gets_431_at_the_limit_not_the_memory(server: ServerProcess, where: str) -> None:
    start = {
        "header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ",
        "url": b"GET /healthz?q=",
        "many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    }[where]
    chunk = b"x-a: b\r\n" * 512 if where == "many headers" else b"a" * 4096
    sent, raw = _flood_until_answered(server, start, chunk)  # before: never answered, it kept all of it
    assert sent < 512 * 1024, "the server kept reading a head far over its limit"
    status, _, error = _json_error(raw)
    assert (status, error["code"]) == (431, "headers_too_large")
    assert str(MAX_HEADER_BYTES) in error["message"]


@pytest.mark.parametrize("how", ["in one read", "ending a later read", "behind a request in one read"])
def test_a_head_over_the_limit_that_arrives_in_one_read_gets_431(server: ServerProcess, how: str) -> None:
    """Before: only the reads after which a head was still incomplete were counted, so a head that came
    whole in one read, or whose last read was a large one, passed whatever its size (one read holds ~128 KB
    on a fresh loopback connection here, up to the 256 KB read size of asyncio and uvloop). Behind a request
    in the same read, the refusal follows that request's answer."""
    big = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
        + b"a" * (12 * MAX_HEADER_BYTES)
        + b"\r\n\r\n"
    )
    before = _refusals(server)
    with _connect(server) as sock:
        if how == "ending a later read":
            sock.sendall(big[:40])
            time.sleep(0.3)
            sock.sendall(big[40:])
        elif how == "behind a request in one read":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + big)
        else:
            sock.sendall(big)
        raw, _ = _read_until_closed(sock)
    if how == "behind a request in one read":
        assert _responses(raw) == [200, 431], raw[-300:]
        raw = raw[raw.index(b"HTTP/1.1 431 ") :]
    status, _, error = _json_error(raw)
    assert (status, error["code"]) == (431, "headers_too_large"), raw[:300]
    assert str(MAX_HEADER_BYTES) in error["message"]
    assert _refusals(server)["headers_too_large"] == before["headers_too_large"] + 1


def test_a_client_still_sending_its_oversized_head_reads_the_431(server: ServerProcess) -> None:
    """The refusal comes while most of a 400 KB head is still on its way. Before, the server closed with
    those bytes unread, the kernel answered them with a reset, and the client got ECONNRESET instead of the
    431 (40 of 40 tries); now it half-closes and drops what still comes (a lingering close)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (50 * MAX_HEADER_BYTES) + b"\r\n\r\n"
    for _ in range(3):
        with _connect(server) as sock:
            sock.sendall(head)
            raw, took = _read_until_closed(sock)
        status, _, error = _json_error(raw)
        assert (status, error["code"]) == (431, "headers_too_large")
        assert took < 5  # the client closes on EOF; the server's linger is not what it waits for


def test_ordinary_requests_are_not_affected(server: ServerProcess) -> None:
    """A head just under the limit, keep-alive requests spaced wider than the header timeout, and a body
    slower than the header timeout (the body has its own limit) are all served."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        big = {"X-Pad": "a" * (MAX_HEADER_BYTES - 1024)}
        assert client.get("/healthz", headers=big).status_code == 200
        time.sleep(min(KEEP_ALIVE_S, HEADER_TIMEOUT_S) * 0.6)
        assert client.get("/healthz").status_code == 200
        time.sleep(min(KEEP_ALIVE_S, HEADER_TIMEOUT_S) * 0.6)
        assert client.get("/healthz").status_code == 200

    body = b'{"n": 1, "seed": 3}'
    with _connect(server) as sock:
        sock.sendall(
            b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(len(body)):  # ~2 header timeouts, one byte at a time
            sock.sendall(body[i : i + 1])
            time.sleep(2 * HEADER_TIMEOUT_S / len(body))
        raw, _ = _read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]

    files = {"file": ("c.png", photo_bytes(), "image/png")}
    assert httpx.post(server.url + "/encode", files=files, timeout=10).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"POST /sample HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 spoken to an HTTP/1.1 port
        bytes.fromhex("16030100a5010000a10303") + bytes(64),  # a TLS ClientHello
    ],
    ids=[
        "garbage",
        "no-slash",
        "two-lengths",
        "negative-length",
        "length-and-chunked",
        "bad-chunk",
        "non-utf8-path",
        "http2",
        "tls",
    ],
)
def test_requests_the_parser_refuses_get_a_json_400(server: ServerProcess, raw: bytes) -> None:
    """Before: uvicorn's text/plain 'Invalid HTTP request received.' with no request id."""
    with _connect(server) as sock:
        sock.sendall(raw)
        answer, _ = _read_until_closed(sock)
    status, _, error = _json_error(answer)
    assert (status, error["code"]) == (400, "bad_request")
    assert "HTTP/1.1" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",  # 400
        b"GET /healthz HTTP/1.1\r\n",  # 408
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\n",  # 431
    ],
    ids=["400", "408", "431"],
)
def test_the_servers_own_answers_carry_the_headers_every_api_answer_gets(
    server: ServerProcess, raw: bytes
) -> None:
    """The refusals written by the server (service.connections), not the app, go around the middleware
    that adds Cache-Control and the browser security headers. Before: none of the four."""
    with _connect(server) as sock:
        sock.sendall(raw)
        answer, _ = _read_until_closed(sock)
    _, headers, _ = _json_error(answer)
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


@pytest.mark.parametrize(("path", "status"), [("/healthz", 200), ("/reconstruct", 405), ("/nowhere", 404)])
def test_a_websocket_upgrade_is_served_as_plain_http(server: ServerProcess, path: str, status: int) -> None:
    """No route is a WebSocket. Before: the websockets library answered a text/plain 403 (or 400 without
    Sec-WebSocket-Key) itself, with no request id, unlogged and uncounted."""
    for key in ("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""):
        with _connect(server) as sock:
            upgrade = "Connection: Upgrade, close\r\nUpgrade: websocket\r\n"
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}{key}\r\n".encode())
            raw, _ = _read_until_closed(sock)
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw[:300]
        assert b"content-type: application/json" in head.lower() and b"x-request-id: " in head.lower()
        assert json.loads(body)


@pytest.mark.parametrize("where", ["many trailers", "endless trailer", "chunk extension"])
def test_endless_chunk_framing_gets_431_at_the_limit_not_the_memory(
    server: ServerProcess, where: str
) -> None:
    """Before: trailers went into the request's headers without limit (2 GB in 15 s grew the process to
    5.5 GB), and neither the head's limits nor the body's saw them."""
    head = (
        b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    start, chunk = {
        "many trailers": (b"2\r\n{}\r\n0\r\n", b"X-Trailer: " + b"a" * 100 + b"\r\n"),
        "endless trailer": (b"2\r\n{}\r\n0\r\nX-Trailer: ", b"a" * 4096),
        "chunk extension": (b"2;ext=", b"a" * 4096),
    }[where]
    sent, raw = _flood_until_answered(server, head + start, chunk)
    assert sent < 512 * 1024, "the server kept reading framing far over its limit"
    status, _, error = _json_error(raw)
    assert (status, error["code"]) == (431, "headers_too_large")
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_chunked_upload_in_small_chunks_with_a_trailer_is_served(server: ServerProcess) -> None:
    boundary = "smallchunks"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + photo_bytes(width=256, height=256)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 16]), body[i : i + 16]) for i in range(0, len(body), 16)
    )
    assert len(chunks) - len(body) > 4 * MAX_HEADER_BYTES  # framing far over the head's limit, all of it
    with _connect(server) as sock:
        sock.sendall(
            b"POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary.encode() + b"\r\n\r\n"
        )
        sock.sendall(chunks + b"0\r\nX-Checksum: none\r\n\r\n")
        raw, _ = _read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]


@pytest.mark.parametrize("path", ["/healthz", "/nowhere"])
def test_a_body_trickled_after_its_answer_cannot_hold_the_connection(
    server: ServerProcess, path: str
) -> None:
    """A 405 or 404 is sent without reading the body; uvicorn then dropped the rest as long as it came, and
    each byte restarted its keep-alive timer: a byte every few seconds held the connection for good."""
    with _connect(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        start, raw = time.monotonic(), b""
        sock.settimeout(0.3)
        while time.monotonic() - start < BODY_TIMEOUT_S + 10:
            try:
                sock.sendall(b"1\r\na\r\n")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            raw += chunk
        took = time.monotonic() - start
    assert raw.startswith((b"HTTP/1.1 405 ", b"HTTP/1.1 404 ")), raw[:200]
    assert took < BODY_TIMEOUT_S + 3, "the connection was still open"


def _responses(raw: bytes) -> list[int]:
    """The statuses of the responses in `raw` (bodies here are JSON, never a status line)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


@pytest.mark.parametrize("head", ["half of it", "all of it, near the limit"])
def test_a_pipelined_head_is_not_charged_with_the_body_before_it(server: ServerProcess, head: str) -> None:
    """Before: the read that held the end of a body and the start of the next (pipelined) head counted whole
    against the head: a 30 KB body then half a GET's head got a 431 (and the POST's own answer was lost).
    A whole head in that read is measured by itself too: one just under the limit is served."""
    body = b'{"n": 1, "seed": 3}' + b" " * (4 * MAX_HEADER_BYTES)
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    get += b"a" * (MAX_HEADER_BYTES - 64 - len(get)) + b"\r\n\r\n"
    first, rest = (get[:20], get[20:]) if head == "half of it" else (get, b"")
    with _connect(server) as sock:
        sock.sendall(
            b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Accept: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) + first
        )
        if rest:
            time.sleep(0.3)
            sock.sendall(rest)
        raw, _ = _read_until_closed(sock)
    assert _responses(raw) == [200, 200], raw[-300:]


def test_a_chunked_body_is_not_charged_with_its_head(server: ServerProcess) -> None:
    """Before: the read that ended a head counted whole against the chunked framing after it: a head near
    the limit, then an empty body whose trailer came in reads of its own, got a 431 though neither was
    over."""
    head = (
        b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\nX-Pad: "
    )
    head += b"a" * (MAX_HEADER_BYTES - 512 - len(head)) + b"\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(head)
        time.sleep(0.3)
        sock.sendall(b"0\r\nX-Checksum: " + b"b" * 1024 + b"\r\n")
        time.sleep(0.3)
        sock.sendall(b"\r\n")
        raw, _ = _read_until_closed(sock)
    assert _responses(raw) == [200], raw[-300:]  # no body: /sample with its defaults


@pytest.mark.parametrize("after", ["blank line", "rest of an answered body"])
def test_bytes_that_begin_no_request_do_not_keep_an_idle_connection_open(
    server: ServerProcess, after: str
) -> None:
    """uvicorn cancels its keep-alive timer on any bytes and re-arms it only when a response completes.
    Before: a blank line after a response, or the end of a body sent after its 404, left the connection
    open with no timer at all (seen: still open after 14 s with a 5 s keep-alive, until the client left)."""
    with _connect(server) as sock:
        if after == "blank line":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            rest = b"\r\n"
        else:
            sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\na")
            rest = b"b" * 9
        first = sock.recv(65536)
        time.sleep(0.2)  # the answer has gone out whole
        sock.sendall(rest)
        start, raw = time.monotonic(), first
        sock.settimeout(KEEP_ALIVE_S + 5)
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except TimeoutError:
            pass
        took = time.monotonic() - start
    assert _responses(raw) == [200 if after == "blank line" else 404], raw[:200]
    assert took < KEEP_ALIVE_S + 3, "the idle connection was still open"


def test_a_pipelined_body_is_timed_by_its_own_request(server: ServerProcess) -> None:
    """The wait for the rest of an answered body is for that request's body only. Before: a pipelined POST
    started when the GET before it was answered had that timer set on its own body, which its app was
    reading: a stalled body closed the connection silently instead of getting the app's 408."""
    with _connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        raw, took = _read_until_closed(sock)
    assert _responses(raw) == [200, 408], raw[-300:]
    assert b'"request_timeout"' in raw and b"request body" in raw
    assert BODY_TIMEOUT_S - 0.2 < took < BODY_TIMEOUT_S + 3


async def _slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A toy app for an in-process uvicorn: /slow answers after 2 header timeouts, /stream sends half its
    answer at once and the rest after 1.5, anything else answers at once."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * HEADER_TIMEOUT_S)
    if scope["path"] == "/stream":
        # Half its body, then a wait that watches for a disconnect (as the service's routes do while the
        # model works: uvicorn reads on meanwhile), then the rest.
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receive(), 1.5 * HEADER_TIMEOUT_S)
        await send({"type": "http.response.body", "body": b"cd"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def slow_app_server(service_checkpoint: Path) -> Iterator[int]:
    """uvicorn with service.connections' protocol (same limits as `server`) in a thread, serving `_slow_app`:
    the model answers too fast to hold a request back for a header timeout."""
    settings = make_settings(
        service_checkpoint,
        HEADER_TIMEOUT_S=HEADER_TIMEOUT_S,
        KEEP_ALIVE_S=KEEP_ALIVE_S,
        MAX_HEADER_BYTES=MAX_HEADER_BYTES,
        BODY_TIMEOUT_S=BODY_TIMEOUT_S,
    )
    port = free_port()
    config = uvicorn.Config(
        _slow_app, host="127.0.0.1", port=port, http=protocol_for(settings), ws="none", log_level="warning"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    uv.should_exit = True
    thread.join(10)


def test_a_pipelined_head_is_not_timed_while_the_server_is_not_reading(slow_app_server: int) -> None:
    """uvicorn stops reading while a pipelined request waits for the one before it. Before: the head behind
    that one, all sent at once, timed out unread while the first took longer than the header timeout: the
    client got a 408 (or a reset) instead of its three answers."""
    with socket.create_connection(("127.0.0.1", slow_app_server), timeout=10) as sock:
        sock.sendall(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo"
        )
        time.sleep(0.05)  # the rest of the third head arrives while the server is not reading
        sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        raw, _ = _read_until_closed(sock)
    assert _responses(raw) == [200, 200, 200], raw[-300:]


def _whole_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `raw`, one after another, each whole: a status line, headers, and exactly its
    content-length of body. A response written inside another, or one cut off, fails."""
    found = []
    while raw:
        head, end, raw = raw.partition(b"\r\n\r\n")
        assert end, f"a response cut off in its head: {head[:300]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert re.fullmatch(r"HTTP/1\.1 \d{3} [\w ]+", status_line), f"not a status line: {head[:300]!r}"
        assert all(":" in line for line in lines), f"not a header: {head[:300]!r}"
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        assert len(raw) >= length, f"a response cut off in its body: {raw[:300]!r}"
        found.append((int(status_line.split()[1]), headers, raw[:length]))
        raw = raw[length:]
    return found


_STREAM_THEN_A = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"
_STREAM_THEN_CHUNKED = (
    b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    ("sent", "then", "statuses"),
    [
        (_STREAM_THEN_A + b"GARBAGE\r\n\r\n", b"", [200, 200, 400]),
        (
            _STREAM_THEN_A + b"GET /b HTTP/1.1\r\nX-Big: " + b"a" * 12 * MAX_HEADER_BYTES + b"\r\n\r\n",
            b"",
            [200, 200, 431],
        ),
        (_STREAM_THEN_A + b"GET /b HTTP/1.1\r\nX-Big: ", b"a" * 4 * MAX_HEADER_BYTES, [200, 200, 431]),
        (_STREAM_THEN_A + b"GET /b HTTP/1.1\r\nHo", b"", [200, 200, 408]),
        (_STREAM_THEN_CHUNKED + b"ZZ\r\n", b"", [200, 400]),
        (_STREAM_THEN_CHUNKED + b"2\r\n{}\r\n0\r\n", b"X-T: " + b"a" * 4 * MAX_HEADER_BYTES, [200, 431]),
    ],
    ids=[
        "400 head",
        "431 head in one read",
        "431 head in many reads",
        "408 head",
        "400 chunk",
        "431 trailer",
    ],
)
def test_a_refused_pipelined_request_is_answered_after_the_responses_before_it(
    slow_app_server: int, sent: bytes, then: bytes, statuses: list[int]
) -> None:
    """The refusal of a pipelined head (or of a queued request's chunked framing) waits for the responses
    before it, then closes. Before: it was written at once, inside /stream's answer (after "ab"), or in
    place of the answers still to come."""
    with socket.create_connection(("127.0.0.1", slow_app_server), timeout=10) as sock:
        sock.sendall(sent)
        if then:
            time.sleep(0.2)
            sock.sendall(then)
        raw = b""
        with contextlib.suppress(ConnectionResetError):  # a close with the client's bytes unread (before)
            while chunk := sock.recv(65536):
                raw += chunk
    responses = _whole_responses(raw)
    assert [status for status, _, _ in responses] == statuses, raw[-300:]
    assert [body for _, _, body in responses[:-1]] == [b"abcd", b"ok"][: len(statuses) - 1]
    _, headers, body = responses[-1]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body)["error"]["request_id"] == headers["x-request-id"]


def _refusals(srv: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    found = re.findall(r'^carvae_server_refusals_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def test_the_servers_refusals_are_counted_in_metrics(server: ServerProcess) -> None:
    """They never reach the app, so carvae_requests_total cannot show them: a slowloris or a scanner
    speaking TLS to the port was visible only in the log."""
    before = _refusals(server)
    assert set(before) == set(SERVER_REFUSALS)  # exported at 0 from start-up
    with _connect(server) as sock:  # 400
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert _json_error(_read_until_closed(sock)[0])[0] == 400
    with _connect(server) as sock:  # 408
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _json_error(_read_until_closed(sock)[0])[0] == 408
    assert (
        _json_error(_flood_until_answered(server, b"GET /healthz HTTP/1.1\r\nX-Big: ", b"a" * 4096)[1])[0]
        == 431
    )
    with _connect(server) as sock:  # idle: closed quietly
        assert _read_until_closed(sock)[0] == b""
    with _connect(server) as sock:  # the rest of an answered body, trickled: closed quietly
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.settimeout(0.3)
        raw = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while True:
                sock.sendall(b"1\r\na\r\n")
                try:
                    if not (chunk := sock.recv(65536)):
                        break
                    raw += chunk
                except TimeoutError:
                    continue
        assert b" 405 " in raw
    after = _refusals(server)
    assert {k: after[k] - before[k] for k in before} == {
        "bad_request": 1,
        "request_timeout": 1,
        "headers_too_large": 1,
        "idle": 1,
        "unread_body_timeout": 1,
        "unread_response_timeout": 0,
        "too_many_connections": 0,
    }


_SAMPLE = (
    b'POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"n": 1}'
)
_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("sent", "statuses"),
    [
        (_SAMPLE, [200]),
        (_HEALTHZ + _HEALTHZ, [200, 200]),
        (_HEALTHZ + _SAMPLE, [200, 200]),
        (_SAMPLE + b"GET /healthz HTTP/1.1\r\nHo", [200]),
        (_SAMPLE + b"GARBAGE\r\n\r\n", [200, 400]),
        (b"GET /healthz HTTP/1.1\r\nHo", []),
    ],
    ids=[
        "model request",
        "two pipelined",
        "model request pipelined",
        "then half a head",
        "then garbage",
        "half a head",
    ],
)
def test_requests_sent_whole_before_a_half_close_are_answered(
    server: ServerProcess, sent: bytes, statuses: list[int]
) -> None:
    """A client may send its requests and then half-close (`printf ... | nc -N`): it still reads. Before,
    uvicorn closed the connection on that EOF, so a request whose answer was not written at once (a model
    request, one pipelined behind another) got nothing. Closed once they are answered, not after a timeout;
    a head left unfinished is not answered."""
    with _connect(server) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        raw, took = _read_until_closed(sock)
    assert _responses(raw) == statuses, raw[-300:]
    assert took < KEEP_ALIVE_S, "closed by a timer, not after the last answer"


def test_a_client_that_reads_none_of_its_answers_is_cut_off(server: ServerProcess) -> None:
    """Pipelined requests whose answers the client never reads: once the server's buffers are full, uvicorn
    waits for them to drain with no time limit. Before: the connection and a request's task were held for
    good (and a graceful stop waited its whole timeout for them); every answer arrived as soon as the
    client read. Now the connection is cut off when nothing has drained for the body timeout."""
    before = _refusals(server)["unread_response_timeout"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
        time.sleep(BODY_TIMEOUT_S + 2)
        assert _refusals(server)["unread_response_timeout"] == before + 1
        sock.settimeout(10)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
    assert len(_responses(raw)) < 400
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
