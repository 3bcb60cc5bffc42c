"""Pure-ASGI middleware: request ids, logging and metrics; API key; content codings; form bodies; body
limits; admission control.

Pure ASGI (not BaseHTTPMiddleware) so each check runs before the body is read and nothing buffers a
response. Refusals are sent from here, in the shared error shape, without calling the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from http import HTTPStatus
from typing import NoReturn

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    clip,
    error_body,
    error_response,
    new_request_id,
    not_a_form_message,
    request_id_of,
    status_code_name,
)
from service.headers import API_CSP, OWN_POLICY, HeaderList
from service.metrics import Metrics

log = logging.getLogger("carvae.service")


def app_path(scope: Scope) -> str:
    """The request's path as the app's routes name it: without the root_path (CARVAE_ROOT_PATH) that
    uvicorn, as ASGI has it, puts in front of every path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def route_label(
    scope: Scope, path: str, known_paths: Collection[str] = (), mounts: Collection[str] = ()
) -> str:
    """The matched route's template, so label values stay bounded. A request refused by middleware before
    routing keeps its path (`app_path` as it was before routing: a mount rewrites the scope's root_path)
    if that is one of the app's routes; a file under a mount (the page's assets, the docs' assets) is
    labelled with the mount's path; anything else is "unmatched"."""
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str) and template:
        return template
    if path in known_paths:
        return str(path)
    return next((m for m in mounts if path.startswith(m + "/")), "unmatched")


# Added to every response while the service drains.
_CLOSE = (b"connection", b"close")
# Headers of a plain-text error that stay when it is rewritten as JSON (Content-Range on a 416, Allow…).
_REPLACED_ON_REWRITE = (b"content-type", b"content-length")
_MAX_REWRITTEN_MESSAGE = 300
_MAX_HELD_BYTES = 4096


def _is_json(headers: Collection[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


def _has_policy(headers: Collection[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-security-policy" for k, _ in headers)


class RequestContextMiddleware:
    """Outermost: X-Request-ID on every response, one log line and the request metrics per request,
    and the last line of defence that turns an unhandled exception into a logged 500.

    It also holds every error response to the one JSON shape: a few are written by Starlette itself as
    plain text, outside any exception handler (StaticFiles' 400 and 416 for a bad Range header); their
    text becomes the message, and their other headers are kept.

    And it adds what `headers` gives for the path to every response: Cache-Control and the browser
    security headers (service.headers; the app sets none of them)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        known_paths: Collection[str] = (),
        quiet_paths: Collection[str] = (),
        mounts: Collection[str] = (),
        draining: Callable[[], bool] = lambda: False,
        headers: Callable[[str], HeaderList] = lambda path: (),
    ) -> None:
        self.app = app
        self.headers = headers
        self.metrics = metrics
        # While the service drains (service.server), every response closes its connection: a client's
        # pooled keep-alive connection would otherwise stay on this instance until the port closes.
        self.draining = draining
        self.known_paths = frozenset(known_paths)
        self.mounts = tuple(mounts)
        # Probes and scrapes succeed every few seconds for the whole life of a deployment: their lines
        # at info would bury the requests (a 5 s healthcheck alone is ~17,000 lines a day). Debug instead.
        self.quiet_paths = frozenset(quiet_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        path = app_path(scope)
        for_path = self.headers(path)
        added = (rid_header, *for_path)
        # A page that sets its own policy (/docs): what else answers there (a 405, a CORS preflight, an
        # error) sets none, and gets the API's.
        own_policy = for_path is OWN_POLICY
        start = time.perf_counter()
        status = 500
        started = False
        held: Message | None = None  # the start of a non-JSON error, until its body is complete
        held_body = b""

        def extra_for(headers: Collection[tuple[bytes, bytes]]) -> HeaderList:
            extra = (*added, _CLOSE) if self.draining() else added
            return (*extra, API_CSP) if own_policy and not _has_policy(headers) else extra

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, held, held_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                if status >= 400 and not _is_json(headers):
                    held = message
                    return
                held, started = None, True
                message = {**message, "headers": [*headers, *extra_for(headers)]}
            elif held is not None and message["type"] == "http.response.body":
                if len(held_body) < _MAX_HELD_BYTES:  # only its start becomes the message
                    held_body += message.get("body", b"")
                if not message.get("more_body", False):
                    started = True
                    await self._send_as_json(send, held, held_body, extra_for(held.get("headers", ())))
                return
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful stop runs out of time. Answer
            # them in the one error shape rather than with its plain-text 500 and a traceback each; this is
            # the request's outermost layer, so the cancellation ends here.
            log.warning("request_id=%s cancelled by the server's stop", rid, extra={"request_id": rid})
            if not started:
                self.metrics.rejected("stopping")
                response = error_response(
                    503, "unavailable", "the service stopped before this request was answered", rid
                )
                await response(scope, receive, send_with_id)
            status = 503
        except Exception:
            log.exception(
                "request_id=%s unhandled error on %s %s",
                rid,
                scope["method"],
                route_label(scope, path, self.known_paths, self.mounts),
                extra={"request_id": rid},
            )
            if not started:
                response = error_response(
                    500, "internal_error", f"internal error; quote request id {rid}", rid
                )
                await response(scope, receive, send_with_id)
            status = 500
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope, path, self.known_paths, self.mounts)
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            level = logging.DEBUG if status < 400 and route in self.quiet_paths else logging.INFO
            if log.isEnabledFor(level):
                fields = {
                    "request_id": rid,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "ms": round(elapsed * 1000, 1),
                }
                # The fields twice: in the message for a reader, as attributes for the JSON format.
                log.log(level, " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    @staticmethod
    async def _send_as_json(
        send: Send, start: Message, text: bytes, added: tuple[tuple[bytes, bytes], ...]
    ) -> None:
        """`added`: the request id header first, then what every response gets."""
        rid_header = added[0]
        status = start["status"]
        message = text.decode("utf-8", "replace").strip()[:_MAX_REWRITTEN_MESSAGE]
        if not message:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = f"HTTP {status}"
        body = error_body(status_code_name(status), message, rid_header[1].decode())
        kept = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in _REPLACED_ON_REWRITE]
        headers = [
            *kept,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *added,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class TrailingSlashMiddleware:
    """/reconstruct/ (or //) is served as /reconstruct, for every route. Starlette's answer was a 307 to the
    path without the slash, with an empty body: `curl -o out.png` wrote an empty file and exited 0, and a
    client that does not follow redirects got nothing it could read. The path is rewritten before
    anything else looks at it, so the API key, body limits, admission, logs and metrics see the route."""

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(p for p in paths if p != "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = app_path(scope)
            if path.endswith("/") and (route := path.rstrip("/")) in self.paths:
                extra = len(path) - len(route)
                scope = {**scope, "path": scope["path"][:-extra]}
                raw = scope.get("raw_path")
                if isinstance(raw, bytes) and raw.endswith(b"/" * extra):
                    scope["raw_path"] = raw[:-extra]
        await self.app(scope, receive, send)


class HeadAsGetMiddleware:
    """HEAD on the GET routes (probes, the page, /metrics, the model card), answered as GET without the
    body: uptime monitors and load balancers probe with HEAD, and FastAPI routes only take the methods
    they are declared with. The app sees a GET on a copy of the scope; the server keeps the original,
    whose HEAD tells it to send the headers alone."""

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and app_path(scope) in self.paths:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


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
        path_is_open = scope["type"] != "http" or self._is_open(app_path(scope))
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


def content_codings(headers: Headers) -> list[str]:
    """The content codings a request body was sent with (`Content-Encoding: gzip`), `identity` left out:
    every Content-Encoding line, each a comma-separated list."""
    return [
        coding
        for line in headers.getlist("content-encoding")
        for item in line.split(",")
        if (coding := item.strip().lower()) and coding != "identity"
    ]


class ContentEncodingMiddleware:
    """Refuses a POST body sent with a content coding (gzip, br, deflate, ...) with 415 before reading it.

    The service decodes no content coding, and nothing else looks at the header: a gzipped JSON body was
    answered "not valid JSON (not UTF-8 text)", a gzipped form "Missing boundary" or "Invalid multipart
    data", neither of which says what to change. RFC 9110 §15.5.16: 415, with Accept-Encoding naming what
    would be taken."""

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and app_path(scope) in self.paths:
            codings = content_codings(Headers(scope=scope))
            if codings:
                response = error_response(
                    415,
                    "unsupported_content_encoding",
                    f"Content-Encoding {clip(', '.join(codings), 80)} is not supported; send the body "
                    "uncompressed",
                    request_id_of(scope),
                    {"Accept-Encoding": "identity"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class FormBodyMiddleware:
    """Refuses a POST body that is not multipart/form-data on the upload routes, before it is read, saying
    which parts to send.

    FastAPI parses a route's form before any of its checks run, and parses an urlencoded body too: curl's
    `--data-binary @car.jpg` sends the photo so, and a photo of a real size ended in Starlette's 400 "Too
    many fields. Maximum number of fields is 1000." or "Field exceeded maximum size of 1024KB.", words
    about sizes that say nothing of the form. A request with no body at all goes on: FastAPI then names
    the missing parts."""

    def __init__(self, app: ASGIApp, file_parts: Mapping[str, Sequence[str]]) -> None:
        self.app = app
        self.file_parts = dict(file_parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = self.file_parts.get(app_path(scope)) if scope["type"] == "http" else None
        if parts is not None and scope["method"] == "POST":
            headers = Headers(scope=scope)
            ctype = headers.get("content-type")
            is_form = (ctype or "").split(";")[0].strip().lower() == "multipart/form-data"
            no_body = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
            if not is_form and not (ctype is None and no_body):
                response = error_response(
                    422, "validation_error", not_a_form_message(parts, ctype), request_id_of(scope)
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyRefused(Exception):
    pass


async def _receive_by(receive: Receive, deadline: float) -> Message:
    """receive(), or TimeoutError at `deadline` (loop time)."""
    async with asyncio.timeout_at(deadline):
        return await receive()


class BodyLimitMiddleware:
    """Refuses request bodies over a size limit or slower than a time limit, without holding them.

    Size: a declared Content-Length over the limit is answered 413 before any byte is read; a chunked (or
    lying) body is counted while it streams in and answered 413 the moment it crosses the limit, while the
    client may still be sending. Time: the whole body must arrive within `timeout_s` of the request
    reaching the app, or it is answered 408 and the connection closed. Without that, a client that sends
    half a body and stalls (or lies in its Content-Length) would hold its request slot (the admission
    cap) for as long as it keeps the connection open, and a few hundred of them would lock everyone out."""

    def __init__(
        self,
        app: ASGIApp,
        default_limit: int,
        limits: Mapping[str, int] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits = dict(limits or {})
        self.timeout_s = timeout_s

    def _too_large(self, scope: Scope, limit: int) -> ASGIApp:
        return error_response(
            413,
            "payload_too_large",
            f"request body is larger than the limit of {limit} bytes ({limit / 2**20:.3g} MiB)",
            request_id_of(scope),
            {"Connection": "close"},
        )

    def _too_slow(self, scope: Scope) -> ASGIApp:
        return error_response(
            408,
            "request_timeout",
            f"the request body did not arrive within {self.timeout_s:g} s",
            request_id_of(scope),
            {"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(app_path(scope), self.default_limit)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await self._too_large(scope, limit)(scope, receive, send)
            return
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        refused = False
        body_done = False

        async def refuse(response: ASGIApp) -> NoReturn:
            nonlocal refused
            refused = True
            await response(scope, receive, send)
            raise _BodyRefused

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done or deadline is None:
                # After the body, receive() only reports a disconnect: that wait has no deadline.
                message = await receive()
            else:
                try:
                    message = await _receive_by(receive, deadline)
                except TimeoutError:
                    if refused:
                        raise _BodyRefused from None
                    await refuse(self._too_slow(scope))
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit and not refused:
                    await refuse(self._too_large(scope, limit))
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # once we answered 413 or 408, whatever the app still sends is dropped
                await send(message)

        with contextlib.suppress(_BodyRefused):
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
        if scope["type"] != "http" or app_path(scope) not in self.paths:
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
