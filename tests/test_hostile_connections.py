"""The number of open connections against a real server: CARVAE_MAX_CONNECTIONS bounds it. Each is a file
descriptor and a protocol object, and uvicorn bounds neither (its limit_concurrency is checked only once a
request's head is complete, so connections that send nothing pile up beneath it).

Before: every connection was accepted and kept, however many; past the process's open-file limit every new
one failed to be accepted at all.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_support import read_response
from service_fixtures import ServerProcess, serving

from service.metrics import SERVER_REFUSALS

pytest_plugins = ["service_fixtures"]

MAX_CONNECTIONS = 5


@pytest.fixture(scope="module")
def server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    # Keep-alive long enough that the connections held open are not closed as idle meanwhile.
    with serving(service_checkpoint, MAX_CONNECTIONS=MAX_CONNECTIONS, KEEP_ALIVE_S=60) as srv:
        yield srv


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _get(sock: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return read_response(sock)


def _refusals(sock: socket.socket) -> dict[str, float]:
    status, _, body = _get(sock, "/metrics")
    assert status == 200
    found = re.findall(r'^carvae_server_refusals_total\{reason="(\w+)"\} (\S+)$', body.decode(), re.M)
    return {reason: float(value) for reason, value in found}


def test_a_connection_over_the_limit_gets_a_json_503_and_a_freed_slot_is_served(
    server: ServerProcess,
) -> None:
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(_connect(server)) for _ in range(MAX_CONNECTIONS)]
        for sock in held:  # all accepted and served, and kept open (keep-alive)
            assert _get(sock, "/healthz")[0] == 200
        before = _refusals(held[0])
        assert set(before) == set(SERVER_REFUSALS)  # exported at 0 from start-up

        with _connect(server) as extra:  # before: served like the others
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(extra)
            assert status == 503, body
            with contextlib.suppress(ConnectionResetError):  # its request was never read
                assert extra.recv(1) == b"", "the connection over the limit was left open"
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert headers["retry-after"] == "1"
        error = json.loads(body)["error"]
        assert error["code"] == "overloaded" and str(MAX_CONNECTIONS) in error["message"]
        assert error["request_id"] == headers["x-request-id"]

        held.pop().close()
        time.sleep(0.5)  # the server sees the close and forgets the connection
        with _connect(server) as again:
            assert _get(again, "/healthz")[0] == 200
            held.append(again)
            # Again at the limit: the connections still held are served as before.
            assert all(_get(sock, "/healthz")[0] == 200 for sock in held)
            after = _refusals(held[0])
    assert {k: after[k] - before[k] for k in before} == {
        k: float(k == "too_many_connections") for k in before
    }
