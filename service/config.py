"""The service's whole configuration: one pydantic-settings object read from `CARVAE_*` variables.

Every knob has a default that is safe on a small CPU host; the README's configuration table mirrors this
file. Invalid values stop start-up with one line naming the variable (see `service.__main__`).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from carvae.device import DEVICE_PATTERN, available_cores

MiB = 1024 * 1024

# CARVAE_* variables that belong to the trainer, the compose file or CI, not to the service: a shell or
# .env that sets them for `make run` or `docker compose` is not a typo.
_OTHER_PREFIXES = ("CARVAE_TRAIN_", "CARVAE_CI_")
_OTHER_NAMES = {
    "CARVAE_IMAGE_TAG",
    "CARVAE_PUBLISH_PORT",
    "CARVAE_SERVICE_CPUS",
    "CARVAE_SERVICE_MEMORY",
    "CARVAE_STOP_GRACE_PERIOD",
    "CARVAE_WEB_TEST_URL",
}


class Settings(BaseSettings):
    """Field names are the variable names without the `CARVAE_` prefix (case-insensitive in the env)."""

    # An empty variable means "the default" (a compose file passes every setting as ${CARVAE_X:-}).
    model_config = SettingsConfigDict(
        env_prefix="CARVAE_", extra="ignore", validate_default=True, env_ignore_empty=True
    )

    CHECKPOINT: Path = Field(
        default=Path("runs/default/model.safetensors"), description="model.safetensors to serve"
    )
    HOST: str = Field(default="127.0.0.1", description="interface to bind; 0.0.0.0 inside a container")
    PORT: int = Field(default=8000, ge=1, le=65535, description="TCP port")
    DEVICE: str = Field(default="auto", pattern=DEVICE_PATTERN, description="auto|cpu|cuda|cuda:N|mps")

    # Dynamic batching
    MAX_BATCH_SIZE: int = Field(default=32, ge=1, le=1024, description="images per forward pass, at most")
    MAX_WAIT_MS: float = Field(
        default=5.0, ge=0, le=1000, description="longest wait after the first queued item"
    )
    QUEUE_SIZE: int = Field(
        default=256, ge=1, le=100_000, description="items waiting for the model; beyond: 503"
    )
    MAX_IN_FLIGHT: int | None = Field(
        default=None,
        ge=1,
        description="model requests being handled at once (upload to response); default "
        "QUEUE_SIZE + 2 × MAX_BATCH_SIZE. Beyond it requests get 503 before their body is read",
    )
    REQUEST_TIMEOUT_S: float = Field(
        default=10.0, gt=0, le=3600, description="deadline for a model request; 504"
    )
    BATCHING: bool = Field(
        default=True, description="false: one forward pass per request (benchmark baseline)"
    )

    # Limits on what clients send
    MAX_UPLOAD_BYTES: int = Field(default=10 * MiB, ge=1024, description="largest request body")
    MAX_JSON_BYTES: int = Field(default=1 * MiB, ge=1024, description="largest JSON body (/sample, /decode)")
    MAX_IMAGE_PIXELS: int = Field(
        default=40_000_000, ge=64, description="width × height from the image header"
    )
    BODY_TIMEOUT_S: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="time a request body may take to arrive, from the end of its headers; 408 after "
        "(a stalled upload would otherwise hold its request slot); also how long a client may leave its "
        "answers unread before its connection is cut off",
    )

    HEADER_TIMEOUT_S: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="time a request line and headers may take to arrive, from their first byte; 408 after "
        "(a connection that has sent nothing is closed after KEEP_ALIVE_S): a slow or stalled head would "
        "otherwise hold its connection for as long as the client likes",
    )
    MAX_HEADER_BYTES: int = Field(
        default=64 * 1024,
        ge=1024,
        le=16 * MiB,
        description="largest request line and headers, and largest run of a chunked body's framing "
        "(trailers, chunk extensions); 431 beyond",
    )

    # Resources
    MODEL_WORKERS: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="batches computed at once, each in its own model thread; default: 2 on a CPU with "
        "2+ cores, 1 on a GPU",
    )
    TORCH_THREADS: int | None = Field(
        default=None, ge=1, le=512, description="torch intra-op threads; default: cores / MODEL_WORKERS"
    )
    TORCH_THREADS_ALONE: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="torch intra-op threads for a batch computed while nothing else is (nothing queued, "
        "no other batch in flight): an idle server's lone request, in one thread of its own. Default on "
        "a CPU: as many as keep the process's OpenMP threads within the cores (all cores when the model "
        "threads use one each). At most TORCH_THREADS turns this path off",
    )
    TORCHSCRIPT: bool = Field(
        default=True,
        description="run the model as traced, frozen TorchScript (less Python per pass); false: eager",
    )
    DECODE_MEMORY_MB: int = Field(
        default=512,
        ge=16,
        le=1_000_000,
        description="memory the uploads being decoded may take together (estimated from their headers); "
        "a decode that does not fit waits, one larger than this runs alone. A flat 40 M-pixel PNG is "
        "~0.1 MB on the wire and ~1 GB while it decodes",
    )
    WORKERS_DECODE: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="threads decoding uploads (responses are encoded in the model threads); "
        "default: cores + 1 (2..8)",
    )
    PNG_COMPRESS_LEVEL: int = Field(
        default=1, ge=0, le=9, description="zlib level for PNG responses (1: fast)"
    )

    # Connections and shutdown
    KEEP_ALIVE_S: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="an idle keep-alive connection is closed after this; behind a load balancer set it "
        "above the balancer's idle timeout (e.g. 75 behind a 60 s one), or it reuses closed connections",
    )
    MAX_CONNECTIONS: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="connections open at once, idle keep-alive ones included; one more is answered 503 (with "
        "Retry-After) and closed. Each is a file descriptor: the soft open-file limit is raised to fit "
        "(up to the hard one; a warning when that is too low)",
    )
    SHUTDOWN_DELAY_S: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="after SIGTERM, seconds /readyz answers 503 while requests are still served, before "
        "the port closes: give load balancers and Kubernetes a probe period to stop sending traffic",
    )

    # Security and operations
    API_KEY: SecretStr | None = Field(
        default=None,
        description="when set, the model endpoints and /v1/model require this key "
        "(Authorization: Bearer KEY or X-API-Key: KEY)",
    )
    METRICS_REQUIRE_KEY: bool = Field(default=False, description="put /metrics behind API_KEY too")
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed origins; empty = no CORS headers"
    )
    FORWARDED_ALLOW_IPS: str | None = Field(
        default=None,
        description="comma-separated addresses (or networks, or *) of the proxies whose X-Forwarded-For "
        "and X-Forwarded-Proto are believed; default: uvicorn's, the FORWARDED_ALLOW_IPS variable or "
        "127.0.0.1,::1",
    )
    ROOT_PATH: str = Field(
        default="",
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="the path prefix a reverse proxy serves the service under and strips (e.g. /carvae), "
        "so that /docs and the OpenAPI schema point at URLs that work through it; empty: none",
    )
    LOG_LEVEL: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="log level"
    )
    LOG_FORMAT: Literal["text", "json"] = Field(
        default="text", description="text: one readable line per record; json: one JSON object per line"
    )

    @field_validator("CORS_ORIGINS", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("CORS_ORIGINS", mode="after")
    @classmethod
    def _origins_only(cls, v: list[str]) -> list[str]:
        # The browser's Origin header is scheme://host[:port], compared as a string: an entry with a
        # trailing slash or a path, or without its scheme, would never match and CORS would stay closed
        # with nothing said.
        for origin in v:
            if origin != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+", origin):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port] with no path or trailing slash "
                    "(e.g. https://cars.example or http://localhost:3000), or *"
                )
        return v

    # Words, not names: CARVAE_DEVICE=CPU or LOG_LEVEL=INFO mean what they say (the trainer's --device
    # takes any case too, through carvae.device.pick_device).
    @field_validator("DEVICE", "LOG_LEVEL", "LOG_FORMAT", mode="before")
    @classmethod
    def _lower_case(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("FORWARDED_ALLOW_IPS", mode="after")
    @classmethod
    def _addresses_only(cls, v: str | None) -> str | None:
        # uvicorn keeps an entry that is not an address or network as a literal matched against the peer's
        # address, so a host name ("nginx") or a network with host bits set (10.0.0.1/8) would silently
        # never match, and the proxy's X-Forwarded-Proto would be ignored without a word.
        for entry in (e.strip() for e in (v or "").split(",")):
            if entry in ("", "*"):
                continue
            try:
                ipaddress.ip_network(entry) if "/" in entry else ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (e.g. 172.18.0.2 or 172.18.0.0/16; host "
                    "names are not resolved)"
                ) from None
        return v

    @field_validator("API_KEY", mode="after")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # CARVAE_API_KEY= (empty) in a compose file means "no key", not "the empty key".
        return v if v is not None and v.get_secret_value() else None

    def model_workers(self, device_type: str) -> int:
        if self.MODEL_WORKERS:
            return self.MODEL_WORKERS
        # A GPU runs one pass at a time anyway. On a CPU, two single-threaded passes side by side keep two
        # cores busier than one pass on two threads, whose barriers stall whenever the event loop or a
        # codec thread holds a core (bench/README.md, "Levers").
        return 1 if device_type != "cpu" else min(2, available_cores())

    def torch_threads(self, model_workers: int) -> int:
        return self.TORCH_THREADS or max(1, available_cores() // model_workers)

    def torch_threads_alone(self, device_type: str, model_workers: int) -> int:
        if self.TORCH_THREADS_ALONE:
            return self.TORCH_THREADS_ALONE
        threads = self.torch_threads(model_workers)
        if device_type != "cpu":
            return threads
        # libgomp keeps its workers spinning between a pass's parallel regions only while 1 + all teams'
        # workers <= cores (service.threads); each model thread's team has threads - 1 of them. The rest
        # of that budget is the lone batch's: all cores when the model threads use one thread each.
        return max(1, available_cores() - model_workers * (threads - 1))

    @property
    def decode_workers(self) -> int:
        # PIL releases the GIL while decoding/resizing, so one thread more than the cores keeps them busy
        # while another thread parses; more only adds memory.
        return self.WORKERS_DECODE or min(8, max(2, available_cores() + 1))

    @property
    def shutdown_timeout_s(self) -> float:
        """How long the graceful stop waits for accepted requests: a body may take BODY_TIMEOUT_S to arrive
        and its model work REQUEST_TIMEOUT_S more; a request still running after that is cut off."""
        return self.BODY_TIMEOUT_S + self.REQUEST_TIMEOUT_S + 5.0

    @property
    def max_in_flight(self) -> int:
        return self.MAX_IN_FLIGHT or self.QUEUE_SIZE + 2 * self.MAX_BATCH_SIZE

    @property
    def effective_batch_size(self) -> int:
        return self.MAX_BATCH_SIZE if self.BATCHING else 1

    @property
    def max_wait_s(self) -> float:
        return self.MAX_WAIT_MS / 1000.0 if self.BATCHING else 0.0


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """CARVAE_* variables that are no setting (extra="ignore" drops them quietly): each as a line naming
    it and the closest setting, since CARVAE_MAX_BATCH=64 would otherwise leave the default in force."""
    names = list(Settings.model_fields)
    settings = [f"CARVAE_{name}" for name in names]
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("CARVAE_") or upper in settings or upper in _OTHER_NAMES:
            continue
        if upper.startswith(_OTHER_PREFIXES):
            continue
        # Compared without the prefix, which every name shares and would make anything look close.
        close = difflib.get_close_matches(upper.removeprefix("CARVAE_"), names, n=1, cutoff=0.6)
        lines.append(
            f"{name} is not a setting (ignored)" + (f"; did you mean CARVAE_{close[0]}?" if close else "")
        )
    return lines
