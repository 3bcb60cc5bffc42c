"""Start, probe and stop the servers under test, each in its own process group (LitServe forks workers).

Every server is started fresh for each round and stopped after it, so exactly one server is alive while
it is measured and idle peers cost nothing. Start-up time is from spawn to the first 200 on its readiness
path (our /readyz: model loaded and warmed up), with the CPU the server spent on it and the other load
on the machine meanwhile, so that a start slowed by something else can be told from a slow server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import machine
from bench.assets import ROOT

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple[str, ...]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    has_metrics: bool = False  # our service: average batch size from /metrics


def carvae(name: str, checkpoint: Path, **settings: object) -> ServerSpec:
    env = {"CARVAE_CHECKPOINT": str(checkpoint), "CARVAE_DEVICE": "cpu", "CARVAE_LOG_LEVEL": "warning"}
    env.update({f"CARVAE_{k}": str(v) for k, v in settings.items()})
    return ServerSpec(name, (sys.executable, "-m", "service"), "/readyz", env, has_metrics=True)


def plain_fastapi(checkpoint: Path, threads: int | None = None) -> ServerSpec:
    argv = [sys.executable, "-m", "bench.peers.plain_fastapi", "--checkpoint", str(checkpoint)]
    if threads:
        argv += ["--threads", str(threads)]
    return ServerSpec("fastapi-plain", tuple(argv), "/healthz")


def litserve(checkpoint: Path, max_batch_size: int = 32, batch_timeout_ms: float = 5.0) -> ServerSpec:
    argv = (
        sys.executable,
        "-m",
        "bench.peers.litserve_server",
        "--checkpoint",
        str(checkpoint),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout-ms",
        str(batch_timeout_ms),
    )
    return ServerSpec("litserve", argv, "/health")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Running:
    """A started server: `pid`, `port`, `startup_s`, `startup_cpu_s` (the server's own CPU seconds until
    ready), `startup_other_cores` (the machine's other load meanwhile, in cores: everything but the server
    and this process's polling); `stop()` ends its whole process group."""

    def __init__(self, spec: ServerSpec, log: Path, timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.port = free_port()
        # The caller's CARVAE_* variables must not change what is measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARVAE_") and k != "PYTHONPATH"}
        env.update(spec.env)
        env.update(PYTHONPATH=str(ROOT), CARVAE_HOST=HOST, CARVAE_PORT=str(self.port))
        argv = list(spec.argv)
        if "--checkpoint" in argv:  # the peers take their port on the command line
            argv += ["--port", str(self.port)]
        self._log = log.open("ab")
        busy0, own0 = machine.machine_busy_s(), time.process_time()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.proc.pid
        self.startup_s = self._wait_ready(t0, timeout_s)
        self.startup_cpu_s = machine.tree_cpu_s(self.pid)
        other_s = machine.machine_busy_s() - busy0 - self.startup_cpu_s - (time.process_time() - own0)
        self.startup_other_cores = max(0.0, other_s) / self.startup_s

    def _wait_ready(self, t0: float, timeout_s: float) -> float:
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} (see its log)")
            with contextlib.suppress(OSError):
                if http_get(self.port, self.spec.ready_path, timeout=1.0)[0] == 200:
                    return time.perf_counter() - t0
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.spec.name} not ready within {timeout_s:g} s")

    def batch_counters(self) -> tuple[float, float] | None:
        """(sum, count) of carvae_batch_size for /reconstruct's op, from our /metrics."""
        if not self.spec.has_metrics:
            return None
        status, body = http_get(self.port, "/metrics")
        if status != 200:
            return None
        total = count = 0.0
        for family in text_string_to_metric_families(body.decode()):
            if family.name != "carvae_batch_size":
                continue
            for sample in family.samples:
                if sample.labels.get("op") != "reconstruct":
                    continue
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
        return total, count

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        # LitServe's worker processes may outlive their parent; the group is ours alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
