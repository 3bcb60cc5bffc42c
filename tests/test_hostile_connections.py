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
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_support import read_response
from service_fixtures import ROOT, ServerProcess, service_env, serving

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


def _soft_open_files(limit: int, hard: bool = False) -> Callable[[], None]:
    def lower() -> None:
        hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit if hard else hard_limit))

    return lower


def test_a_low_soft_open_file_limit_is_raised_to_what_max_connections_needs(service_checkpoint: Path) -> None:
    """Hosts and container runtimes often start processes at a soft limit of 1024 (under a far higher hard
    one), below the default MAX_CONNECTIONS plus what the process holds anyway. Before, every connection
    past the soft limit was dropped by accept()'s EMFILE: a reset, not the JSON 503, and nothing logged."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1000:
        pytest.skip(f"needs a hard open-file limit of 1000 or more (have {hard})")
    srv = ServerProcess(
        preexec_fn=_soft_open_files(100),
        CHECKPOINT=service_checkpoint,
        DEVICE="cpu",
        TORCH_THREADS=1,
        LOG_LEVEL="warning",
        MAX_CONNECTIONS=300,
        KEEP_ALIVE_S=60,
    )
    held: list[socket.socket] = []
    try:
        srv.wait_ready()
        held = [_connect(srv) for _ in range(150)]
        with _connect(srv) as sock:
            assert _get(sock, "/healthz")[0] == 200
    finally:
        for sock in held:
            sock.close()
        srv.stop()


def test_a_hard_open_file_limit_below_max_connections_is_warned_about(
    service_checkpoint: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=service_env(CHECKPOINT=tmp_path / "missing.safetensors", MAX_CONNECTIONS=1000),
        preexec_fn=_soft_open_files(200, hard=True),
        capture_output=True,
        text=True,
        timeout=60,
    )
    warning = proc.stderr.splitlines()[0]
    assert "WARNING carvae.service: CARVAE_MAX_CONNECTIONS=1000 needs about 1064 open files" in warning
    assert "this process may have 200 (ulimit -n)" in warning and "lower CARVAE_MAX_CONNECTIONS" in warning
