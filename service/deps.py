"""Dependencies for the routes, as typed `Annotated` aliases (the full-stack-fastapi-template shape).

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
thread round trip per dependency per request that cost the event loop more than the work itself.

The model, batcher and pipeline are created in the lifespan (service.main) and live on `app.state`;
routes receive them from here, never from globals, so tests can build apps with other settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO

from fastapi import Depends, Header, Query, Request, UploadFile
from starlette.types import Receive

from service.batcher import Batcher, Overloaded
from service.config import Settings
from service.errors import ApiError, clip, request_id_of
from service.pipeline import CallContext, Pipeline, ServedModel
from service.schemas import FormatWord, ImageFormat, first_unknown, unknown_fields_message


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None or not request.app.state.ready:
        # The lifespan builds the pipeline, then sets ready; as it stops, it clears ready (pipeline kept).
        reason, why = "not_loaded", "the model is not loaded yet"
        if pipeline is not None:
            reason, why = "stopping", "the service is stopping"
        request.app.state.metrics.rejected(reason)
        raise Overloaded(why)
    return pipeline


async def get_model(pipeline: Annotated[Pipeline, Depends(get_pipeline)]) -> ServedModel:
    return pipeline.served


async def get_batcher(pipeline: Annotated[Pipeline, Depends(get_pipeline)]) -> Batcher:
    return pipeline.batcher


async def _until_disconnected(receive: Receive) -> None:
    # After the body has been read, the server's receive() only returns when the client goes away (or
    # the response is complete, by which time nobody is waiting on this any more).
    while (await receive())["type"] != "http.disconnect":
        pass


async def get_call_context(request: Request) -> CallContext:
    receive = request.receive
    return CallContext(tag=request_id_of(request.scope), cancel_on=lambda: _until_disconnected(receive))


@dataclass(frozen=True)
class Output:
    """What a client asked an image endpoint for: image bytes or JSON, and the image encoding."""

    fmt: ImageFormat
    as_json: bool


JSON = "application/json"
_IMAGE_TYPES: dict[str, ImageFormat] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def negotiate(accept: str | None, fmt: ImageFormat | None) -> Output:
    """JSON when Accept names application/json (or `application/*`) with a q above zero and at least as
    high as every image type's; the encoding from `?format=` when given, else the image type Accept rates
    highest (PNG on a tie, for `image/*`, `*/*`, no Accept, or only types we do not make; else the first
    listed of the best).

    Each type takes the q of the most specific range that matches it (RFC 9110 §12.5.1): in
    `image/jpeg;q=0.5, image/*` PNG and WebP are rated 1 and JPEG 0.5, and in `*/*;q=0.9,
    application/json;q=0.5` every image type outranks JSON (axios' and fetch's `*/*` alone is not a
    request for JSON)."""
    ranges = _accept_ranges(accept)
    json_q, json_named = _quality(ranges, JSON)
    rated = {f: _quality(ranges, media)[0] for media, f in _IMAGE_TYPES.items()}
    as_json = json_named and json_q > 0 and json_q >= max(rated.values())
    return Output(fmt if fmt is not None else _best_image(ranges, rated), as_json)


def accepts_json(accept: str | None) -> bool:
    """Whether JSON is acceptable at all under `accept`: a q above zero for application/json through the
    most specific range that matches it, as in `negotiate` (no Accept, `*/*` and `application/*` do)."""
    return _quality(_accept_ranges(accept), JSON)[0] > 0


def _accept_ranges(accept: str | None) -> list[tuple[str, float]]:
    """The media ranges of an Accept header, lower case, each with its q (0..1; 1 when not given)."""
    ranges: list[tuple[str, float]] = []
    for item in (accept or "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if not media:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), min(max(q, 0.0), 1.0) if q == q else 0.0))  # q is 0..1; NaN: 0
    return ranges


def _quality(ranges: list[tuple[str, float]], media: str) -> tuple[float, bool]:
    """(q of `media` under the most specific range that matches it: exact, then `type/*`, then `*/*`, 0
    when none does and 1 when there is no Accept; whether a range more specific than `*/*` matched)."""
    if not ranges:
        return 1.0, False
    major = media.split("/")[0]
    for pattern in (media, f"{major}/*", "*/*"):
        qs = [q for m, q in ranges if m == pattern]
        if qs:
            return max(qs), pattern != "*/*"
    return 0.0, False


def _best_image(ranges: list[tuple[str, float]], rated: dict[ImageFormat, float]) -> ImageFormat:
    best = max(rated.values())
    if best <= 0 or rated["png"] == best:
        return "png"
    # The first listed of the best; when only a wildcard rates them (`image/png;q=0.1, image/*`), ours.
    listed = [_IMAGE_TYPES[m] for m, _ in ranges if m in _IMAGE_TYPES]
    return next(f for f in (*listed, *rated) if rated[f] == best)


async def output(
    request: Request,
    accept: Annotated[
        str | None,
        Header(
            description="`application/json` for a JSON body with base64 images; `image/png`, `image/jpeg` "
            "or `image/webp` for that encoding (`?format=` wins); anything else: PNG bytes"
        ),
    ] = None,
    fmt: Annotated[
        FormatWord | None,
        Query(
            alias="format",
            description="encoding of the returned image(s): png, jpeg or webp, in any case (default: from "
            "Accept, else png)",
        ),
    ] = None,
) -> Output:
    _given_once("format", request.query_params.getlist("format"))
    return negotiate(accept, fmt)


async def json_only(
    request: Request,
    accept: Annotated[
        str | None,
        Header(description="this route answers `application/json` only: an Accept ruling it out gets 406"),
    ] = None,
) -> None:
    """For a route whose only answer is JSON (/encode): an Accept that rules JSON out (`image/png` alone)
    is refused with 406 naming what the route returns, rather than answered with what was not asked for.
    Judged as the image routes judge it (`accepts_json`)."""
    if not accepts_json(accept):
        raise ApiError(
            406,
            "not_acceptable",
            f"{request.url.path} answers {JSON} only (Accept was {clip(accept or '', 120)!r}); send "
            f"Accept: {JSON}, */*, or no Accept",
        )


def _given_once(name: str, values: list[Any]) -> None:
    # FastAPI keeps the last of `?format=png&format=jpeg` (or of two form fields) without a word, and the
    # client gets an encoding or a frame count it may not expect: refused, like two file parts.
    if len(values) > 1:
        raise ApiError(422, "validation_error", f"'{name}' given {len(values)} times; give it once")


async def single_value(
    request: Request, name: str, form_value: int | None, query_value: int | None
) -> int | None:
    """A parameter taken from the form or the query: the one value given, or None. Given more than once
    (repeated, or in both places) it is refused rather than one of the values silently winning."""
    form = await request.form()  # already parsed by FastAPI for this request: no second read
    in_form = form.getlist(name)
    _given_once(name, [*in_form, *request.query_params.getlist(name)])
    if in_form == [""]:
        # FastAPI takes an empty form field for a missing one (the default, without a word), while an
        # empty `?steps=` is a 422: the same answer for both.
        raise ApiError(422, "validation_error", f"body.{name}: empty; give a value or leave the field out")
    return form_value if form_value is not None else query_value


def form_fields(*required: str, optional: tuple[str, ...] = ()) -> Any:
    """A route dependency for a multipart body of the parts `required` (+ `optional`). It runs before
    FastAPI validates the body, whose words for a part under another name are only "body.file: Field
    required". Any part the route does not take (`-F image=@car.jpg`, `-F format=jpeg`) is refused rather
    than ignored, as unknown JSON fields are. (A body that is no form at all never gets here:
    service.middleware.FormBodyMiddleware refuses it before it is read.)"""
    fields = (*required, *optional)

    async def check(request: Request) -> None:
        form = await request.form()  # already parsed by FastAPI for this request: no second read
        unknown = [name for name in form if name not in fields]
        if not unknown:
            return
        hint = "; format goes in the query string: ?format=jpeg" if "format" in unknown else ""
        message = unknown_fields_message(unknown, fields, hint)
        missing = [f"body.{name}: Field required" for name in required if name not in form]
        code = "missing_field" if missing else "validation_error"
        raise ApiError(422, code, "; ".join([*missing, message]))

    return Depends(check)


async def known_query(request: Request) -> None:
    """Refuses a query parameter the route does not take. FastAPI ignores one without a word, so
    `POST /sample?n=4` answered 16 cars and `?fmt=jpeg` a PNG. For the POST routes only: a GET may carry a
    cache-buster."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    taken, body = _route_inputs(request.app.openapi(), getattr(route, "path", ""), request.method)
    unknown = [name for name in request.query_params if name not in taken]
    if not unknown:
        return
    takes = f"its query parameters are {', '.join(taken)}" if taken else "it takes no query parameters"
    hint = f"; {unknown[0]} goes in the request body" if unknown[0] in body else ""
    raise ApiError(
        422, "validation_error", f"unknown query parameter {first_unknown(unknown)} ({takes}{hint})"
    )


def _route_inputs(schema: dict[str, Any], path: str, method: str) -> tuple[list[str], set[str]]:
    """(the query parameters, the body's fields) of an operation, as /openapi.json declares them: what
    the docs promise is what is accepted."""
    operation = schema.get("paths", {}).get(path, {}).get(method.lower(), {})
    query = [p["name"] for p in operation.get("parameters", ()) if p.get("in") == "query"]
    body: set[str] = set()
    components = schema.get("components", {}).get("schemas", {})
    for content in operation.get("requestBody", {}).get("content", {}).values():
        # An optional body (/sample's) is anyOf [its schema, null].
        for option in [content.get("schema", {}), *content.get("schema", {}).get("anyOf", ())]:
            ref = option.get("$ref", "")
            body.update(components.get(ref.rpartition("/")[2], {}).get("properties", {}) if ref else ())
    return query, body


async def single_upload(request: Request, name: str, upload: UploadFile) -> BinaryIO:
    """The file of the one part called `name` (FastAPI would silently keep one of several). The file is
    handed on unread: the pipeline reads it in its I/O pool, so waiting requests hold no upload bytes."""
    form = await request.form()  # already parsed by FastAPI for this request: no second read
    parts = form.getlist(name)
    if len(parts) > 1:
        raise ApiError(422, "validation_error", f"expected one '{name}' part, got {len(parts)}")
    return upload.file


SettingsDep = Annotated[Settings, Depends(get_settings)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
CallDep = Annotated[CallContext, Depends(get_call_context)]
OutputDep = Annotated[Output, Depends(output)]
