"""Shared route pieces: OpenAPI response documentation, auth scheme declaration, Rendered → Response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from carvae.preprocess import DecodeLimits
from service.config import Settings
from service.pipeline import Rendered
from service.schemas import ErrorResponse

_LIMITS = DecodeLimits()
_DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
_ERROR_TEXT = {
    400: "empty file or unreadable body",
    401: "API key missing or wrong (only when CARVAE_API_KEY is set)",
    406: "Accept rules out application/json, the only type this route answers",
    408: "the request body did not arrive within CARVAE_BODY_TIMEOUT_S",
    413: f"body over CARVAE_MAX_UPLOAD_BYTES ({_DEFAULTS['MAX_UPLOAD_BYTES'] // 2**20} MiB by default), or "
    f"image over CARVAE_MAX_IMAGE_PIXELS ({_DEFAULTS['MAX_IMAGE_PIXELS']:,} by default)",
    415: "not an image in a supported format, or a body sent compressed (Content-Encoding): send it "
    "uncompressed",
    422: "invalid parameters, a part the route does not take, corrupt image, image under "
    f"{_LIMITS.min_side} px a side or more elongated than {_LIMITS.max_aspect:g}:1",
    500: "the model failed; the message carries the request id",
    503: "overloaded or not ready (see Retry-After)",
    504: "the request's deadline passed (CARVAE_REQUEST_TIMEOUT_S)",
}
# /sample and /decode take a JSON body, not photos: their 400, 413, 415 and 422 have other causes.
JSON_BODY_ERROR_TEXT = {
    400: "unreadable body",
    413: f"body over CARVAE_MAX_JSON_BYTES ({_DEFAULTS['MAX_JSON_BYTES'] // 2**20} MiB by default)",
    415: "body sent compressed (Content-Encoding): send it uncompressed",
    422: "not JSON, an unknown field, or a value of the wrong type or out of range",
}
PHOTO_RULES = (
    "JPEG, PNG, WebP, BMP, GIF or TIFF (sniffed from the bytes; names and types are ignored), each side at "
    f"least {_LIMITS.min_side} px, at most {_LIMITS.max_aspect:g}:1, at most CARVAE_MAX_IMAGE_PIXELS pixels "
    f"({_DEFAULTS['MAX_IMAGE_PIXELS']:,} by default); the whole body at most CARVAE_MAX_UPLOAD_BYTES "
    f"({_DEFAULTS['MAX_UPLOAD_BYTES'] // 2**20} MiB by default)"
)
_SCHEMAS = "#/components/schemas/"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# Response headers clients act on, in OpenAPI so generated clients expose them (and schema-driven testers
# check them). Not `required`: a 503 written when the server stops (service.middleware) has no Retry-After.
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
X_SEED = {
    "description": "the seed used: send it back as `seed` for the same cars",
    "schema": {"type": "integer", "minimum": 0},
    "required": True,
}
VARY = {"description": "`Accept`: the body depends on it", "schema": {"type": "string"}, "required": True}
REQUEST_ID = {
    "description": "the request's id (the caller's X-Request-ID if short and plain), also in the log",
    "schema": {"type": "string"},
    "required": True,
}


def document_request_id(schema: dict[str, Any]) -> None:
    """Every response carries X-Request-ID (service.middleware.RequestContextMiddleware): say so on each."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID


def close_form_bodies(schema: dict[str, Any]) -> None:
    """Multipart bodies refuse the parts they do not take (service.deps.form_fields): say so, as the JSON
    bodies' schemas do."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = form.get("schema", {}).get("$ref", "")
            if ref.startswith(_SCHEMAS):
                schema["components"]["schemas"][ref.removeprefix(_SCHEMAS)]["additionalProperties"] = False


def errors(*statuses: int, texts: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The error statuses, each with the shared error body and what causes it (`texts` overrides)."""
    text = {**_ERROR_TEXT, **(texts or {})}
    documented: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": text[s]} for s in statuses
    }
    if 503 in documented:
        documented[503]["headers"] = {"Retry-After": RETRY_AFTER}
    return documented


def image_responses(
    description: str,
    *statuses: int,
    headers: dict[str, Any] | None = None,
    texts: Mapping[int, str] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """200 documented as image bytes in each format (plus the route's JSON model) with its headers, and the
    error statuses."""
    ok: dict[str, Any] = {
        "description": description,
        "content": {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY},
        "headers": {"Vary": VARY, **(headers or {})},
    }
    return {200: ok, **errors(*statuses, texts=texts)}


MODEL_ERRORS = (400, 401, 408, 413, 415, 422, 500, 503, 504)
LATENT_ERRORS = (400, 401, 408, 413, 415, 422, 500, 503, 504)


def to_response(rendered: Rendered) -> Response:
    return Response(rendered.body, media_type=rendered.media_type, headers=rendered.headers)


_bearer = HTTPBearer(auto_error=False, description="the CARVAE_API_KEY value")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the CARVAE_API_KEY value")


async def declare_api_key(
    _bearer_token: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _header_key: Annotated[str | None, Security(_api_key)],
) -> None:
    """Puts the two accepted key schemes into OpenAPI. The key is checked earlier, before the body is
    read, by service.middleware.ApiKeyMiddleware; by the time this runs the request is authorised."""
