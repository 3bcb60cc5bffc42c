"""Overload refusals are immediate: while the model queue is full, a new model request is answered 503
before its body is read (found by bench/overload.py: requests admitted into a full queue were read and
decoded only to be refused a second later). The in-process companion of test_faults_overload.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from hostile_support import assert_error
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import asgi_post, block_handler, make_settings, photo_bytes

from service.main import create_app

pytest_plugins = ["service_fixtures"]


def _call_without_body(app: Any, path: str) -> tuple[int, dict[bytes, bytes], int]:
    """One POST straight into the ASGI app; returns (status, headers, receive() calls)."""
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"7")]
    sent, reads = asgi_post(app, path, headers, b"--x--\r\n", more_body=False)
    return sent[0]["status"], dict(sent[0]["headers"]), reads


def test_a_full_model_queue_refuses_before_the_body_is_read(service_checkpoint: Path) -> None:
    app = create_app(make_settings(service_checkpoint, QUEUE_SIZE=1, MAX_BATCH_SIZE=1, MAX_IN_FLIGHT=100))
    with TestClient(app) as client:
        batcher = app.state.pipeline.batcher
        entered, gate = block_handler(batcher)
        files = {"file": ("c.png", photo_bytes(), "image/png")}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/reconstruct", files=files)
            assert entered.wait(5)
            queued = pool.submit(client.post, "/reconstruct", files=files)
            end = time.monotonic() + 5
            while batcher.depth() < 1:  # the queue (of 1) is full
                assert time.monotonic() < end
                time.sleep(0.01)
            try:
                status, headers, reads = _call_without_body(app, "/encode")
                assert status == 503 and headers[b"retry-after"] == b"1"
                assert reads == 0, "the body was read although the request could only be refused"
                err = assert_error(client.post("/encode", files=files), 503, "overloaded")
                assert "queue is full" in err["message"]
                assert client.get("/healthz").status_code == 200  # only model routes are refused
            finally:
                gate.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert client.post("/encode", files=files).status_code == 200  # the queue drained: admitted again
        text = client.get("/metrics").text
    refused = {
        s.labels["reason"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "carvae_rejected_total"
    }
    assert refused.get("queue_full", 0) >= 2, refused
