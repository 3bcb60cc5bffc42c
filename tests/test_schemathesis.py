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
from service_fixtures import make_settings

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
