"""Endpoints that take car photos: /reconstruct, /encode, /interpolate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from starlette.responses import Response

from service.deps import (
    CallDep,
    OutputDep,
    PipelineDep,
    form_fields,
    json_only,
    known_query,
    single_upload,
    single_value,
)
from service.routes.common import MODEL_ERRORS, PHOTO_RULES, errors, image_responses, to_response
from service.schemas import EncodeResponse, ImagesResponse, ReconstructResponse

router = APIRouter(tags=["images"], dependencies=[Depends(known_query)])

# The file parts each route's multipart body must have: its dependency refuses any other part (but
# `steps`), and service.middleware.FormBodyMiddleware a body that is no form, before FastAPI parses it.
FILE_PARTS = {"/reconstruct": ("file",), "/encode": ("file",), "/interpolate": ("file_a", "file_b")}
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 2, 32, 8
STEPS = (
    f"number of frames, {MIN_STEPS} to {MAX_STEPS} (default {DEFAULT_STEPS}): a form field or a query "
    "parameter, not both"
)


@router.post(
    "/reconstruct",
    summary="Reconstruct a car photo through the VAE",
    description="The model's reconstruction of the photo (through the posterior mean), at the model's size. "
    "`Accept: application/json` returns the reconstruction, the input as the model saw it, μ and the PSNR.",
    response_model=ReconstructResponse,
    responses=image_responses("the reconstruction (default PNG)", *MODEL_ERRORS),
    dependencies=[form_fields(*FILE_PARTS["/reconstruct"])],
)
async def reconstruct(
    request: Request,
    file: Annotated[UploadFile, File(description=f"a car photo: {PHOTO_RULES}")],
    pipeline: PipelineDep,
    ctx: CallDep,
    out: OutputDep,
) -> Response:
    data = await single_upload(request, "file", file)
    return to_response(await pipeline.reconstruct(data, out.fmt, out.as_json, ctx))


@router.post(
    "/encode",
    summary="Encode a car photo to its latent distribution",
    description="The posterior q(z|x) of the photo as the model sees it (the same preprocessing as "
    "/reconstruct): its mean μ and log-variance log σ², latent_dim floats each. Always JSON: an Accept "
    "that rules JSON out (`image/png` alone) is answered 406.",
    response_model=EncodeResponse,
    response_description="the posterior's mean and log-variance",
    responses=errors(*sorted({*MODEL_ERRORS, 406})),
    dependencies=[form_fields(*FILE_PARTS["/encode"]), Depends(json_only)],
)
async def encode(
    request: Request,
    file: Annotated[UploadFile, File(description=f"a car photo: {PHOTO_RULES}")],
    pipeline: PipelineDep,
    ctx: CallDep,
) -> Response:
    data = await single_upload(request, "file", file)
    return to_response(await pipeline.encode(data, ctx))


@router.post(
    "/interpolate",
    summary="Frames between two cars in latent space",
    description="Encodes both photos and decodes `steps` latents evenly spaced between their means, both "
    "ends included: one PNG strip (one row), or JSON with one image per frame.",
    response_model=ImagesResponse,
    responses=image_responses("the frames as one strip (default PNG)", *MODEL_ERRORS),
    dependencies=[form_fields(*FILE_PARTS["/interpolate"], optional=("steps",))],
)
async def interpolate(
    request: Request,
    file_a: Annotated[UploadFile, File(description=f"the first car photo: {PHOTO_RULES}")],
    file_b: Annotated[UploadFile, File(description=f"the second car photo: {PHOTO_RULES}")],
    pipeline: PipelineDep,
    ctx: CallDep,
    out: OutputDep,
    steps: Annotated[int | None, Form(ge=MIN_STEPS, le=MAX_STEPS, description=STEPS)] = None,
    steps_query: Annotated[
        int | None, Query(alias="steps", ge=MIN_STEPS, le=MAX_STEPS, description=STEPS)
    ] = None,
) -> Response:
    data_a = await single_upload(request, "file_a", file_a)
    data_b = await single_upload(request, "file_b", file_b)
    given = await single_value(request, "steps", steps, steps_query)
    n = DEFAULT_STEPS if given is None else given
    return to_response(await pipeline.interpolate(data_a, data_b, n, out.fmt, out.as_json, ctx))
