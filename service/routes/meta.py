"""About the service: /v1/model, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.deps import ModelDep
from service.errors import error_response, request_id_of
from service.metrics import CONTENT_TYPE
from service.routes.common import errors
from service.schemas import HealthResponse, ModelResponse, ReadyResponse

router = APIRouter(tags=["meta"])
model_router = APIRouter(tags=["meta"])


@model_router.get(
    "/v1/model",
    summary="The served model",
    description="What is served: the model id and the SHA-256 of its weights, its image and latent sizes, "
    "the preprocessing policy and the training facts and metrics stored in the checkpoint, the device.",
    response_model=ModelResponse,
    response_description="the model card",
    responses=errors(401, 503),
)
async def model_info(model: ModelDep) -> ModelResponse:
    return model.describe()


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    description="200 while the process answers, model or not: for a liveness probe. Never needs a key.",
    response_model=HealthResponse,
    response_description="the process is alive",
)
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded and warmed up",
    description="200 while the service takes model requests; 503 once it is draining after SIGTERM (the "
    "port opens only when the model is ready). For a readiness probe. Never needs a key.",
    response_model=ReadyResponse,
    response_description="ready for model requests",
    responses={503: {"model": errors(503)[503]["model"], "description": "starting up or shutting down"}},
)
async def readyz(request: Request) -> Response:
    state = request.app.state
    if not state.ready or state.draining:
        why = "the service is shutting down" if state.draining else "the model is not loaded and warmed up"
        return error_response(503, "not_ready", why, request_id_of(request.scope))
    return Response(ReadyResponse().model_dump_json(), media_type="application/json")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request, batching and model metrics and the process's, in Prometheus' text format "
    "(README, Metrics).",
    response_class=Response,
    responses={
        # The exact type, version included: a scraper (and a generated client) learns which text format.
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "text format"},
        **errors(401, texts={401: "API key missing or wrong (only when CARVAE_METRICS_REQUIRE_KEY is set)"}),
    },
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
