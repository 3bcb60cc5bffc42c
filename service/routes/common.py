"""Shared route pieces: OpenAPI response documentation, auth scheme declaration, Rendered → Response."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from service.pipeline import Rendered
from service.schemas import ErrorResponse

_ERROR_TEXT = {
    400: "empty file or unreadable body",
    401: "API key missing or wrong (only when CARVAE_API_KEY is set)",
    408: "the request body did not arrive within CARVAE_BODY_TIMEOUT_S",
    413: "body over CARVAE_MAX_UPLOAD_BYTES, or image over CARVAE_MAX_IMAGE_PIXELS",
    415: "not an image in a supported format",
    422: "invalid parameters, corrupt image, image too small or too elongated",
    500: "the model failed; the message carries the request id",
    503: "overloaded or not ready (see Retry-After)",
    504: "the request's deadline passed (CARVAE_REQUEST_TIMEOUT_S)",
}
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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    documented: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses
    }
    if 503 in documented:
        documented[503]["headers"] = {"Retry-After": RETRY_AFTER}
    return documented


def image_responses(
    description: str, *statuses: int, headers: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """200 documented as image bytes in each format (plus the route's JSON model) with its headers, and the
    error statuses."""
    ok: dict[str, Any] = {
        "description": description,
        "content": {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY},
        "headers": {"Vary": VARY, **(headers or {})},
    }
    return {200: ok, **errors(*statuses)}


MODEL_ERRORS = (400, 401, 408, 413, 415, 422, 500, 503, 504)
LATENT_ERRORS = (400, 401, 408, 413, 422, 500, 503, 504)


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
