"""`python -m bench.overload`: our service at several times its capacity, on loopback.

What it shows (issue: hostile input, overload and faults): past capacity the service answers the excess at
once with 503 + Retry-After instead of queueing it, the requests it accepts keep a bounded latency, its
memory stays flat, and it is back to normal as soon as the load drops.

Phases, against one fresh `python -m service` (defaults, or the --short settings):
1. capacity — closed loop (bench.loadgen) with 2 × MAX_BATCH_SIZE connections: accepted req/s;
2. baseline — open loop at 25 % of capacity: normal latency;
3. overload — open loop at FACTOR × capacity (default 4);
4. recovery — open loop at 25 % again: how soon latency is back to the baseline's;
5. check — a few sequential requests, all of which must be 200.

Open loop: request i is due at start + i / rate whatever happened to the earlier ones, and its latency is
counted from when it was due (so a slow server cannot slow the clock down); for 503s the time on the wire
(write to answer) is reported too, since on a small machine the load generator itself may fall behind.
Each request goes out on an idle keep-alive connection, or a new one. The server's resident memory (VmRSS
in /proc) is sampled every 50 ms throughout. Results: OUT/overload.json and OUT/overload.md.

`--short` (used by tests/test_faults_overload.py): a tiny model, a queue of 32 and a few seconds per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import assets, machine, servers
from bench.loadgen import multipart_request, new_event_loop, run_closed_loop

RESULTS = assets.ROOT / "bench" / "results"
LIGHT = 0.25  # baseline and recovery rate, as a share of capacity
WINDOW_S = 0.5  # recovery is judged on windows this long
REQUEST_TIMEOUT_S = 60.0  # client side: far past the server's deadline, so the server's answer is seen


@dataclass(frozen=True)
class Plan:
    factor: float
    capacity_s: float
    baseline_s: float
    overload_s: float
    recovery_s: float
    max_connections: int
    settings: dict[str, object]

    @property
    def timeout_s(self) -> float:
        return float(self.settings.get("REQUEST_TIMEOUT_S", 10.0))  # type: ignore[arg-type]

    @property
    def batch(self) -> int:
        return int(self.settings.get("MAX_BATCH_SIZE", 32))  # type: ignore[call-overload]


def make_plan(short: bool, factor: float) -> Plan:
    if short:
        settings: dict[str, object] = {
            "MAX_BATCH_SIZE": 8,
            "QUEUE_SIZE": 32,
            "REQUEST_TIMEOUT_S": 5,
            "TORCH_THREADS": 1,
            "LOG_LEVEL": "warning",
        }
        return Plan(factor, 1.5, 1.5, 3.0, 3.0, 512, settings)
    return Plan(factor, 5.0, 5.0, 20.0, 10.0, 2048, {"LOG_LEVEL": "warning"})


# -- the client -----------------------------------------------------------------------------------------
class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request()` resolves to (status, retry_after, body_len)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, str | None, int]] | None = None
        self.closed = False
        self.received_any = False  # any byte of the current response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports quack the same

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, str | None, int]]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.received_any = False
        if self.closed or self.transport is None:
            self.waiter.set_exception(ConnectionError("connection closed"))
        else:
            self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").lower().split("\r\n")
        fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
        length = int(fields.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        retry = fields.get("retry-after")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((int(head[0][9:12]), retry.strip() if retry else None, length))
        if fields.get("connection", "").strip() == "close":
            self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        if self.transport is not None:
            self.transport.close()


@dataclass
class Outcome:
    due: float  # when it should have been sent (perf_counter)
    sent: float  # when it was written: later than `due` when the load generator falls behind
    done: float
    status: int  # 0: a client-side failure (timeout, refused, reset)
    retry_after: str | None = None
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1000

    @property
    def wire_ms(self) -> float:
        """From the write to the answer: the server's part, without the load generator's lag."""
        return (self.done - self.sent) * 1000


@dataclass
class OpenLoop:
    host: str
    port: int
    request: bytes
    max_connections: int
    idle: list[Connection] = field(default_factory=list)
    opened: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    client_dropped: int = 0  # arrivals with no connection to send them on (the client's own limit)

    def _idle_connection(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.opened -= 1  # the server closed it while it was idle (keep-alive timeout)
        return None

    async def _new_connection(self) -> Connection | None:
        if self.opened >= self.max_connections:
            return None
        self.opened += 1
        try:
            _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        except OSError:
            self.opened -= 1
            raise
        return conn

    async def _one(self, due: float) -> None:
        conn, reused = self._idle_connection(), True
        sent = time.perf_counter()
        try:
            for attempt in range(2):
                if conn is None:
                    conn, reused = await self._new_connection(), False
                    if conn is None:
                        self.client_dropped += 1
                        return
                sent = time.perf_counter()
                try:
                    status, retry, _ = await asyncio.wait_for(conn.request(self.request), REQUEST_TIMEOUT_S)
                    break
                except ConnectionError:
                    # A reused connection the server closed (idle timeout) just as we wrote: nothing
                    # reached the app, so send it again on a fresh one, as any HTTP client does.
                    self.opened -= 1
                    if not reused or conn.received_any or attempt:
                        conn = None
                        raise
                    conn = None
            self.outcomes.append(Outcome(due, sent, time.perf_counter(), status, retry))
            assert conn is not None
            if not conn.closed:
                self.idle.append(conn)
            else:
                self.opened -= 1
        except (TimeoutError, OSError) as e:
            self.outcomes.append(Outcome(due, sent, time.perf_counter(), 0, error=type(e).__name__))
            if conn is not None:
                if conn.transport is not None:
                    conn.transport.close()
                self.opened -= 1

    async def run(self, rate: float, seconds: float) -> tuple[float, float]:
        """Send at `rate` req/s for `seconds`; returns (start, end) of the sending period."""
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self._one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        end = time.perf_counter()
        if tasks:
            await asyncio.wait(tasks)
        return start, end

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


# -- memory ---------------------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """The server's resident memory every `every_s`, from /proc (None where /proc is absent)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (perf_counter, MiB)
        self.stopping = threading.Event()

    def read_mib(self) -> float | None:
        try:
            for line in self.path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def run(self) -> None:
        while not self.stopping.is_set():
            if (mib := self.read_mib()) is not None:
                self.samples.append((time.perf_counter(), mib))
            self.stopping.wait(self.every_s)

    def between(self, start: float, end: float) -> list[float]:
        return [mib for t, mib in self.samples if start <= t <= end]


# -- summaries ------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summarise_phase(
    name: str, rate: float, span: tuple[float, float], outcomes: list[Outcome], rss: list[float], dropped: int
) -> dict[str, Any]:
    ok = [o.latency_ms for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status else f"client:{o.error}"
        statuses[key] = statuses.get(key, 0) + 1
    seconds = span[1] - span[0]
    return {
        "phase": name,
        "offered_req_per_s": round(rate, 1),
        "sent_req_per_s": round(len(outcomes) / seconds, 1) if seconds else None,
        "seconds": round(seconds, 2),
        "requests": len(outcomes),
        "statuses": statuses,
        "accepted": len(ok),
        "accepted_req_per_s": round(len(ok) / seconds, 1) if seconds else None,
        "accepted_p50_ms": pct(ok, 0.5),
        "accepted_p99_ms": pct(ok, 0.99),
        "accepted_max_ms": round(max(ok), 1) if ok else None,
        "rejected_503": len(refused),
        "rejected_p50_ms": pct([o.latency_ms for o in refused], 0.5),
        "rejected_p99_ms": pct([o.latency_ms for o in refused], 0.99),
        "rejected_wire_p50_ms": pct([o.wire_ms for o in refused], 0.5),
        "rejected_wire_p90_ms": pct([o.wire_ms for o in refused], 0.9),
        "rejected_wire_p99_ms": pct([o.wire_ms for o in refused], 0.99),
        "client_lag_p99_ms": pct([(o.sent - o.due) * 1000 for o in outcomes], 0.99),
        "rejected_without_retry_after": sum(1 for o in refused if not o.retry_after),
        "retry_after_values": sorted({o.retry_after for o in refused if o.retry_after}),
        "client_dropped": dropped,
        "rss_min_mib": round(min(rss), 1) if rss else None,
        "rss_max_mib": round(max(rss), 1) if rss else None,
    }


def recovery_time(outcomes: list[Outcome], drop_at: float, normal_p50_ms: float) -> float | None:
    """Seconds from the load drop to the start of the first WINDOW_S window from which on every window
    has no 503 and a p50 of accepted requests within 2× the baseline's (+10 ms); None if never."""
    windows: dict[int, list[Outcome]] = {}
    for o in outcomes:
        windows.setdefault(int((o.due - drop_at) / WINDOW_S), []).append(o)
    limit = 2 * normal_p50_ms + 10
    good = {
        i: all(o.status == 200 for o in w) and statistics.median(o.latency_ms for o in w) <= limit
        for i, w in windows.items()
    }
    for i in sorted(good):
        if all(good[j] for j in good if j >= i):
            return round(i * WINDOW_S, 2)
    return None


def window_p50s(outcomes: list[Outcome], drop_at: float) -> list[float | None]:
    """p50 latency of accepted requests in each WINDOW_S window after the load drop (None: none there)."""
    windows: dict[int, list[float]] = {}
    for o in outcomes:
        if o.status == 200:
            windows.setdefault(int((o.due - drop_at) / WINDOW_S), []).append(o.latency_ms)
    last = max(windows, default=-1)
    return [round(statistics.median(windows[i]), 1) if i in windows else None for i in range(last + 1)]


def server_counters(port: int) -> dict[str, float]:
    """The service's own view: rejections by reason and timeouts by stage (from /metrics)."""
    status, body = servers.http_get(port, "/metrics", timeout=10)
    counters: dict[str, float] = {}
    if status != 200:
        return counters
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name in ("carvae_rejected_total", "carvae_timeouts_total"):
                key = f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}"
                counters[key] = s.value
    return counters


def markdown(result: dict[str, Any]) -> str:
    cfg, host = result["config"], result["machine"]
    lines = [
        f"Overload run {result['when']} on {host['cpu']} ({host['usable_cores']} cores), "
        f"model: {cfg['model']}; upload: {cfg['upload']}. Server settings: "
        + (", ".join(f"`CARVAE_{k}={v}`" for k, v in cfg["settings"].items()) or "defaults")
        + f". Capacity (closed loop, {cfg['capacity_connections']} connections): "
        f"**{result['capacity_req_per_s']} req/s**; overload offered at {cfg['factor']:g}× that.",
        "",
        "| phase | offered req/s | accepted req/s | accepted p50 / p99 ms | 503s | 503 p50 / p99 ms "
        "| 503 on the wire p50 / p99 ms | client lag p99 ms | other statuses | server RSS min–max MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        others = {k: v for k, v in p["statuses"].items() if k not in ("200", "503")}
        lines.append(
            f"| {p['phase']} | {p['offered_req_per_s']} | {p['accepted_req_per_s']} "
            f"| {p['accepted_p50_ms']} / {p['accepted_p99_ms']} | {p['rejected_503']} "
            f"| {p['rejected_p50_ms']} / {p['rejected_p99_ms']} "
            f"| {p['rejected_wire_p50_ms']} / {p['rejected_wire_p99_ms']} | {p['client_lag_p99_ms']} "
            f"| {others or '–'} "
            f"| {p['rss_min_mib']}–{p['rss_max_mib']} |"
        )
    rec = result["recovery_after_s"]
    lines += [
        "",
        f"Every 503 carried `Retry-After` ({', '.join(result['retry_after_values']) or '–'} s): "
        f"{result['rejected_without_retry_after'] == 0}. RSS growth under overload: "
        f"{result['rss_growth_mib']} MiB. Back to baseline latency "
        + (f"{rec} s after the load dropped." if rec is not None else "NOT within the recovery phase.")
        + f" Sequential check afterwards: {result['after']['ok']}/{result['after']['requests']} OK.",
    ]
    return "\n".join(lines) + "\n"


# -- the run --------------------------------------------------------------------------------------------
async def _open_loop_phases(
    plan: Plan, srv: servers.Running, request: bytes, capacity: float, rss: RssSampler
) -> tuple[list[dict[str, Any]], OpenLoop, float]:
    client = OpenLoop(servers.HOST, srv.port, request, plan.max_connections)
    phases = []
    drop_at = 0.0
    for name, share, seconds in (
        ("baseline", LIGHT, plan.baseline_s),
        ("overload", plan.factor, plan.overload_s),
        ("recovery", LIGHT, plan.recovery_s),
    ):
        first, dropped_before = len(client.outcomes), client.client_dropped
        rate = max(1.0, capacity * share)
        span = await client.run(rate, seconds)
        if name == "recovery":
            drop_at = span[0]
        phases.append(
            summarise_phase(
                name,
                rate,
                span,
                client.outcomes[first:],
                rss.between(span[0], time.perf_counter()),
                client.client_dropped - dropped_before,
            )
        )
    return phases, client, drop_at


async def _sequential(port: int, request: bytes, n: int) -> dict[str, Any]:
    """n requests one after another on one fresh connection: a plain client after the storm."""
    _, conn = await asyncio.get_running_loop().create_connection(Connection, servers.HOST, port)
    statuses = []
    try:
        for _ in range(n):
            status, _, _ = await asyncio.wait_for(conn.request(request), REQUEST_TIMEOUT_S)
            statuses.append(status)
    finally:
        if conn.transport is not None:
            conn.transport.close()
    return {"requests": n, "ok": statuses.count(200), "statuses": statuses}


def run(plan: Plan, checkpoint: Path, model: str, out: Path) -> dict[str, Any]:
    photo, photo_desc = assets.car_jpeg()
    spec = servers.carvae("carvae", checkpoint, **plan.settings)
    out.mkdir(parents=True, exist_ok=True)
    srv = servers.Running(spec, out / "overload-server.log")
    rss = RssSampler(srv.pid)
    rss.start()
    try:
        request = multipart_request(servers.HOST, "/reconstruct", "file", "car.jpg", photo)
        loop = new_event_loop()
        try:
            connections = 2 * plan.batch
            cap = loop.run_until_complete(
                run_closed_loop(servers.HOST, srv.port, request, connections, plan.capacity_s, warmup_s=0.5)
            )
            capacity = cap.ok / cap.seconds
            phases, client, drop_at = loop.run_until_complete(
                _open_loop_phases(plan, srv, request, capacity, rss)
            )
            recovery_outcomes = [o for o in client.outcomes if o.due >= drop_at]
            client.close()
            after = loop.run_until_complete(_sequential(srv.port, request, 10))
        finally:
            loop.close()
        counters = server_counters(srv.port)
    finally:
        rss.stopping.set()
        rss.join()
        srv.stop()
    baseline, overload = phases[0], phases[1]
    rss_base = baseline["rss_max_mib"]
    result = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "config": {
            "model": model,
            "upload": photo_desc,
            "factor": plan.factor,
            "settings": plan.settings,
            "capacity_connections": 2 * plan.batch,
            "server_request_timeout_s": plan.timeout_s,
        },
        "capacity_req_per_s": round(capacity, 1),
        "capacity_p50_ms": cap.summary()["p50_ms"],
        "phases": phases,
        "rejected_without_retry_after": sum(p["rejected_without_retry_after"] for p in phases),
        "retry_after_values": sorted({v for p in phases for v in p["retry_after_values"]}),
        "rss_growth_mib": (
            round(overload["rss_max_mib"] - rss_base, 1) if rss_base and overload["rss_max_mib"] else None
        ),
        "recovery_window_s": WINDOW_S,
        "recovery_window_p50_ms": window_p50s(recovery_outcomes, drop_at),
        "recovery_after_s": recovery_time(recovery_outcomes, drop_at, baseline["accepted_p50_ms"] or 0.0),
        "after": after,
        "server_counters": counters,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--short", action="store_true", help="a few seconds with a tiny model (CI)")
    p.add_argument("--factor", type=float, default=4.0, help="overload as a multiple of capacity (4)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model to serve (default: bench assets)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for overload.json/.md")
    args = p.parse_args(argv)
    plan = make_plan(args.short, args.factor)
    if args.checkpoint is not None:
        checkpoint, model = args.checkpoint, str(args.checkpoint.name)
    else:
        checkpoint, model = assets.checkpoint(quick=args.short)
    result = run(plan, checkpoint, model, args.out)
    (args.out / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "overload.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
