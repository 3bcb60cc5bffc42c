"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units. Label values
are bounded: `route` is the route template (never the raw path; unknown paths are "unmatched"), `method`
one of METHODS or "other", `op` one of the batcher's ops.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# The methods a client of this API sends (OPTIONS: CORS preflights); every other one is labelled "other".
METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})

# Every counter and histogram would also export a `_created` timestamp series: twice the series for what
# Prometheus already knows from the process start time. Process-wide, which the service is.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Every label value these counters can take, exported at 0 from the start: a counter that appears only
# after its first event reads as "no such metric" to a dashboard or an alert on rate().
# not_loaded: a model request before the model is loaded; stopping: one the service's stop refused (a job
# still queued when the batcher stopped, a request the server cancelled) or that came after it began.
REJECT_REASONS = ("in_flight", "queue_full", "not_running", "not_loaded", "stopping")
TIMEOUT_STAGES = ("decode", "queue", "wait")
# What the server itself refuses or closes before the app sees a request (service.connections).
SERVER_REFUSALS = (
    "bad_request",
    "request_timeout",
    "headers_too_large",
    "idle",
    "unread_body_timeout",
    "unread_response_timeout",
    "too_many_connections",
)


class Metrics:
    """All service metrics; also the batcher's observer (see service.batcher.BatchObserver)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # Resident memory, CPU and open fds of the process: what the overload test watches.
        ProcessCollector(registry=r)
        # The default registry has these two; a registry of our own must add them. The service tunes the
        # cyclic GC (gc.freeze after warm-up, service.main): python_gc_* shows whether full collections
        # come back, python_info which interpreter a deployment runs.
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "carvae_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "carvae_request_duration_seconds",
            "HTTP request latency, first byte in to response sent",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("carvae_in_flight_requests", "model requests being handled now", registry=r)
        self.queue_depth_gauge = Gauge("carvae_queue_depth", "jobs waiting for the model", registry=r)
        self.batch_size = Histogram(
            "carvae_batch_size", "rows per forward pass", ["op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "carvae_queue_wait_seconds",
            "time a job waited in the queue before its forward pass started",
            ["op"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "carvae_batch_wait_seconds",
            "time from a batch's first job being queued to the batch starting",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "carvae_compute_seconds",
            "forward pass time per batch",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected_total = Counter(
            "carvae_rejected",
            "requests refused with 503: overload (in_flight, queue_full), the model worker not running "
            "(not_running), the model not loaded yet (not_loaded), the service stopping (stopping)",
            ["reason"],
            registry=r,
        )
        self.timeouts_total = Counter(
            "carvae_timeouts", "requests answered 504 (deadline passed)", ["stage"], registry=r
        )
        # The app's own counters never see these: without one, a slowloris or a scanner speaking TLS to
        # the port would be visible only in the log.
        self.server_refusals_total = Counter(
            "carvae_server_refusals",
            "connections the server answered or closed before the app saw a request: bad_request (400, "
            "not HTTP/1.1), request_timeout (408, head too slow), headers_too_large (431), idle (a "
            "connection that sent no request within the keep-alive time), unread_body_timeout (the rest "
            "of an answered body too slow), unread_response_timeout (a client that stopped reading its "
            "answers, cut off), too_many_connections (503, a connection over MAX_CONNECTIONS)",
            ["reason"],
            registry=r,
        )
        for reason in SERVER_REFUSALS:
            self.server_refusals_total.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected_total.labels(reason)
        for stage in TIMEOUT_STAGES:
            self.timeouts_total.labels(stage)
        self.model_info = Info("carvae_model", "the served model", registry=r)
        self.ready = Gauge("carvae_ready", "1 when the model is loaded and warmed up", registry=r)

    # -- BatchObserver ------------------------------------------------------------------------------
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def batch(
        self, op: str, rows: int, batch_wait_s: float, queue_waits_s: Sequence[float], compute_s: float
    ) -> None:
        self.batch_size.labels(op).observe(rows)
        self.batch_wait.observe(batch_wait_s)
        hist = self.queue_wait.labels(op)
        for w in queue_waits_s:
            hist.observe(w)
        self.compute.labels(op).observe(compute_s)

    def rejected(self, reason: str) -> None:
        self.rejected_total.labels(reason).inc()

    def timed_out(self, stage: str) -> None:
        self.timeouts_total.labels(stage).inc()

    def server_refused(self, reason: str) -> None:
        self.server_refusals_total.labels(reason).inc()

    # -- HTTP ---------------------------------------------------------------------------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # A scanner's PROPFIND or made-up verb would otherwise add series for every route it tries.
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_duration.labels(route, method).observe(seconds)

    def set_model(self, model_id: str, device: str, image_size: int, latent_dim: int) -> None:
        self.model_info.info(
            {
                "model_id": model_id,
                "device": device,
                "image_size": str(image_size),
                "latent_dim": str(latent_dim),
            }
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
