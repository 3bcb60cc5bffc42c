"""Fixtures and helpers for the service tests (loaded with `pytest_plugins = ["service_fixtures"]`).

The checkpoint is a tiny untrained model: the service tests check contracts and mechanics, not quality.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from carvae.checkpoint import save_checkpoint
from carvae.model import VAE, VAEConfig
from carvae.preprocess import PreprocessPolicy
from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
SERVICE_COMMAND = (sys.executable, "-m", "service")
TINY = VAEConfig(image_size=32, latent_dim=8, channels=(8, 16, 32))


def photo_bytes(width: int = 48, height: int = 40, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small random 'photo' in the given container format."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def block_handler(batcher: Any, name: str = "reconstruct") -> tuple[threading.Event, threading.Event]:
    """Make the batcher's `name` handler wait on a gate before it computes; returns (entered, gate)."""
    original = batcher.handlers[name]
    entered, gate = threading.Event(), threading.Event()

    def blocked(payloads: list[Any]) -> Any:
        entered.set()
        gate.wait(10)
        return original(payloads)

    batcher.handlers[name] = blocked
    return entered, gate


def asgi_post(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], chunk: bytes, more_body: bool
) -> tuple[list[MutableMapping[str, Any]], int]:
    """One POST straight into the ASGI app, with no server: every receive() returns `chunk`. Returns the
    messages the app sent and how many times it called receive()."""
    received: list[int] = []
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": chunk, "more_body": more_body}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent, len(received)


@pytest.fixture(scope="session")
def service_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = VAE(TINY)
    path = tmp_path_factory.mktemp("service-ckpt") / "model.safetensors"
    save_checkpoint(path, model, PreprocessPolicy(image_size=TINY.image_size), training={"epochs": 0})
    return path


def make_settings(checkpoint: Path, **overrides: Any) -> Settings:
    """Settings for tests, explicit so that CARVAE_* variables in the caller's environment don't leak in."""
    values: dict[str, Any] = {
        "CHECKPOINT": checkpoint,
        "DEVICE": "cpu",
        "TORCH_THREADS": 1,
        "MODEL_WORKERS": 1,  # one model thread: the queueing tests block it to fill the queue
        "WORKERS_DECODE": 2,
        "API_KEY": None,
        "CORS_ORIGINS": [],
        "LOG_LEVEL": "warning",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(service_checkpoint: Path) -> Iterator[Any]:
    """Factory: make_client(**settings) -> a started TestClient (lifespan run); all closed at teardown."""
    clients: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        client = TestClient(
            create_app(make_settings(service_checkpoint, **overrides)), raise_server_exceptions=False
        )
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Any) -> TestClient:
    client: TestClient = make_client()
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARVAE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({f"CARVAE_{k}": str(v) for k, v in settings.items()})
    return env


def run_service(timeout: float = 60, **settings: Any) -> subprocess.CompletedProcess[str]:
    """`python -m service` to completion (for start-up failures)."""
    return subprocess.run(
        list(SERVICE_COMMAND),
        cwd=ROOT,
        env=service_env(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServerProcess:
    """`python -m service` (or `command`) on a free loopback port, waited for until /readyz answers 200."""

    def __init__(
        self,
        preexec_fn: Callable[[], object] | None = None,
        command: Sequence[str] = SERVICE_COMMAND,
        **settings: Any,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=service_env(HOST="127.0.0.1", PORT=self.port, **settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready after {timeout} s")

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def serving(
    checkpoint: Path, command: Sequence[str] = SERVICE_COMMAND, **settings: Any
) -> Iterator[ServerProcess]:
    """A ready `python -m service` (or `command`) on the checkpoint, on CPU with one torch thread and warning
    logs unless `settings` say otherwise; stopped afterwards."""
    srv = ServerProcess(
        command=command,
        **{"DEVICE": "cpu", "TORCH_THREADS": 1, "LOG_LEVEL": "warning", **settings, "CHECKPOINT": checkpoint},
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
