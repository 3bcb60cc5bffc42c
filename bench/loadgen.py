"""A cheap closed-loop HTTP/1.1 load generator: raw asyncio protocols over keep-alive sockets.

A general-purpose client (httpx, aiohttp) spends a few milliseconds of CPU per request on this machine —
as much as the server's own work — and would cap every server at the same rate. Here each of the `c`
connections sends one pre-built request (bytes built once), waits for the whole response, checks it and
sends the next: per request that is one write, a header scan and a length check.

Only responses that complete inside the measuring window count (after a warm-up); latency is from the
write to the last byte. Any non-200 status, a body that is not what `expect_prefix` says, or a broken
connection is an error (the connection is then re-opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

CRLF = b"\r\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def multipart_request(
    host: str, path: str, field_name: str, filename: str, data: bytes, content_type: str = "image/jpeg"
) -> bytes:
    """One complete keep-alive POST with a single-file multipart body, as raw bytes."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'.encode(),
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Response(asyncio.Protocol):
    """One keep-alive connection; `send(req)` resolves to (status, body) when the response is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.head_len = -1
        self.status = 0
        self.body_len = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its interface
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        if self.closed:
            self.waiter.set_exception(ConnectionError("connection closed"))
        else:
            self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head_len < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_len = end + 4
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            start = head.find(b"\r\ncontent-length:")
            if start < 0:
                self._fail(ConnectionError("response without Content-Length"))
                return
            stop = head.find(b"\r\n", start + 2)
            self.body_len = int(head[start + 17 : stop if stop > 0 else None])
        total = self.head_len + self.body_len
        if len(self.buf) >= total:
            body = bytes(self.buf[self.head_len : total])
            del self.buf[:total]
            self.head_len = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((self.status, body))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))


@dataclass
class LoadResult:
    concurrency: int
    seconds: float  # measuring window
    ok: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # the load generator's own CPU in the window

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)

        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "requests": self.ok,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "req_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
            "client_cpu_ms_per_request": round(self.client_cpu_s / self.ok * 1000, 3) if self.ok else None,
        }


async def _connect(host: str, port: int) -> _Response:
    _, proto = await asyncio.get_running_loop().create_connection(_Response, host, port)
    return proto


async def run_closed_loop(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    expect_prefix: bytes = PNG_SIGNATURE,
    timeout_s: float = 30.0,
    on_window: tuple[Callable[[], None], Callable[[float], None]] | None = None,
) -> LoadResult:
    """`concurrency` connections, each sending `request` back to back for warmup_s + seconds.
    `on_window`: called at the start of the measuring window, and at its end with the client's CPU
    seconds in it (the benchmark reads the server's and the machine's CPU there)."""
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution
    clock = time.perf_counter
    t_start = clock() + warmup_s
    t_end = t_start + seconds
    result = LoadResult(concurrency, seconds)

    async def client() -> None:
        conn: _Response | None = None
        while clock() < t_end:
            try:
                if conn is None or conn.closed:
                    conn = await _connect(host, port)
                t0 = time.perf_counter()
                status, body = await asyncio.wait_for(conn.send(request), timeout_s)
                t1 = time.perf_counter()
            except (TimeoutError, OSError) as e:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                if t_start <= clock() <= t_end:
                    result.error(type(e).__name__)
                await asyncio.sleep(0.01)
                continue
            if not t_start <= t1 <= t_end:
                continue
            if status != 200:
                result.error(f"http_{status}")
            elif not body.startswith(expect_prefix):
                result.error("bad_body")
            else:
                result.ok += 1
                result.latencies_s.append(t1 - t0)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, t_start - clock()))
        if on_window is not None:
            on_window[0]()
        c0 = time.process_time()
        await asyncio.sleep(max(0.0, t_end - clock()))
        result.client_cpu_s = time.process_time() - c0
        if on_window is not None:
            on_window[1](result.client_cpu_s)

    await asyncio.gather(cpu_window(), *(client() for _ in range(concurrency)))
    return result


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (it comes with uvicorn[standard]): the cheapest loop for the client too."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
