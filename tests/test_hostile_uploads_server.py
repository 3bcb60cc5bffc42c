"""Oversized bodies against a real `python -m service`, on raw sockets: the 413 arrives while the client is
still sending, without the server reading (or holding) the body, and the service keeps serving."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_fixtures import ServerProcess, photo_bytes, serving

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.slow

LIMIT = 64 * 1024
JSON_LIMIT = 4096
BOUNDARY = "carvaeboundary"


@pytest.fixture(scope="module")
def server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    with serving(service_checkpoint, MAX_UPLOAD_BYTES=LIMIT, MAX_JSON_BYTES=JSON_LIMIT) as srv:
        yield srv


def _head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{extra}\r\n"
    ).encode()


def _part_head() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def _response_if_any(sock: socket.socket) -> bytes:
    """Whatever the server has answered so far (non-blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return b""
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        sock.setblocking(True)


def _send_slowly_until_answered(
    sock: socket.socket, chunks: Iterator[bytes], pause_s: float = 0.005, give_up_s: float = 30
) -> tuple[bytes, int]:
    """Send chunk after chunk, checking for an answer between them. Returns (answer, bytes sent)."""
    sent = 0
    end = time.monotonic() + give_up_s
    for chunk in chunks:
        if answer := _response_if_any(sock):
            return answer + _read_rest(sock), sent
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break  # the server answered and closed; read what it said
        sent += len(chunk)
        assert time.monotonic() < end, "no answer while sending"
        time.sleep(pause_s)
    sock.settimeout(10)
    return _read_rest(sock), sent


def _read_rest(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and _complete(data):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, json.loads(body)


def _assert_413(raw: bytes, limit: int) -> None:
    status, headers, body = _parse(raw)
    assert status == 413, raw[:300]
    assert body["error"]["code"] == "payload_too_large"
    assert f"limit of {limit} bytes" in body["error"]["message"]
    assert body["error"]["request_id"] == headers["x-request-id"]
    assert headers.get("connection") == "close"  # the rest of the body is never read


def _assert_serving(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/reconstruct", files={"file": ("c.png", photo_bytes(), "image/png")})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_declared_length_over_the_limit_is_refused_before_the_body(server: ServerProcess) -> None:
    total = 1 << 30  # announces 1 GiB, then starts sending it slowly
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head("/reconstruct", f"Content-Length: {total}\r\n"))
        chunks = (_part_head() if i == 0 else b"\0" * 16384 for i in range(total // 16384))
        answer, sent = _send_slowly_until_answered(sock, chunks)
    _assert_413(answer, LIMIT)
    assert sent < LIMIT, f"the server let the client send {sent} bytes first"
    _assert_serving(server)


def _chunked(payload: Iterator[bytes]) -> Iterator[bytes]:
    for data in payload:
        yield f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_chunked_body_is_refused_as_it_crosses_the_limit(server: ServerProcess) -> None:
    """No Content-Length: the body is counted while it streams in, and refused at the limit, long before
    the (10 MiB) upload would have ended."""
    total_chunks = 10 * 1024 * 1024 // 8192
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head("/reconstruct", "Transfer-Encoding: chunked\r\n"))
        payload = (_part_head() if i == 0 else b"\x89" * 8192 for i in range(total_chunks))
        answer, sent = _send_slowly_until_answered(sock, _chunked(payload))
    _assert_413(answer, LIMIT)
    assert LIMIT < sent < 4 * LIMIT, f"refused after {sent} bytes"
    _assert_serving(server)


def test_json_body_over_its_own_limit(server: ServerProcess) -> None:
    body = b'{"z": [[' + b"0.5, " * 2000 + b"0]]}"
    assert len(body) > JSON_LIMIT
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        answer, _ = _send_slowly_until_answered(
            sock, iter([body[i : i + 1024] for i in range(0, len(body), 1024)])
        )
    _assert_413(answer, JSON_LIMIT)
    _assert_serving(server)


def test_many_oversized_uploads_in_a_row_leave_the_server_healthy(server: ServerProcess) -> None:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(_head("/encode", f"Content-Length: {LIMIT + 1}\r\n") + _part_head())
            _assert_413(_read_rest(sock), LIMIT)
    assert httpx.get(server.url + "/healthz").status_code == 200
    _assert_serving(server)


def _requests_total(server: ServerProcess, route: str) -> dict[str, float]:
    """carvae_requests_total{route=...} by status."""
    counts: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("carvae_requests_total{") and f'route="{route}"' in line:
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.parametrize(
    ("path", "ctype", "body", "framing"),
    [
        ("/encode", f"multipart/form-data; boundary={BOUNDARY}", b"", "Content-Length: 5000"),
        ("/encode", f"multipart/form-data; boundary={BOUNDARY}", b"", "Transfer-Encoding: chunked"),
        ("/sample", "application/json", b'{"n": ', "Content-Length: 100"),
    ],
)
def test_a_client_that_hangs_up_mid_body_is_counted_as_gone_not_as_a_bad_request(
    server: ServerProcess, path: str, ctype: str, body: bytes, framing: str
) -> None:
    """Before: FastAPI's 400 'error parsing the body' went to nobody and counted as a 400 in the metrics
    and the log (an alert on the 4xx rate fired on mobile clients aborting uploads). The project's code for
    a client that went away is 499, as for a disconnect while queued."""
    before = _requests_total(server, path)
    data = body or _part_head() + photo_bytes()[:100]
    if framing.startswith("Transfer-Encoding"):
        data = b"%x\r\n%s\r\n" % (len(data), data)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + data)
        time.sleep(0.3)  # the app is reading the body when the client goes
    deadline = time.monotonic() + 10
    while (after := _requests_total(server, path)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    added = {status: n - before.get(status, 0) for status, n in after.items() if n != before.get(status, 0)}
    assert added == {"499": 1}
