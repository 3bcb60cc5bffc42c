"""Request and response bodies of the HTTP API (docs/ARCHITECTURE.md, "HTTP API"), with /docs examples."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

ImageFormat = Literal["png", "jpeg", "webp"]


def _a_word(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# `?format=PNG` or ` Jpeg ` is a word, not a name (as CARVAE_DEVICE=CPU is, service.config): taken in any
# case, with spaces around it. The schema still lists the lower-case values, the ones answers carry.
FormatWord = Annotated[ImageFormat, BeforeValidator(_a_word)]

MAX_IMAGES = 64  # per /sample or /decode request: one grid of 8×8
MAX_SEED = 2**53 - 1  # seeds round-trip exactly through JSON numbers in every client (JavaScript included)
MAX_ABS_LATENT = 1000.0  # the prior is N(0, I); larger values only overflow activations
MAX_LATENT_DIM = 4096

_B64_PNG = "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAA..."


def _json_number_only(value: Any) -> Any:
    """JSON Schema's rules, not Python's: 8.0 is an integer, "8" and true are not numbers."""
    if isinstance(value, (str, bytes, bool)):
        raise ValueError("must be a JSON number")
    return value


# An integer as JSON Schema defines it (8 and 8.0 pass; 8.5, "8" and true do not).
JsonInt = Annotated[int, BeforeValidator(_json_number_only)]
# A latent value: a finite JSON number (NaN/Infinity are refused), bounded, strict (no "1.5" strings).
LatentValue = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_LATENT, le=MAX_ABS_LATENT)]


class _ClosedBody(BaseModel):
    """A request body whose unknown fields are refused (with extra="forbid", which also tells the schema)."""

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        # extra="forbid" alone makes one error per unknown key, which FastAPI then describes one by one
        # on the event loop: a 1 MiB body of 110,000 keys held it ~0.4 s. One error names them all.
        if isinstance(data, dict) and not data.keys() <= cls.model_fields.keys():
            raise ValueError(
                unknown_fields_message([k for k in data if k not in cls.model_fields], cls.model_fields)
            )
        return data


def first_unknown(unknown: list[str]) -> str:
    """The first of some unknown names, quoted and clipped (they come from the client), and how many more:
    "'count' and 2 more"."""
    name = unknown[0] if len(unknown[0]) <= 40 else unknown[0][:39] + "…"
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    return f"{name!r}{more}"


def unknown_fields_message(unknown: list[str], fields: Iterable[str], hint: str = "") -> str:
    """One message for all the unknown fields of a body (JSON or multipart), naming the first."""
    return (
        f"unknown field {first_unknown(unknown)} (extra fields are not permitted; "
        f"the fields are {', '.join(fields)}{hint})"
    )


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. corrupt_image")
    message: str = Field(description="what went wrong, for humans")
    request_id: str = Field(description="also in the X-Request-ID header and the service log")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this shape."""

    error: ErrorBody

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "corrupt_image",
                        "message": "the image data is corrupt or truncated (image file is truncated)",
                        "request_id": "6f1c2b9e8a2d4f0e9b7c1a3d5e7f9a1b",
                    }
                }
            ]
        }
    )


class ReconstructResponse(BaseModel):
    model_id: str
    image_size: int = Field(description="side of the square images the model sees and produces, in pixels")
    format: ImageFormat = Field(description="encoding of `image`")
    image: str = Field(description="the reconstruction, base64-encoded in `format`")
    input: str = Field(description="the input as the model saw it after preprocessing, base64 PNG")
    mu: list[float] = Field(description="posterior mean: the image's latent code (latent_dim floats)")
    psnr: float = Field(description="PSNR in dB between `input` and `image` (as 8-bit pixels)")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "carvae-64px-z128-3f2a9c1b7d4e",
                    "image_size": 64,
                    "format": "png",
                    "image": _B64_PNG,
                    "input": _B64_PNG,
                    "mu": [0.12, -1.3, 0.7],
                    "psnr": 24.8,
                }
            ]
        }
    )


class EncodeResponse(BaseModel):
    model_id: str
    latent_dim: int
    mu: list[float] = Field(description="posterior mean μ(x)")
    logvar: list[float] = Field(description="posterior log-variance log σ²(x)")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "carvae-64px-z128-3f2a9c1b7d4e",
                    "latent_dim": 128,
                    "mu": [0.12, -1.3],
                    "logvar": [-4.1, -3.8],
                }
            ]
        }
    )


class SampleRequest(_ClosedBody):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"n": 16, "seed": 42, "temperature": 1.0}]}
    )

    n: JsonInt = Field(default=16, ge=1, le=MAX_IMAGES, description="number of cars")
    # The bounds sit before the validator, inside the optional: anywhere else pydantic writes them into
    # the schema's integer branch as "ge"/"le", which are not JSON Schema, so clients never saw them.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_number_only)] | None = Field(
        default=None, description="same seed, same cars; omitted: drawn and returned"
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        le=5,
        strict=True,
        allow_inf_nan=False,
        description="scales the prior's standard deviation",
    )


class ImagesResponse(BaseModel):
    model_id: str
    format: ImageFormat
    images: list[str] = Field(description="one base64-encoded image per row of the request, in order")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model_id": "carvae-64px-z128-3f2a9c1b7d4e", "format": "png", "images": [_B64_PNG]}]
        }
    )


class SampleResponse(ImagesResponse):
    seed: int = Field(description="the seed used (also in the X-Seed header)")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "carvae-64px-z128-3f2a9c1b7d4e",
                    "seed": 42,
                    "format": "png",
                    "images": [_B64_PNG],
                }
            ]
        }
    )


class DecodeRequest(_ClosedBody):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"z": [[0.0, 0.5, -1.2, 0.3]]}]}
    )

    z: list[Annotated[list[LatentValue], Field(min_length=1, max_length=MAX_LATENT_DIM)]] = Field(
        min_length=1, max_length=MAX_IMAGES, description="latent vectors, each latent_dim finite floats"
    )

    @field_validator("z", mode="before")
    @classmethod
    def _rows_not_one_flat_vector(cls, v: Any) -> Any:
        # One vector sent without the outer list is the likeliest mistake; the generic errors for it
        # ("at most 64 items", "should be a valid list" per number) do not say so.
        if isinstance(v, list) and v and all(type(x) in (int, float) for x in v):
            raise ValueError("z is a list of latent vectors, one list per image: send [[...]], not [...]")
        # pydantic reports every bad value, one error each, and FastAPI then describes each as a dict, on the
        # event loop: a 1 MiB body of 262,144 NaNs or strings took 2-3 s, every other request waiting. The
        # first bad value is reported alone instead (what pydantic would say about lengths still stands).
        if isinstance(v, list) and len(v) <= MAX_IMAGES:
            for i, row in enumerate(v):
                if isinstance(row, list) and len(row) <= MAX_LATENT_DIM and not _all_latent_values(row):
                    # The fast check and _what_is_wrong agree; were they ever not to, pydantic still checks.
                    bad = next(((j, p) for j, x in enumerate(row) if (p := _what_is_wrong(x))), None)
                    if bad is not None:
                        raise ValueError(f"z[{i}][{bad[0]}] {bad[1]}")
        return v


def _all_latent_values(row: list[Any]) -> bool:
    # The plain loop: ~45 ns a value, about what pydantic's own check of a valid row costs.
    for x in row:
        if (type(x) is float or type(x) is int) and -MAX_ABS_LATENT <= x <= MAX_ABS_LATENT:  # NaN fails
            continue
        return False
    return True


def _what_is_wrong(x: Any) -> str | None:
    """Why x is not a LatentValue (bool is not a number), or None."""
    if type(x) is not float and type(x) is not int:
        return "should be a number"
    if isinstance(x, float) and not math.isfinite(x):
        return "should be a finite number"
    if not -MAX_ABS_LATENT <= x <= MAX_ABS_LATENT:
        return f"should be at most {MAX_ABS_LATENT:g} in magnitude"
    return None


class ModelResponse(BaseModel):
    model_id: str
    content_hash: str = Field(description="SHA-256 of the weights, verified at load")
    architecture: str
    image_size: int
    latent_dim: int
    preprocess: dict[str, Any] = Field(description="the preprocessing policy stored in the checkpoint")
    training: dict[str, Any] = Field(description="training facts and metrics stored in the checkpoint")
    device: str
    parameters: int
    package_version: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "carvae-64px-z128-3f2a9c1b7d4e",
                    "content_hash": "3f2a9c1b7d4e…",
                    "architecture": "carvae-resconv-v1",
                    "image_size": 64,
                    "latent_dim": 128,
                    "preprocess": {"image_size": 64, "resize": "stretch", "resample": "bicubic"},
                    "training": {"epochs": 100, "best": {"val_psnr": 24.1}},
                    "device": "cpu",
                    "parameters": 3100000,
                    "package_version": "0.1.0",
                }
            ]
        }
    )


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
