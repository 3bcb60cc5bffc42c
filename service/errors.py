"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "request_id"}}`.

Exception handlers map the core's and the batcher's exceptions to statuses. Validation errors are
rebuilt from location + message only: FastAPI's default echoes the input back, and an input holding
NaN/Infinity cannot be written as JSON (that path used to end in a 500).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Scope

from carvae.preprocess import ImageError
from service.batcher import Abandoned, BatchFailed, DeadlineExceeded, Overloaded
from service.pipeline import InvalidLatents

log = logging.getLogger("carvae.service")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Request ids must be unique, not secret: a generator seeded once from the OS, not uuid4, whose
# os.urandom call releases the GIL on every request and makes the event loop win it back (2026-11-30 A/B,
# 4 rounds: c=1 p50 9.32 vs 10.85 ms, every round ahead; c=64 255 vs 244 req/s).
_REQUEST_IDS = random.Random()  # noqa: S311
os.register_at_fork(after_in_child=_REQUEST_IDS.seed)  # a forked worker must not repeat its parent's ids
# nginx's code for "client closed the request": only ever seen in our logs and metrics.
CLIENT_CLOSED = 499

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "overloaded",
    504: "timeout",
}


def status_code_name(status: int) -> str:
    """The error shape's `code` for an HTTP status that has no more specific one."""
    return _STATUS_CODES.get(status, f"http_{status}")


class ApiError(Exception):
    """An error a route raises on purpose, with its status and code."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def new_request_id(incoming: str | None = None) -> str:
    """Keep a caller's id if it is short and plain (it ends up in our logs), else make one."""
    if incoming and _SANE_REQUEST_ID.match(incoming):
        return incoming
    return f"{_REQUEST_IDS.getrandbits(128):032x}"


def request_id_of(scope: Scope) -> str:
    state = scope.get("state") or {}
    rid = state.get("request_id") if isinstance(state, Mapping) else None
    return str(rid) if rid else "-"


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode()


def error_response(
    status: int, code: str, message: str, request_id: str, headers: Mapping[str, str] | None = None
) -> Response:
    body = error_body(code, message, request_id)
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers or {}))


def _error(
    request: Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return error_response(status, code, message, request_id_of(request.scope), headers)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


NOT_A_FILE_PART = "must be a file: a multipart part with a filename (curl -F 'file=@car.jpg')"
NOT_A_FILE_PART_OVER_LIMIT = (
    "a form part without a filename is over 1 MiB: a photo sent without one is a text field, not a file; "
    "send it as a multipart part with a filename (curl -F 'file=@car.jpg')"
)


def not_a_form_message(parts: Sequence[str], ctype: str | None) -> str:
    """What to send instead of a body that is not multipart/form-data, to a route taking the file `parts`."""
    what = f"Content-Type {clip(ctype, 80)}" if ctype else "no Content-Type"
    curl = " ".join(f"-F '{name}=@car.jpg'" for name in parts)
    wanted = ", ".join(parts)
    return f"the body must be multipart/form-data with the part(s) {wanted} (curl {curl}); got {what}"


def describe_validation_errors(errors: list[Any], max_items: int = 5) -> tuple[str, str]:
    """(code, message) from pydantic/FastAPI errors without any of the input values."""
    if not errors:
        return "validation_error", "the request is invalid"
    parts = []
    for err in errors[:max_items]:
        loc = ".".join(clip(str(p), 40) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            # FastAPI's loc is ("body", offset of the error): "body.1" reads as a field path.
            offset = err.get("loc", ())[-1:]
            detail = (err.get("ctx") or {}).get("error") or "JSON decode error"
            where = f" at character {offset[0]}" if offset and isinstance(offset[0], int) else ""
            loc, msg = "", f"body is not valid JSON ({detail}{where})"
        elif "Expected UploadFile" in msg:  # FastAPI's words for a form value where a file belongs
            msg = NOT_A_FILE_PART
        elif err.get("type") == "value_error":  # our validators' words, without pydantic's prefix
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > max_items:
        parts.append(f"and {len(errors) - max_items} more")
    missing = all(err.get("type") == "missing" for err in errors)
    return ("missing_field" if missing else "validation_error"), clip("; ".join(parts), 1000)


async def _api_error(request: Request, exc: Exception) -> Response:
    err = cast(ApiError, exc)
    return _error(request, err.status, err.code, err.message, err.headers)


async def _image_error(request: Request, exc: Exception) -> Response:
    err = cast(ImageError, exc)
    return _error(request, err.status, err.code, err.message)


async def _invalid_latents(request: Request, exc: Exception) -> Response:
    return _error(request, 422, "validation_error", str(exc))


def _parsed_as_json(ctype: str) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON: application/json or application/*+json
    only. text/json, application/x-json or application/jsonl reach the model as bytes."""
    major, _, minor = ctype.split(";")[0].strip().lower().partition("/")
    return major == "application" and (minor == "json" or minor.endswith("+json"))


async def _validation_error(request: Request, exc: Exception) -> Response:
    err = cast(RequestValidationError, exc)
    errors = list(err.errors())
    ctype = request.headers.get("content-type", "")
    if not _parsed_as_json(ctype) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        # A JSON endpoint given another content type sees the body as text ("should be a valid
        # dictionary"); say what to fix instead.
        what = f"Content-Type {clip(ctype, 80)}" if ctype else "no Content-Type"
        message = f"the body must be JSON sent with Content-Type: application/json (got {what})"
        return _error(request, 422, "validation_error", message)
    code, message = describe_validation_errors(errors)
    return _error(request, 422, code, message)


def _unparsable_json(request: Request, exc: StarletteHTTPException) -> str | None:
    """What is wrong with a JSON body that FastAPI could not parse but did not call invalid JSON.

    FastAPI answers json.loads' JSONDecodeError with a 422, but everything else json.loads can raise (too
    deep, not UTF-8, an integer over Python's digit limit) with a bare 400 "error parsing the body" and
    the real exception as the cause; the client deserves the same 422 and to be told which it was."""
    cause = exc.__cause__
    ctype = request.headers.get("content-type", "").lower()
    is_json = not ctype or _parsed_as_json(ctype)  # FastAPI parses a body without a content type as JSON too
    if exc.status_code != 400 or not is_json or not isinstance(cause, (RecursionError, ValueError)):
        return None
    if isinstance(cause, RecursionError):
        return "body is not valid JSON (nested too deeply)"
    if isinstance(cause, UnicodeDecodeError):
        return "body is not valid JSON (not UTF-8 text)"
    if "digits" in str(cause):
        return f"body is not valid JSON (a number has more than {sys.get_int_max_str_digits()} digits)"
    return f"body is not valid JSON ({clip(str(cause), 200)})"


def _is_oversized_form_field(exc: StarletteHTTPException) -> bool:
    """Whether Starlette refused a part without a filename (a text field to it, held in memory) for its
    size. A photo sent without a filename (OkHttp's `createFormData(name, null, body)`, curl's
    `-F 'file=<car.jpg'`) is that part: under the limit FastAPI calls it "Expected UploadFile", over it it
    got a bare 400 "Part exceeded maximum size of 1024KB.", which reads as the upload limit. Starlette
    raises the 400 while handling its MultiPartException, which only its message tells apart."""
    cause = exc.__context__
    return (
        exc.status_code == 400
        and isinstance(cause, MultiPartException)
        and cause.message.startswith("Part exceeded maximum size")
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    err = cast(StarletteHTTPException, exc)
    if isinstance(err.__cause__, ClientDisconnect):
        # FastAPI turns a client that hangs up mid-body into a 400 "error parsing the body": nobody gets
        # that answer, and counting it as 400 made every aborted upload look like a bad request.
        return await _abandoned(request, exc)
    if (problem := _unparsable_json(request, err)) is not None:
        return _error(request, 422, "validation_error", problem)
    if _is_oversized_form_field(err):
        return _error(request, 422, "validation_error", NOT_A_FILE_PART_OVER_LIMIT)
    code = status_code_name(err.status_code)
    detail = err.detail if isinstance(err.detail, str) else code.replace("_", " ")
    if err.status_code == 404:
        detail = f"no route for {request.method} {clip(request.url.path, 200)}"
    headers = dict(err.headers or {})
    if err.status_code == 405:
        detail = f"method {request.method} is not allowed here"
        # FastAPI's routes list GET alone, but service.middleware.HeadAsGetMiddleware answers HEAD on every
        # GET route: Allow names all the methods that work (RFC 9110 §10.2.1).
        allowed = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        if "GET" in allowed and "HEAD" not in allowed:
            headers["Allow"] = ", ".join([*allowed, "HEAD"])
            allowed.append("HEAD")
        # Someone opening /reconstruct in a browser learns how to call it, not only that this is wrong.
        if allowed:
            docs = f"{request.scope.get('root_path', '')}/docs"
            detail += f"; use {' or '.join(allowed)} (see {docs})"
    return _error(request, err.status_code, code, detail, headers)


async def _overloaded(request: Request, exc: Exception) -> Response:
    err = cast(Overloaded, exc)
    return _error(request, 503, "overloaded", str(err), {"Retry-After": str(err.retry_after_s)})


async def _deadline(request: Request, exc: Exception) -> Response:
    return _error(request, 504, "timeout", f"the request took too long: {exc}")


async def _abandoned(request: Request, exc: Exception) -> Response:
    return _error(request, CLIENT_CLOSED, "client_closed_request", "the client disconnected")


async def _batch_failed(request: Request, exc: Exception) -> Response:
    rid = request_id_of(request.scope)
    # The batcher logged the traceback once for the whole batch; this line ties the request to it.
    log.error("request_id=%s failed in the model: %s", rid, exc, extra={"request_id": rid})
    return _error(request, 500, "internal_error", f"the model failed on this request; quote request id {rid}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidLatents, _invalid_latents)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(DeadlineExceeded, _deadline)
    app.add_exception_handler(Abandoned, _abandoned)
    app.add_exception_handler(BatchFailed, _batch_failed)
    # Anything else is caught by RequestContextMiddleware (service.middleware): it logs the traceback
    # with the request id and answers 500 in this same shape.
