"""Pure-ASGI middleware: request ids, logging and metrics; API key; body limits; admission control.

Pure ASGI (not BaseHTTPMiddleware) so each check runs before the body is read and nothing buffers a
response. Refusals are sent from here, in the shared error shape, without calling the app.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Collection, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, new_request_id, request_id_of
from service.metrics import Metrics

log = logging.getLogger("carvae.service")


def route_label(scope: Scope, known_paths: Collection[str] = ()) -> str:
    """The matched route's template, so label values stay bounded. A request refused by middleware before
    routing keeps its path if that is one of the app's routes; anything else is "unmatched"."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    return scope["path"] if scope["path"] in known_paths else "unmatched"


class RequestContextMiddleware:
    """Outermost: X-Request-ID on every response, one log line and the request metrics per request,
    and the last line of defence that turns an unhandled exception into a logged 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: Collection[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "request_id=%s unhandled error on %s %s",
                rid,
                scope["method"],
                route_label(scope, self.known_paths),
            )
            if not started:
                response = error_response(
                    500, "internal_error", f"internal error; quote request id {rid}", rid
                )
                await response(scope, receive, send_with_id)
            status = 500
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope, self.known_paths)
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            log.info(
                "request_id=%s method=%s route=%s status=%d ms=%.1f",
                rid,
                scope["method"],
                route,
                status,
                elapsed * 1000,
            )


def _api_key_matches(headers: Headers, key: bytes) -> bool:
    """`Authorization: Bearer K` or `X-API-Key: K`, compared in constant time."""
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    candidates = [headers.get("x-api-key")]
    if scheme.lower() == "bearer":
        candidates.append(token.strip())
    ok = False
    for c in candidates:
        if c is not None:
            # Evaluate every candidate (no short-circuit) so timing does not tell which header matched.
            ok |= hmac.compare_digest(c.encode("utf-8", "surrogateescape"), key)
    return ok


class ApiKeyMiddleware:
    """Requires the API key on every path except the open ones; answers 401 before reading the body."""

    def __init__(
        self, app: ASGIApp, key: str, open_paths: Collection[str], open_prefixes: Collection[str]
    ) -> None:
        self.app = app
        self.key = key.encode("utf-8")
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path_is_open = scope["type"] != "http" or self._is_open(scope["path"])
        if not path_is_open and not _api_key_matches(Headers(scope=scope), self.key):
            response = error_response(
                401,
                "unauthorized",
                "missing or wrong API key (use 'Authorization: Bearer <key>' or 'X-API-Key')",
                request_id_of(scope),
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses request bodies over a limit without holding them: a declared Content-Length over the limit
    is answered 413 before any byte is read; a chunked (or lying) body is counted while it streams in and
    answered 413 the moment it crosses the limit, while the client may still be sending."""

    def __init__(self, app: ASGIApp, default_limit: int, limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits = dict(limits or {})

    def _too_large(self, scope: Scope, limit: int) -> ASGIApp:
        return error_response(
            413,
            "payload_too_large",
            f"request body is larger than the limit of {limit} bytes",
            request_id_of(scope),
            {"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await self._too_large(scope, limit)(scope, receive, send)
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    await self._too_large(scope, limit)(scope, receive, send)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # once we answered 413, whatever the app still sends is dropped
                await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)


class AdmissionMiddleware:
    """Caps model requests handled at once (from upload to response). The batcher's queue bounds jobs
    waiting for the model; this bounds everything around it (uploads being read, images being decoded or
    encoded), so memory stays flat under any load. Over the cap: 503 + Retry-After before the body is read.

    It also refuses at once while the model queue is full (`queue_is_full`): such a request would be read
    and decoded only to meet the full queue and be refused then, a second or more later under overload."""

    def __init__(
        self,
        app: ASGIApp,
        paths: Collection[str],
        max_in_flight: int,
        metrics: Metrics,
        queue_is_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.queue_is_full = queue_is_full
        self.in_flight = 0

    def _refusal(self) -> tuple[str, str] | None:
        if self.in_flight >= self.max_in_flight:
            return "in_flight", f"the service is at capacity ({self.max_in_flight} requests); retry shortly"
        if self.queue_is_full():
            return "queue_full", "the model queue is full; retry shortly"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if (refusal := self._refusal()) is not None:
            reason, message = refusal
            self.metrics.rejected(reason)
            response = error_response(503, "overloaded", message, request_id_of(scope), {"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
