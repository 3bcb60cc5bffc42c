"""Dependencies for the routes, as typed `Annotated` aliases (the full-stack-fastapi-template shape).

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
thread round trip per dependency per request that cost the event loop more than the work itself.

The model, batcher and pipeline are created in the lifespan (service.main) and live on `app.state`;
routes receive them from here, never from globals, so tests can build apps with other settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, BinaryIO

from fastapi import Depends, Header, Query, Request, UploadFile
from starlette.types import Receive

from service.batcher import Batcher, Overloaded
from service.config import Settings
from service.errors import ApiError, request_id_of
from service.pipeline import CallContext, Pipeline, ServedModel
from service.schemas import ImageFormat


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None or not request.app.state.ready:
        raise Overloaded("the model is not loaded yet")
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


_IMAGE_TYPES: dict[str, ImageFormat] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def negotiate(accept: str | None, fmt: ImageFormat | None) -> Output:
    """JSON when Accept asks for application/json at least as much as for any image type; the encoding
    from `?format=` when given, else the image type Accept ranks highest (PNG on a tie, for `image/*`,
    `*/*`, no Accept, or only types we do not make)."""
    json_q, image_q = 0.0, -1.0
    ranked: dict[ImageFormat, float] = {}
    for item in (accept or "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == "application/json":
            json_q = max(json_q, q)
        elif media.startswith("image/"):
            image_q = max(image_q, q)
            if media in _IMAGE_TYPES:
                ranked[_IMAGE_TYPES[media]] = max(ranked.get(_IMAGE_TYPES[media], 0.0), q)
    return Output(fmt if fmt is not None else _best_image(ranked), json_q > 0 and json_q >= image_q)


def _best_image(ranked: dict[ImageFormat, float]) -> ImageFormat:
    best = max(ranked.values(), default=0.0)
    if best <= 0 or ranked.get("png") == best:
        return "png"
    return next(f for f, q in ranked.items() if q == best)  # the first listed of the best


async def output(
    accept: Annotated[
        str | None,
        Header(
            description="`application/json` for a JSON body with base64 images; `image/png`, `image/jpeg` "
            "or `image/webp` for that encoding (`?format=` wins); anything else: PNG bytes"
        ),
    ] = None,
    fmt: Annotated[
        ImageFormat | None,
        Query(
            alias="format",
            description="encoding of the returned image(s): png, jpeg or webp (default: from Accept, "
            "else png)",
        ),
    ] = None,
) -> Output:
    return negotiate(accept, fmt)


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
