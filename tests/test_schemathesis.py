"""Schemathesis against the service's own /openapi.json, in-process (ASGI, lifespan included): generated
valid and invalid requests for every operation find no 5xx and no response that breaks the schema
(status code, content type, headers, body), and invalid requests are refused with a 4xx.

Bounded for CI: EXAMPLES per operation and generation mode, derandomized. `positive_data_acceptance` is
left out on the upload endpoints only: schema-valid multipart bodies hold random bytes, which are never a
real image, so they are rightly refused with 415/422. Whether invalid input is refused with a 4xx is
schemathesis' own `negative_data_rejection` check (it knows which generated cases are really invalid:
an unknown query parameter, for one, is not).

(Driven through `operation.as_strategy()` with plain hypothesis: schemathesis' own pytest plugin
(`from_fixture`) does not run under pytest 9.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from service_fixtures import TINY, make_settings, photo_bytes

from service.main import create_app

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.slow

UPLOAD_ROUTES = ("/reconstruct", "/encode", "/interpolate")
EXAMPLES = 50
# The operations, from the app's schema without loading a model (the routes do not depend on it).
OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in create_app(make_settings(Path("unused.safetensors"))).openapi()["paths"].items()
    for method in item
)


@pytest.fixture(scope="module")
def api_schema(service_checkpoint: Path) -> Iterator[Any]:
    # REQUEST_TIMEOUT_S generous: a 504 here would be the CI machine, not the service
    app = create_app(make_settings(service_checkpoint, REQUEST_TIMEOUT_S=60))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)  # runs the app's lifespan


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_conforms_to_its_schema(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    if mode is GenerationMode.NEGATIVE and method == "GET":
        pytest.skip("takes no input: there is no invalid request to make")
    excluded = [positive_data_acceptance] if path in UPLOAD_ROUTES else []
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: Any) -> None:
        response = case.call_and_validate(excluded_checks=excluded)
        statuses.append(response.status_code)

    check()
    assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))


# What the generated cases above never reach: a successful upload (random bytes are never an image), and
# a JSON answer from an image endpoint (this transport sends its own `Accept: */*`, not the generated
# `accept` parameter). Real requests in every negotiated form, each response checked against the schema.
def _photo() -> bytes:
    return photo_bytes(48, 40)


REAL_CALLS: list[tuple[str, str, dict[str, Any], str]] = [
    *(
        ("/reconstruct", fmt, {"file": _photo()}, "multipart/form-data")
        for fmt in ("png", "jpeg", "webp", "json")
    ),
    ("/encode", "json", {"file": _photo()}, "multipart/form-data"),
    *(
        (
            "/interpolate",
            fmt,
            {"file_a": _photo(), "file_b": photo_bytes(seed=1), "steps": 3},
            "multipart/form-data",
        )
        for fmt in ("png", "json")
    ),
    *(("/sample", fmt, {"n": 2, "seed": 3}, "application/json") for fmt in ("webp", "json")),
    *(("/decode", fmt, {"z": [[0.5] * TINY.latent_dim]}, "application/json") for fmt in ("jpeg", "json")),
]


@pytest.mark.parametrize(
    ("path", "fmt", "body", "media_type"), REAL_CALLS, ids=[f"{c[0]} {c[1]}" for c in REAL_CALLS]
)
def test_real_successful_responses_conform(
    api_schema: Any, path: str, fmt: str, body: Any, media_type: str
) -> None:
    case = api_schema[path]["POST"].Case(body=body, media_type=media_type)
    accept = "application/json" if fmt == "json" else f"image/{fmt}"
    response = case.call(headers={"Accept": accept})
    assert response.status_code == 200, response.content[:300]
    assert response.headers["content-type"][0] == accept
    case.validate_response(response)


@pytest.mark.parametrize("path", ["/v1/model", "/healthz", "/readyz", "/metrics"])
def test_real_get_responses_conform(api_schema: Any, path: str) -> None:
    case = api_schema[path]["GET"].Case()
    response = case.call()
    assert response.status_code == 200
    case.validate_response(response)
