"""What the routes run, in three stages (the LitServe split): decode → predict → encode.

- decode: upload bytes → the model's (S, S, 3) uint8 view, via `carvae.preprocess.prepare` (the same code
  the trainer uses) — in the I/O thread pool.
- predict: `Predictor`'s handlers take a whole batch of queued payloads and run ONE forward pass for it —
  in the batcher's model thread, under `torch.inference_mode`.
- encode: arrays → PNG/JPEG/WebP bytes or a JSON body — in the same model thread, right after its batch
  (the batcher's per-job `then`): one thread round trip less per request, and while a worker encodes the
  queue fills, so batches grow (+5 % req/s at 32 concurrent clients here, bench/README.md "Levers").

`Pipeline` strings the stages together per endpoint. Nothing here knows about HTTP: routes hand in bytes
and parsed parameters and get back a `Rendered` body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pydantic_core
import torch

from carvae import __version__
from carvae.checkpoint import Checkpoint
from carvae.losses import psnr
from carvae.preprocess import (
    MEDIA_TYPES,
    DecodeLimits,
    FootprintExceeded,
    ImageError,
    PreprocessPolicy,
    encode_image,
    make_grid,
    prepare,
    to_tensor,
    to_uint8,
)
from service.batcher import Abandoned, Batcher, DeadlineExceeded
from service.budget import BUDGETED_ABOVE, CallerGone, MemoryBudget, release_free_memory
from service.inference import InferenceModel
from service.schemas import (
    EncodeResponse,
    ImageFormat,
    ImagesResponse,
    ModelResponse,
    ReconstructResponse,
    SampleResponse,
)

T = TypeVar("T")
# An upload: bytes, or the spooled file the form parser wrote it to. Files are read inside the I/O pool,
# so at most WORKERS_DECODE uploads are in memory as bytes at once, however many requests wait.
Upload = bytes | BinaryIO
JSON = "application/json"
# Image endpoints answer image bytes or JSON by the Accept header: caches must key on it.
NEGOTIATED = {"Vary": "Accept"}
GRID_COLUMNS = 8


@dataclass(frozen=True)
class ServedModel:
    """The loaded checkpoint, where it runs, and how (service.inference)."""

    checkpoint: Checkpoint
    device: torch.device
    inference: InferenceModel

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def policy(self) -> PreprocessPolicy:
        return self.checkpoint.policy

    @property
    def image_size(self) -> int:
        return self.checkpoint.config.image_size

    @property
    def latent_dim(self) -> int:
        return self.checkpoint.config.latent_dim

    def describe(self) -> ModelResponse:
        ck = self.checkpoint
        return ModelResponse(
            model_id=ck.model_id,
            content_hash=ck.content_hash,
            architecture=ck.config.architecture,
            image_size=ck.config.image_size,
            latent_dim=ck.config.latent_dim,
            preprocess=ck.policy.to_dict(),
            training=ck.training,
            device=str(self.device),
            parameters=ck.model.num_parameters(),
            package_version=ck.metadata.get("package_version", __version__),
        )


@dataclass
class Reconstruction:
    image: np.ndarray  # (S, S, 3) uint8
    mu: np.ndarray  # (latent_dim,) float32


@dataclass
class Rendered:
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


# -- predict: runs in the model thread, one call per batch ------------------------------------------------
class Predictor:
    """Batch handlers for the batcher. Each takes the list of queued payloads and returns one result per
    payload; rows of all payloads go through the model in one call."""

    def __init__(self, served: ServedModel) -> None:
        self.model = served.inference

    def handlers(self) -> dict[str, Callable[[list[Any]], Sequence[Any]]]:
        return {"reconstruct": self.reconstruct, "encode": self.encode, "decode": self.decode}

    # inference_mode is thread-local, so it is entered here, in the model thread, not at start-up.
    @torch.inference_mode()
    def reconstruct(self, views: list[np.ndarray]) -> list[Reconstruction]:
        """views: (S, S, 3) uint8 each → reconstruction through μ (VAE.reconstruct) plus μ."""
        out, mu = self.model.reconstruct(to_tensor(np.stack(views)))
        images = to_uint8(out)
        mus = mu.float().cpu().numpy()
        return [Reconstruction(images[i], mus[i]) for i in range(len(views))]

    @torch.inference_mode()
    def encode(self, stacks: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """stacks: (k, S, S, 3) uint8 each → (μ, log σ²), each (k, latent_dim) float32."""
        sizes = [len(s) for s in stacks]
        mu, logvar = self.model.encode(to_tensor(np.concatenate(stacks)))
        mus, logvars = mu.float().cpu().numpy(), logvar.float().cpu().numpy()
        bounds = np.cumsum([0, *sizes])
        return [(mus[a:b], logvars[a:b]) for a, b in itertools.pairwise(bounds)]

    @torch.inference_mode()
    def decode(self, latents: list[torch.Tensor]) -> list[np.ndarray]:
        """latents: (k, latent_dim) float32 each → (k, S, S, 3) uint8 images."""
        images = to_uint8(self.model.decode(torch.cat(latents)))
        bounds = np.cumsum([0, *(len(t) for t in latents)])
        return [images[a:b] for a, b in itertools.pairwise(bounds)]


# -- small pure helpers -----------------------------------------------------------------------------------
def sample_latents(n: int, latent_dim: int, seed: int, temperature: float) -> torch.Tensor:
    """The prior draw of `VAE.sample`, done here so the decode can be batched with other requests:
    CPU generator, same call order, so a seed gives the same cars as `model.sample` on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent_dim, generator=generator) * temperature


def interpolate_latents(mu_a: np.ndarray, mu_b: np.ndarray, steps: int) -> torch.Tensor:
    """`steps` latents evenly spaced on the line from mu_a to mu_b, both ends included."""
    t = torch.linspace(0.0, 1.0, steps).unsqueeze(1)
    a, b = torch.from_numpy(mu_a).unsqueeze(0), torch.from_numpy(mu_b).unsqueeze(0)
    return (1 - t) * a + t * b


class InvalidLatents(ValueError):
    """Latent vectors that do not fit the model (answered 422 validation_error)."""


def latents_tensor(rows: list[list[float]], latent_dim: int) -> torch.Tensor:
    """JSON rows → (k, latent_dim) float32. Values were validated finite and bounded by the schema."""
    for i, row in enumerate(rows):
        if len(row) != latent_dim:
            values = "value" if len(row) == 1 else "values"
            raise InvalidLatents(
                f"body.z[{i}] has {len(row)} {values}; this model's latent_dim is {latent_dim}"
            )
    return torch.tensor(rows, dtype=torch.float32)


def draw_seed() -> int:
    return secrets.randbelow(2**31)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json(model: Any, headers: dict[str, str] | None = None) -> Rendered:
    # pydantic's serializer: fast, and writes non-finite floats (e.g. in training metrics) as null.
    return Rendered(pydantic_core.to_json(model), JSON, dict(headers or {}))


# -- encode: runs in the model thread, as each job's `then` right after its batch ---------------------------
class Encoder:
    def __init__(self, served: ServedModel, png_compress_level: int) -> None:
        self.served = served
        self.png_level = png_compress_level

    def image(self, array: np.ndarray, fmt: ImageFormat) -> bytes:
        return encode_image(array, fmt, png_compress_level=self.png_level)

    def reconstruction(
        self, view: np.ndarray, rec: Reconstruction, fmt: ImageFormat, as_json: bool
    ) -> Rendered:
        image = self.image(rec.image, fmt)
        if not as_json:
            return Rendered(image, MEDIA_TYPES[fmt], dict(NEGOTIATED))
        quality = float(psnr(to_tensor(rec.image), to_tensor(view))[0])
        return _json(
            ReconstructResponse(
                model_id=self.served.model_id,
                image_size=self.served.image_size,
                format=fmt,
                image=_b64(image),
                input=_b64(self.image(view, "png")),
                mu=rec.mu.tolist(),
                psnr=round(quality, 4),
            ),
            NEGOTIATED,
        )

    def latents(self, encoded: tuple[np.ndarray, np.ndarray]) -> Rendered:
        """One image's (μ, log σ²), each (1, latent_dim) as the encode handler returns them → JSON."""
        mu, logvar = encoded
        return _json(
            EncodeResponse(
                model_id=self.served.model_id,
                latent_dim=self.served.latent_dim,
                mu=mu[0].tolist(),
                logvar=logvar[0].tolist(),
            )
        )

    def images(
        self, images: np.ndarray, fmt: ImageFormat, as_json: bool, columns: int, seed: int | None = None
    ) -> Rendered:
        """(k, S, S, 3) → one grid image (`columns` per row), or JSON with one image per row."""
        headers = dict(NEGOTIATED) if seed is None else {**NEGOTIATED, "X-Seed": str(seed)}
        if not as_json:
            grid = make_grid(images, nrow=columns)
            return Rendered(self.image(grid, fmt), MEDIA_TYPES[fmt], headers)
        encoded = [_b64(self.image(img, fmt)) for img in images]
        if seed is None:
            body = ImagesResponse(model_id=self.served.model_id, format=fmt, images=encoded)
        else:
            body = SampleResponse(model_id=self.served.model_id, format=fmt, images=encoded, seed=seed)
        return _json(body, headers)


@dataclass(frozen=True)
class CallContext:
    """Per-request facts the pipeline passes to the batcher: a tag for logs and a way to notice that the
    caller has gone (a fresh awaitable per call)."""

    tag: str | None = None
    cancel_on: Callable[[], Awaitable[Any]] | None = None


class DecodeTimedOut(DeadlineExceeded):
    """An upload got no room in the decode budget before the request's deadline (a 504, as any deadline)."""


@dataclass(frozen=True)
class _Deferred:
    """An upload whose decode waits for the memory budget (service.budget)."""

    data: bytes
    footprint: int


class Pipeline:
    """decode → predict → encode for each endpoint."""

    def __init__(
        self,
        served: ServedModel,
        batcher: Batcher,
        io_pool: Executor,
        limits: DecodeLimits,
        decode_budget: MemoryBudget,
        timeout_s: float,
        png_compress_level: int = 1,
    ) -> None:
        self.served = served
        self.batcher = batcher
        self.io_pool = io_pool
        self.limits = limits
        self.decode_budget = decode_budget
        self.timeout_s = timeout_s
        self.encoder = Encoder(served, png_compress_level)

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def _predict(
        self, op: str, payload: Any, rows: int, ctx: CallContext, then: Callable[[Any], Any] | None = None
    ) -> Any:
        return await self.batcher.submit(
            op, payload, rows=rows, timeout_s=self.timeout_s, tag=ctx.tag, cancel_on=ctx.cancel_on, then=then
        )

    async def _predict_and_encode(
        self, op: str, payload: Any, rows: int, ctx: CallContext, encode: Callable[[Any], Rendered]
    ) -> Rendered:
        rendered: Rendered = await self._predict(op, payload, rows, ctx, then=encode)
        return rendered

    def _prepare(self, source: Upload) -> np.ndarray | _Deferred:
        """In an io thread: the model's view of an upload — or, when its decode would take more memory than
        a photo does, the bytes back to the event loop to wait for the decode budget first."""
        data = source if isinstance(source, bytes) else source.read()
        try:
            return prepare(data, self.served.policy, self.limits, max_footprint=BUDGETED_ABOVE)
        except FootprintExceeded as e:  # raised from the header, before any decoding
            return _Deferred(data, e.footprint)

    def _prepare_budgeted(self, data: bytes) -> np.ndarray:
        try:
            return prepare(data, self.served.policy, self.limits)
        finally:
            release_free_memory()

    async def decode_upload(
        self, source: Upload, field_name: str | None = None, ctx: CallContext | None = None
    ) -> np.ndarray:
        try:
            view = await self._offload(self._prepare, source)
            if isinstance(view, _Deferred):
                view = await self._decode_in_budget(view, ctx)
            return view
        except ImageError as e:
            if field_name is None:
                raise
            raise ImageError(e.code, f"{field_name}: {e.message}", e.status) from None

    async def _decode_in_budget(self, deferred: _Deferred, ctx: CallContext | None) -> np.ndarray:
        cancel_on = ctx.cancel_on if ctx is not None else None
        try:
            async with self.decode_budget.hold(deferred.footprint, self.timeout_s, cancel_on):
                return await self._offload(self._prepare_budgeted, deferred.data)
        except CallerGone:
            raise Abandoned("decode withdrawn: the caller went away while it waited for room") from None
        except TimeoutError:  # the wait for room ran out; counted once per request (_counting_decode_timeout)
            raise DecodeTimedOut(
                f"no room to decode this large image within {self.timeout_s:g} s (others were decoding)"
            ) from None

    @contextlib.contextmanager
    def _counting_decode_timeout(self) -> Iterator[None]:
        """Around a request's decodes: one decode timeout counted for the request, however many of its
        uploads ran out of time (/interpolate's two wait side by side and used to count two for one 504)."""
        try:
            yield
        except DecodeTimedOut:
            self.batcher.observer.timed_out("decode")
            raise

    async def reconstruct(self, data: Upload, fmt: ImageFormat, as_json: bool, ctx: CallContext) -> Rendered:
        with self._counting_decode_timeout():
            view = await self.decode_upload(data, ctx=ctx)
        encode = functools.partial(self.encoder.reconstruction, view, fmt=fmt, as_json=as_json)
        return await self._predict_and_encode("reconstruct", view, 1, ctx, encode)

    async def encode(self, data: Upload, ctx: CallContext) -> Rendered:
        with self._counting_decode_timeout():
            view = await self.decode_upload(data, ctx=ctx)
        return await self._predict_and_encode("encode", view[None], 1, ctx, self.encoder.latents)

    async def sample(
        self, n: int, seed: int | None, temperature: float, fmt: ImageFormat, as_json: bool, ctx: CallContext
    ) -> Rendered:
        seed = draw_seed() if seed is None else seed
        z = sample_latents(n, self.served.latent_dim, seed, temperature)
        encode = functools.partial(
            self.encoder.images, fmt=fmt, as_json=as_json, columns=GRID_COLUMNS, seed=seed
        )
        return await self._predict_and_encode("decode", z, n, ctx, encode)

    async def decode(
        self, rows: list[list[float]], fmt: ImageFormat, as_json: bool, ctx: CallContext
    ) -> Rendered:
        z = await self._offload(latents_tensor, rows, self.served.latent_dim)
        encode = functools.partial(self.encoder.images, fmt=fmt, as_json=as_json, columns=GRID_COLUMNS)
        return await self._predict_and_encode("decode", z, len(z), ctx, encode)

    async def interpolate(
        self, data_a: Upload, data_b: Upload, steps: int, fmt: ImageFormat, as_json: bool, ctx: CallContext
    ) -> Rendered:
        with self._counting_decode_timeout():
            view_a, view_b = await asyncio.gather(
                self.decode_upload(data_a, "file_a", ctx), self.decode_upload(data_b, "file_b", ctx)
            )
        mu, _ = await self._predict("encode", np.stack([view_a, view_b]), 2, ctx)
        z = interpolate_latents(mu[0], mu[1], steps)
        encode = functools.partial(self.encoder.images, fmt=fmt, as_json=as_json, columns=steps)
        return await self._predict_and_encode("decode", z, steps, ctx, encode)

    async def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """One pass per batch size through every op (first calls allocate and pick kernels), plus the
        image codecs, so the first real request is as fast as the rest. A reconstruction runs every op of
        an encoding too (the traced encoder and the standardisation, service.inference), so /encode needs
        no pass of its own; /decode and /sample do (without it their first request took 8-21 ms more)."""
        predictor = Predictor(self.served)
        s = self.served.image_size
        view = np.full((s, s, 3), 127, dtype=np.uint8)
        # The alone thread runs on more torch threads, for which oneDNN builds kernels of their own: it warms
        # up too, at one row, the size it mostly sees (an idle server's lone request).
        alone = [(1, True)] if self.batcher.has_alone_executor else []
        for n, in_alone in [(n, False) for n in sorted(set(batch_sizes))] + alone:
            run = functools.partial(self.batcher.run_in_worker, alone=in_alone)
            await run(predictor.reconstruct, [view] * n)
            await run(predictor.decode, [torch.zeros(n, self.served.latent_dim)])
        png = await self._offload(self.encoder.image, view, "png")
        # Default limits: the warm-up image must pass whatever CARVAE_MAX_IMAGE_PIXELS says.
        await self._offload(prepare, png, self.served.policy)
