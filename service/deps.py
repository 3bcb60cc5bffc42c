"""Dependencies for the routes, as typed `Annotated` aliases (the full-stack-fastapi-template shape).

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
thread round trip per dependency per request that cost the event loop more than the work itself.

The model, batcher and pipeline are created in the lifespan (service.main) and live on `app.state`;
routes receive them from here, never from globals, so tests can build apps with other settings.
"""

from __future__ import annotations

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


def prefers_json(accept: str | None) -> bool:
    """True when the Accept header asks for application/json at least as much as for any image type."""
    if not accept:
        return False
    json_q, image_q = 0.0, -1.0
    for item in accept.split(","):
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
    return json_q > 0 and json_q >= image_q


async def wants_json(
    accept: Annotated[
        str | None,
        Header(
            description="`application/json` for a JSON body with base64 images; anything else: image bytes"
        ),
    ] = None,
) -> bool:
    return prefers_json(accept)


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
WantsJSON = Annotated[bool, Depends(wants_json)]
FormatQuery = Annotated[
    ImageFormat,
    Query(alias="format", description="encoding of the returned image(s): png (default), jpeg or webp"),
]
