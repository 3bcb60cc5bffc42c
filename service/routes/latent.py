"""Endpoints that start from latent space: /sample (from the prior) and /decode (given latents)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends
from starlette.responses import Response

from service.deps import CallDep, OutputDep, PipelineDep, known_query
from service.routes.common import JSON_BODY_ERROR_TEXT, LATENT_ERRORS, X_SEED, image_responses, to_response
from service.schemas import DecodeRequest, ImagesResponse, SampleRequest, SampleResponse

router = APIRouter(tags=["latent"], dependencies=[Depends(known_query)])


@router.post(
    "/sample",
    summary="New cars drawn from the prior",
    description="`n` images decoded from z ~ N(0, temperature² I): a PNG grid with 8 per row, or JSON with "
    "one image each. The same seed gives the same cars (to within one 8-bit level in a few pixels: the "
    "batch it shares changes float rounding); without one a seed is drawn. Either way the "
    "seed used is in the `X-Seed` header (and in the JSON body). An empty body means all defaults.",
    response_model=SampleResponse,
    responses=image_responses(
        "the grid of samples (default PNG); header X-Seed",
        *LATENT_ERRORS,
        headers={"X-Seed": X_SEED},
        texts=JSON_BODY_ERROR_TEXT,
    ),
)
async def sample(
    pipeline: PipelineDep,
    ctx: CallDep,
    out: OutputDep,
    body: Annotated[SampleRequest | None, Body()] = None,
) -> Response:
    req = body or SampleRequest()
    return to_response(await pipeline.sample(req.n, req.seed, req.temperature, out.fmt, out.as_json, ctx))


@router.post(
    "/decode",
    summary="Decode latent vectors to images",
    description="Each row of `z` (latent_dim finite floats) becomes one image: a PNG grid with 8 per row, "
    "or JSON with one image per row.",
    response_model=ImagesResponse,
    responses=image_responses(
        "the grid of decoded images (default PNG)", *LATENT_ERRORS, texts=JSON_BODY_ERROR_TEXT
    ),
)
async def decode(body: DecodeRequest, pipeline: PipelineDep, ctx: CallDep, out: OutputDep) -> Response:
    return to_response(await pipeline.decode(body.z, out.fmt, out.as_json, ctx))
