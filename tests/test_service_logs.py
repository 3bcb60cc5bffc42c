"""Log output of the service (service.logs): what a log collector reads on stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_fixtures import serving

from service.logs import JsonFormatter
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["service_fixtures"]

# A library warning after start-up (torch, Pillow, our own warnings.warn), in a fresh interpreter: the
# test runner's own warning capture would otherwise swallow it.
_WARN_AFTER_CONFIG = """
import sys, warnings
from service.logs import configure_logging
configure_logging("info", sys.argv[1])
warnings.warn("careful: something is deprecated", UserWarning)
"""


def _stderr_of_a_warning(fmt: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _WARN_AFTER_CONFIG, fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stderr


def test_a_python_warning_is_one_json_record_under_json_logs() -> None:
    lines = _stderr_of_a_warning("json").strip().splitlines()
    (record,) = [json.loads(line) for line in lines]  # raw warning text would not parse
    assert record["level"] == "WARNING" and record["logger"] == "py.warnings"
    assert "UserWarning: careful: something is deprecated" in record["message"]
    assert record["time"].endswith("Z")


def test_a_python_warning_has_the_text_format_too() -> None:
    first = _stderr_of_a_warning("text").splitlines()[0]
    # "<date> <time> WARNING py.warnings: <file>:<line>: UserWarning: …", like every other record
    assert " WARNING py.warnings: " in first and "UserWarning: careful" in first


# -- a request's failure, found by the request id the client was given ------------------------------
def _json_records_with(records: list[logging.LogRecord], rid: str) -> list[dict[str, object]]:
    """The records about `rid` as the JSON format writes them, found by the field a log query uses."""
    formatted = [json.loads(JsonFormatter().format(r)) for r in records]
    return [entry for entry in formatted if entry.get("request_id") == rid]


def _asgi_get(app: Any, request_id: str) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/boom",
        "headers": [(b"x-request-id", request_id.encode())],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize(
    ("raised", "status", "level"),
    [(RuntimeError("bug"), 500, "ERROR"), (asyncio.CancelledError(), 503, "WARNING")],
)
def test_a_requests_failure_is_logged_with_its_request_id_as_a_field(
    caplog: pytest.LogCaptureFixture, raised: BaseException, status: int, level: str
) -> None:
    """The request line had `request_id` as a JSON key, the traceback of its 500 only inside the message:
    a query on the field found the request and not why it failed."""

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise raised

    app = RequestContextMiddleware(failing, Metrics())
    with caplog.at_level(logging.INFO, logger="carvae.service"):
        sent = _asgi_get(app, "client-id-1")
    assert sent[0]["status"] == status
    levels = [entry["level"] for entry in _json_records_with(caplog.records, "client-id-1")]
    assert level in levels and "INFO" in levels  # the failure and the request line


def test_a_model_fault_is_logged_with_the_request_id_the_client_got(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(payloads: list[Any]) -> list[Any]:
        raise RuntimeError("the model broke")

    client.app.state.pipeline.batcher.handlers["decode"] = broken  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="carvae.service"):
        r = client.post("/sample", json={"n": 1})
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json()["error"]["request_id"] == rid
    (fault,) = [e for e in _json_records_with(caplog.records, rid) if e["level"] == "ERROR"]
    assert "failed in the model" in str(fault["message"])


def test_a_server_refusal_is_logged_as_json_with_its_request_id_and_status(
    service_checkpoint: Path,
) -> None:
    """Refused before the app sees it, such a request has no request line: its warning is all there is."""
    with serving(service_checkpoint, LOG_FORMAT="json") as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            head = sock.recv(65536).decode("latin-1")
        srv.stop()
        output = srv.output()
    assert head.startswith("HTTP/1.1 400")
    (rid,) = re.findall(r"(?im)^x-request-id: (\S+)\r$", head)
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (refusal,) = [e for e in entries if e.get("request_id") == rid]
    assert refusal["status"] == 400 and refusal["level"] == "WARNING"
