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
    "/v1/model", summary="The served model", response_model=ModelResponse, responses=errors(401, 503)
)
async def model_info(model: ModelDep) -> ModelResponse:
    return model.describe()


@router.get("/healthz", summary="Liveness: the process answers", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded and warmed up",
    response_model=ReadyResponse,
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
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "text format"},
        **errors(401),
    },
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
