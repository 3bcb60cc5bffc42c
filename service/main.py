"""`create_app(settings)`: the FastAPI app, its lifespan (load → warm up → ready) and its middleware.

The model is loaded in the lifespan, not at import, so importing the app (tests, tools, OpenAPI export)
costs nothing. `python -m service` loads the checkpoint first and passes it in, so that a bad checkpoint
or device is reported as one line before the server starts (service.__main__).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.routing import Mount

from carvae import __version__
from carvae.checkpoint import Checkpoint, load_checkpoint
from carvae.device import describe, pick_device
from carvae.preprocess import DecodeLimits
from service.batcher import Batcher
from service.budget import MemoryBudget
from service.config import Settings
from service.docs import ASSETS_PATH, DOCS_PATH, OAUTH2_REDIRECT_PATH, mount_docs
from service.errors import install_error_handlers
from service.headers import ResponseHeaders
from service.inference import InferenceModel
from service.metrics import Metrics
from service.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    ContentEncodingMiddleware,
    FormBodyMiddleware,
    HeadAsGetMiddleware,
    RequestContextMiddleware,
    TrailingSlashMiddleware,
)
from service.pipeline import Pipeline, Predictor, ServedModel
from service.routes import images, latent, meta
from service.routes.common import close_form_bodies, declare_api_key, document_request_id
from service.threads import gil_switch_interval, model_threads, use_one_thread

log = logging.getLogger("carvae.service")

STATIC_DIR = Path(__file__).parent / "static"
MODEL_PATHS = ("/reconstruct", "/encode", "/interpolate", "/sample", "/decode")
JSON_PATHS = ("/sample", "/decode")
# Open even when CARVAE_API_KEY is set: probes, the page and the API description.
OPEN_PATHS = (
    "/",
    "/healthz",
    "/readyz",
    "/docs",
    "/docs/oauth2-redirect",
    "/openapi.json",
    "/favicon.ico",
)
# Logged at debug when they succeed: probes and scrapes (service.middleware).
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
# The web page and the docs, with their files: revalidated by browsers (Cache-Control: no-cache), while
# every API response is no-store; the web page has its own Content-Security-Policy, the docs pages make
# theirs (service.headers).
PAGE_PATHS = ("/", "/docs", "/docs/oauth2-redirect")
PAGE_PREFIXES = ("/static/", f"{ASSETS_PATH}/")
OPEN_PREFIXES = PAGE_PREFIXES
RESPONSE_HEADERS = ResponseHeaders(
    cached_paths=PAGE_PATHS,
    cached_prefixes=PAGE_PREFIXES,
    page_paths=("/",),
    page_prefixes=("/static/",),
    own_policy_paths=(DOCS_PATH, OAUTH2_REDIRECT_PATH),
)
WARM_UP_BATCH = 4

DESCRIPTION = """A Variational AutoEncoder for car images.

Send a car photo to `/reconstruct` and get the model's reconstruction back; `/encode` gives its latent
distribution, `/interpolate` morphs between two photos, `/sample` draws new cars and `/decode` renders
latent vectors. Image endpoints answer image bytes by default and JSON with base64 images under
`Accept: application/json`. Errors are always `{"error": {"code", "message", "request_id"}}`.
"""


def _warn_if_unfinished(checkpoint: Checkpoint, path: Path) -> None:
    """The trainer saves its best epoch so far while it runs (`complete` false): serving that is allowed
    (a look at a run in progress), but it is not the run's model, and its samples come from N(0, I)
    rather than the prior fitted at the end — mostly car-coloured noise (README, "Prior for sampling")."""
    run = checkpoint.run_status()
    if run["complete"] is not False:
        return
    planned = run["epochs_planned"]
    log.warning(
        "%s is from a training run that did not finish (weights of epoch %s%s: killed or still training): "
        "not the run's final model, and /sample draws from N(0, I), not the fitted prior",
        path,
        run["epochs_done"],
        f" of {planned} planned" if planned else "",
    )


async def _start(app: FastAPI, settings: Settings, metrics: Metrics, checkpoint: Checkpoint | None) -> None:
    started = time.perf_counter()
    if checkpoint is None:
        device = pick_device(settings.DEVICE)
    else:
        device = next(checkpoint.model.parameters()).device
    workers = settings.model_workers(device.type)
    threads = settings.torch_threads(workers)
    use_one_thread()  # every thread but the model threads: loading, tracing, decoding (service.threads)
    if checkpoint is None:
        checkpoint = await asyncio.to_thread(load_checkpoint, settings.CHECKPOINT, device)
    _warn_if_unfinished(checkpoint, settings.CHECKPOINT)
    inference = await asyncio.to_thread(
        InferenceModel, checkpoint.model, checkpoint.config, device, settings.TORCHSCRIPT
    )
    served = ServedModel(checkpoint, device, inference)
    executor = model_threads(workers, threads, "carvae-model")
    # One more thread runs a batch that has the machine to itself, on more threads (service.batcher).
    alone_threads = settings.torch_threads_alone(device.type, workers)
    alone = model_threads(1, alone_threads, "carvae-model-alone") if alone_threads > threads else None
    batcher = Batcher(
        Predictor(served).handlers(),
        max_batch_size=settings.effective_batch_size,
        max_wait_s=settings.max_wait_s,
        queue_size=settings.QUEUE_SIZE,
        default_timeout_s=settings.REQUEST_TIMEOUT_S,
        observer=metrics,
        workers=workers,
        executor=executor,
        alone_executor=alone,
    )
    await batcher.start()
    io_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="carvae-io")
    pipeline = Pipeline(
        served,
        batcher,
        io_pool,
        DecodeLimits(max_pixels=settings.MAX_IMAGE_PIXELS),
        MemoryBudget(settings.DECODE_MEMORY_MB * 2**20),
        settings.REQUEST_TIMEOUT_S,
        settings.PNG_COMPRESS_LEVEL,
    )
    # A batched pass (not the full 32 rows): on this CPU a first pass at 32 rows costs ~40 ms more than
    # later ones, while warming up at 32 cost 0.4 s of a start-up that must stay under 3 s.
    await pipeline.warm_up((1, min(WARM_UP_BATCH, settings.effective_batch_size)))
    # Everything loaded so far (torch, FastAPI, the model: ~2·10^5 objects) lives as long as the process.
    # Freezing it keeps the cyclic GC's full collections from walking it all, under the GIL, every few
    # seconds under load: they were the slowest 1 % of requests (bench/README.md, "Levers").
    # `python -m service` starts with the collector off (service.__main__) and turns it on here, the
    # sequence Python's gc.freeze documents. No collection first: it took 0.13 s of start-up to free
    # ~7,000 objects of import-time garbage (0.8 MB), which the freeze now keeps instead.
    gc.freeze()
    gc.enable()
    app.state.pipeline = pipeline
    app.state.io_pool = io_pool
    metrics.set_model(served.model_id, str(served.device), served.image_size, served.latent_dim)
    metrics.ready.set(1)
    app.state.ready = True
    log.info(
        "ready: model %s on %s (%s), %d parameters, batch ≤ %d, wait ≤ %g ms, %d model worker(s) × %d "
        "torch thread(s) (a batch alone: %d), %d io threads (%.0f ms)",
        served.model_id,
        describe(served.device),
        "TorchScript" if inference.traced else "eager",
        checkpoint.model.num_parameters(),
        settings.effective_batch_size,
        settings.max_wait_s * 1000,
        workers,
        threads,
        max(alone_threads, threads),
        settings.decode_workers,
        (time.perf_counter() - started) * 1000,
    )


def begin_drain(app: FastAPI) -> None:
    """The server is stopping: /readyz answers 503 and carvae_ready is 0 from now on, so load balancers
    take this instance out, while accepted and new requests are still served (service.server)."""
    app.state.draining = True
    app.state.metrics.ready.set(0)


async def _stop(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    app.state.ready = False
    metrics.ready.set(0)
    gc.unfreeze()  # an app stopped inside a longer-lived process (tests, tools) can be collected again
    pipeline: Pipeline | None = app.state.pipeline
    if pipeline is not None:
        # The server has already finished its in-flight requests; this drains anything still queued.
        await pipeline.batcher.stop(drain_timeout_s=settings.REQUEST_TIMEOUT_S)
        app.state.io_pool.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")


def _mount_static(app: FastAPI) -> None:
    if not STATIC_DIR.is_dir():
        return
    files = StaticFiles(directory=STATIC_DIR)

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        # Through StaticFiles, as its assets are: a browser revalidating the page gets a 304 (a bare
        # FileResponse sends the ETag but ignores If-None-Match); a missing file is its 404.
        return await files.get_response("index.html", request.scope)

    app.mount("/static", files, name="static")


def _openapi_fitted_to_the_model(app: FastAPI) -> None:
    """/openapi.json states the loaded model's latent size (z rows of exactly latent_dim values), so
    clients and schema-driven testers know what a valid /decode body is. Cached once the model is loaded."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        document_request_id(schema)
        close_form_bodies(schema)
        pipeline: Pipeline | None = app.state.pipeline
        if pipeline is None:
            app.openapi_schema = None  # not loaded yet: don't cache a schema without the sizes
            return schema
        d = pipeline.served.latent_dim
        decode = schema["components"]["schemas"]["DecodeRequest"]
        decode["properties"]["z"]["items"].update(minItems=d, maxItems=d)
        decode["properties"]["z"]["description"] = f"latent vectors of this model: {d} finite floats each"
        decode["examples"] = [{"z": [[0.0] * d]}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise


def create_app(settings: Settings | None = None, *, checkpoint: Checkpoint | None = None) -> FastAPI:
    """Build the app. `checkpoint`, if given, is served as is; otherwise the lifespan loads
    `settings.CHECKPOINT` onto `settings.DEVICE`."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with gil_switch_interval():
            await _start(app, settings, metrics, checkpoint)
            try:
                yield
            finally:
                await _stop(app, settings, metrics)

    # FastAPI's own /docs and /redoc pages load their scripts from CDNs; service.docs serves /docs offline.
    app = FastAPI(
        title="carvae",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False  # the model can take requests
    app.state.draining = False  # stopping: readiness says no, requests are still served
    app.state.pipeline = None
    install_error_handlers(app)

    auth = [Depends(declare_api_key)] if settings.API_KEY else []
    protected = (images.router, latent.router, meta.model_router)
    for router in protected:
        app.include_router(router, dependencies=auth)
    app.include_router(meta.router)
    _mount_static(app)
    mount_docs(app)
    _openapi_fitted_to_the_model(app)

    # add_middleware wraps: the last added runs first. Order, outermost first: a trailing slash dropped,
    # request id + log + metrics, HEAD as GET, CORS (answers preflights without a key), API key, content
    # codings, form bodies, body limits, admission.
    def model_queue_is_full() -> bool:
        pipeline: Pipeline | None = app.state.pipeline
        return pipeline is not None and pipeline.batcher.depth() >= settings.QUEUE_SIZE

    app.add_middleware(
        AdmissionMiddleware,
        paths=MODEL_PATHS,
        max_in_flight=settings.max_in_flight,
        metrics=metrics,
        queue_is_full=model_queue_is_full,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.MAX_UPLOAD_BYTES,
        limits=dict.fromkeys(JSON_PATHS, settings.MAX_JSON_BYTES),
        timeout_s=settings.BODY_TIMEOUT_S,
    )
    app.add_middleware(FormBodyMiddleware, file_parts=images.FILE_PARTS)
    app.add_middleware(ContentEncodingMiddleware, paths=MODEL_PATHS)
    if settings.API_KEY is not None:
        open_paths = OPEN_PATHS if settings.METRICS_REQUIRE_KEY else (*OPEN_PATHS, "/metrics")
        app.add_middleware(
            ApiKeyMiddleware,
            key=settings.API_KEY.get_secret_value(),
            open_paths=open_paths,
            open_prefixes=OPEN_PREFIXES,
        )
    if settings.CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "Retry-After"],
        )
    routes = [*app.routes, *(r for router in (*protected, meta.router) for r in router.routes)]
    known_paths = {path for route in routes if isinstance(path := getattr(route, "path", None), str)}
    get_paths = {
        path
        for route in routes
        if "GET" in (getattr(route, "methods", None) or ())
        and isinstance(path := getattr(route, "path", None), str)
    }
    mounts = {route.path for route in app.routes if isinstance(route, Mount)}
    app.add_middleware(HeadAsGetMiddleware, paths=get_paths)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        known_paths=known_paths,
        quiet_paths=QUIET_PATHS,
        draining=lambda: bool(app.state.draining),
        mounts=mounts,
        headers=RESPONSE_HEADERS,
    )
    # Not the mounts: "/static/" is the folder, and without its slash Starlette redirects back to it.
    app.add_middleware(TrailingSlashMiddleware, paths=known_paths - mounts)
    return app
