"""Security: the optional API key (both headers, constant-time, before the body, never logged), open
probes, /metrics behind the key on request, CORS closed unless configured, no user-controlled file paths,
/docs without any CDN, and the static security lint (ruff's S rules) clean with a reason on every
suppression."""

from __future__ import annotations

import hmac
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hostile_support import assert_error
from service_fixtures import ROOT, TINY, ServerProcess, asgi_post, make_settings, photo_bytes

import service.middleware
from service.main import create_app

pytest_plugins = ["service_fixtures"]

KEY = "k3y-Th1s-Must-Never-Leak-0123456789"
PNG = photo_bytes()
MODEL_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/reconstruct", {"files": {"file": ("c.png", PNG, "image/png")}}),
    ("POST", "/encode", {"files": {"file": ("c.png", PNG, "image/png")}}),
    (
        "POST",
        "/interpolate",
        {"files": {"file_a": ("a.png", PNG, "image/png"), "file_b": ("b.png", PNG, "image/png")}},
    ),
    ("POST", "/sample", {"json": {"n": 1, "seed": 1}}),
    ("POST", "/decode", {"json": {"z": [[0.0] * TINY.latent_dim]}}),
    ("GET", "/v1/model", {}),
]


@pytest.fixture(scope="module")
def keyed(service_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(make_settings(service_checkpoint, API_KEY=KEY)), raise_server_exceptions=False
    ) as c:
        yield c


# -- the API key ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "kwargs"), MODEL_CALLS, ids=[c[1] for c in MODEL_CALLS])
def test_every_model_endpoint_requires_the_key(
    keyed: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    r = keyed.request(method, path, **kwargs)
    err = assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text and "X-API-Key" in err["message"]
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        assert keyed.request(method, path, headers=headers, **kwargs).status_code == 200, headers


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"bearer {KEY}"}, 200),  # the scheme is case-insensitive (RFC 7235)
        ({"Authorization": f"Bearer  {KEY} "}, 200),
        ({"X-API-Key": "wrong", "Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": KEY}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"X-API-Key": ""}, 401),
        ({"X-API-Key": KEY[:-1]}, 401),
        ({"X-API-Key": KEY + "x"}, 401),
        ({"X-API-Key": KEY.upper()}, 401),
        ({"Cookie": f"api_key={KEY}"}, 401),
    ],
)
def test_which_credentials_count(keyed: TestClient, headers: dict[str, str], status: int) -> None:
    r = keyed.post("/sample", json={"n": 1}, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert_error(r, 401, "unauthorized")


def test_the_key_is_compared_in_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.middleware.hmac, "compare_digest", spy)
    r = keyed.post(
        "/sample", json={"n": 1}, headers={"X-API-Key": "nope", "Authorization": "Bearer also-nope"}
    )
    assert r.status_code == 401
    # every candidate goes through compare_digest, even after the first one failed
    assert sorted(calls) == sorted([(b"nope", KEY.encode()), (b"also-nope", KEY.encode())])


def test_the_key_is_checked_before_the_body_is_read(service_checkpoint: Path) -> None:
    """At the ASGI level: a request without the key is answered 401 without one receive() call."""
    app = create_app(make_settings(service_checkpoint, API_KEY=KEY))  # lifespan not even started
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"999999999")]
    sent, reads = asgi_post(app, "/reconstruct", headers, b"x" * 1_000_000, more_body=True)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 401
    assert reads == 0


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/docs", "/openapi.json", "/docs/assets/swagger-ui.css", "/"]
)
def test_probes_docs_and_page_stay_open(keyed: TestClient, path: str) -> None:
    if path == "/" and keyed.get("/").status_code == 404:
        pytest.skip("no web page in this checkout")
    assert keyed.get(path).status_code == 200


@pytest.mark.parametrize("require", [True, False])
def test_metrics_behind_the_key_only_when_configured(service_checkpoint: Path, require: bool) -> None:
    settings = make_settings(service_checkpoint, API_KEY=KEY, METRICS_REQUIRE_KEY=require)
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == (401 if require else 200)
        assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_the_key_appears_in_no_log_and_no_response(
    keyed: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []

    def record(r: httpx.Response) -> None:
        bodies.append(
            r.text if r.headers.get("content-type", "").startswith(("application/json", "text")) else ""
        )
        bodies.append(json.dumps(dict(r.headers)))

    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"X-API-Key": KEY + "-wrong"}):
        for method, path, kwargs in MODEL_CALLS:
            record(keyed.request(method, path, headers=headers, **kwargs))
        record(keyed.post("/reconstruct", files={"file": ("c.png", b"junk", "image/png")}, headers=headers))
        record(keyed.post("/decode", json={"z": "bad"}, headers=headers))
    batcher = keyed.app.state.pipeline.batcher  # type: ignore[attr-defined]

    def broken(_: list[Any]) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setitem(batcher.handlers, "encode", broken)  # a logged 500 with its traceback
    r = keyed.post("/encode", files={"file": ("c.png", PNG, "image/png")}, headers={"X-API-Key": KEY})
    assert r.status_code == 500
    record(r)
    for path in ("/metrics", "/openapi.json", "/docs"):
        record(keyed.get(path, headers={"X-API-Key": KEY}))
    assert caplog.records, "nothing was logged: the check would be empty"
    assert KEY not in caplog.text
    assert not [b for b in bodies if KEY in b]
    assert KEY not in repr(keyed.app.state.settings) and KEY not in str(keyed.app.state.settings)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_real_server_at_debug_level_never_logs_the_key(service_checkpoint: Path) -> None:
    srv = ServerProcess(
        CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, API_KEY=KEY, LOG_LEVEL="debug"
    )
    try:
        srv.wait_ready()
        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"X-API-Key": KEY},
            {"X-API-Key": "wrong-" + KEY},
        ):
            httpx.post(srv.url + "/sample", json={"n": 1}, headers=headers)
            httpx.post(srv.url + "/encode", files={"file": ("c.png", b"junk")}, headers=headers)
    finally:
        srv.stop()
    log = srv.output()
    assert "request_id=" in log  # debug and info lines were written
    assert KEY not in log


# -- CORS --------------------------------------------------------------------------------------------
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}


def _cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def test_cors_is_closed_by_default(service_checkpoint: Path) -> None:
    with TestClient(create_app(make_settings(service_checkpoint))) as client:
        pre = client.options("/reconstruct", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert pre.status_code == 405 and not _cors_headers(pre)
        r = client.post("/sample", json={"n": 1}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and not _cors_headers(r)


def test_cors_opens_only_for_configured_origins(service_checkpoint: Path) -> None:
    settings = make_settings(service_checkpoint, CORS_ORIGINS=["https://cars.example"], API_KEY=KEY)
    with TestClient(create_app(settings)) as client:
        pre = client.options("/reconstruct", headers={"Origin": "https://cars.example", **PREFLIGHT})
        assert pre.status_code == 200  # answered before the key check: browsers send no key on preflight
        cors = _cors_headers(pre)
        assert cors["access-control-allow-origin"] == "https://cars.example"
        assert "POST" in cors["access-control-allow-methods"]
        assert "x-api-key" in cors["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in cors  # no cookies: the key is a header
        bad = client.options("/reconstruct", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in _cors_headers(bad)
        ok = client.post(
            "/sample", json={"n": 1}, headers={"Origin": "https://cars.example", "X-API-Key": KEY}
        )
        assert ok.headers["access-control-allow-origin"] == "https://cars.example"
        assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()


# -- no user-controlled file paths -------------------------------------------------------------------
def test_no_route_takes_a_path_or_free_text(service_checkpoint: Path) -> None:
    """Every parameter is an upload, a JSON body of numbers, an enum or an integer: nothing a client
    sends can name a file."""
    with TestClient(create_app(make_settings(service_checkpoint))) as client:
        spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        assert "{" not in path, path
        for op in item.values():
            for param in op.get("parameters", []):
                if param["in"] == "header":  # Accept, and the key headers: never used as names
                    continue
                schema = param["schema"]
                options = schema.get("anyOf", [schema])
                assert all("enum" in o or o.get("type") in ("integer", "null") for o in options), (
                    path,
                    param,
                )


@pytest.mark.parametrize(
    "path",
    [
        "/static/../service/config.py",
        "/static/%2e%2e/service/config.py",
        "/static/..%2fservice%2fconfig.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static//etc/passwd",
        "/static/%00index.html",
        "/docs/assets/%2e%2e/%2e%2e/service/main.py",
        "/docs/assets/..%2f..%2fservice%2fmain.py",
        "/%2e%2e/pyproject.toml",
    ],
)
def test_static_files_cannot_be_escaped(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "import" not in r.text and "[project]" not in r.text and "root:" not in r.text


@pytest.mark.parametrize(
    "filename", ["../../../../tmp/carvae-owned.png", "/etc/passwd", "C:\\x\\..\\y.png", "a\rb"]
)
def test_upload_file_names_are_ignored(client: TestClient, filename: str) -> None:
    reference = client.post("/reconstruct", files={"file": ("car.png", PNG, "image/png")})
    r = client.post("/reconstruct", files={"file": (filename, PNG, "image/png")})
    assert r.status_code == 200 and r.content == reference.content
    assert not Path("/tmp/carvae-owned.png").exists()


# -- /docs without the internet ------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


def test_docs_page_loads_nothing_from_another_host(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"https?:|//[a-z]", html, re.IGNORECASE), "an absolute URL in /docs"
    refs = _refs(html)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(refs)
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200, ref
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "SwaggerUIBundle" in js.text and len(js.content) > 500_000
    assert '"validatorUrl": null' in html  # Swagger UI would otherwise post the spec to swagger.io
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert_error(client.get("/redoc"), 404, "not_found")  # ReDoc only exists as a CDN script: off


def test_docs_follow_a_path_prefix(service_checkpoint: Path) -> None:
    with TestClient(create_app(make_settings(service_checkpoint)), root_path="/carvae") as client:
        html = client.get("/docs").text
    assert "/carvae/docs/assets/swagger-ui-bundle.js" in _refs(html)
    assert "'/carvae/openapi.json'" in html


@pytest.mark.slow
@pytest.mark.browser
def test_docs_render_in_a_browser_without_network(service_checkpoint: Path, tmp_path: Path) -> None:
    """Headless chromium: Swagger UI draws every operation, and every file it loaded came from us."""
    from browser import make_driver, require_chromium

    chromium, driver_path = require_chromium()
    srv = ServerProcess(CHECKPOINT=service_checkpoint, DEVICE="cpu", TORCH_THREADS=1, LOG_LEVEL="warning")
    try:
        srv.wait_ready()
        driver = make_driver(chromium, driver_path, tmp_path / "profile")
        try:
            driver.get(srv.url + "/docs")
            end = time.monotonic() + 30
            while time.monotonic() < end:
                ops = driver.find_elements("css selector", ".opblock-summary-path")
                if len(ops) >= 5:
                    break
                time.sleep(0.25)
            paths = {op.text.strip() for op in ops}
            assert {"/reconstruct", "/encode", "/sample", "/decode", "/interpolate"} <= paths, paths
            loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert loaded and all(u.startswith(srv.url + "/") for u in loaded), loaded
        finally:
            driver.quit()
    finally:
        srv.stop()


# -- the static security lint ---------------------------------------------------------------------------
@pytest.fixture
def client(service_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(service_checkpoint)), raise_server_exceptions=False) as c:
        yield c


def _ruff() -> str:
    venv = Path(sys.executable).parent / "ruff"
    found = str(venv) if venv.exists() else shutil.which("ruff")
    if not found:
        pytest.skip("ruff is not installed")
    return found


def test_ruff_security_rules_are_clean() -> None:
    proc = subprocess.run(
        [_ruff(), "check", "--select", "S", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


NOQA_S = re.compile(r"#\s*noqa:\s*((?:[A-Z]+\d+[,\s]*)+)(.*)$")


def _tracked_python_files() -> list[Path]:
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        out = subprocess.run(
            [git, "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True, text=True
        )
        if out.returncode == 0:
            return [ROOT / p for p in out.stdout.split() if (ROOT / p).is_file()]
    return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and ".cache" not in p.parts]


def test_every_security_suppression_gives_its_reason() -> None:
    """On the line itself, or in a comment right above it."""
    missing = []
    for path in _tracked_python_files():
        lines = path.read_text(errors="replace").splitlines()
        for n, line in enumerate(lines):
            m = NOQA_S.search(line)
            if not m or not re.search(r"\bS\d+", m.group(1)):
                continue
            inline = len(m.group(2).strip(" -:()#")) >= 8
            above = n > 0 and lines[n - 1].strip().startswith("#") and len(lines[n - 1].strip()) > 10
            if not (inline or above):
                missing.append(f"{path.relative_to(ROOT)}:{n + 1}: {line.strip()}")
    assert not missing, "a `# noqa: S…` without a reason:\n" + "\n".join(missing)
