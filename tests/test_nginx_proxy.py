"""deploy/nginx.conf, run by the real nginx in front of a real `python -m service`, checked through HTTPS.

The shipped file is changed only mechanically (`adapted`): loopback listen addresses on free ports, a
self-signed certificate made here with the openssl CLI, the upstream's port, the log path, and the port in
the HTTPS redirect. Every replacement must match exactly, so a change to the file that the test would no
longer follow fails here instead of testing something else. Skipped when nginx or openssl is not
installed (`make system-deps` installs nginx as root).
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_fixtures import ROOT, decode_png, free_port, photo_bytes, serving

from service.config import Settings

pytestmark = pytest.mark.slow
pytest_plugins = ["service_fixtures"]

CONF = ROOT / "deploy" / "nginx.conf"
PREFIX = "/carvae"
MAX_UPLOAD = 10485760  # CARVAE_MAX_UPLOAD_BYTES' default, which client_max_body_size matches
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
NO_NGINX = "nginx is not installed (Debian: apt-get install nginx; `make system-deps` as root)"


def _nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):  # not on a non-root user's PATH
        found = "/usr/sbin/nginx"
    return found


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx.conf should hold {old!r} exactly once"
    return text.replace(old, new)


def adapted(conf: str, *, http: int, https: int, upstream: int, cert: Path, key: Path, log: Path) -> str:
    conf = replace_once(conf, "    listen 80;\n", f"    listen 127.0.0.1:{http};\n")
    conf = replace_once(conf, "    listen 443 ssl http2;\n", f"    listen 127.0.0.1:{https} ssl http2;\n")
    conf = replace_once(conf, "    listen [::]:80;\n", "")
    conf = replace_once(conf, "    listen [::]:443 ssl http2;\n", "")
    conf = replace_once(conf, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};")
    conf = replace_once(conf, "/etc/ssl/carvae/fullchain.pem;", f"{cert};")
    conf = replace_once(conf, "/etc/ssl/carvae/privkey.pem;", f"{key};")
    conf = replace_once(conf, "/var/log/nginx/carvae.access.log", str(log))
    return replace_once(
        conf, "return 301 https://$host$request_uri;", f"return 301 https://$host:{https}$request_uri;"
    )


class Nginx:
    """nginx in the foreground as this user (one process, no workers) with everything under `workdir`."""

    def __init__(self, binary: str, workdir: Path, site: str) -> None:
        self.workdir = workdir
        (workdir / "site.conf").write_text(site)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = " ".join(f"{kind}_temp_path {workdir / kind};" for kind in kinds)
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {workdir / 'nginx.pid'};\n"
            f"error_log {workdir / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n  access_log off;\n  {temp}\n  include {workdir / 'site.conf'};\n}}\n"
        )
        log, conf = workdir / "error.log", workdir / "nginx.conf"
        argv = [binary, "-p", str(workdir), "-e", str(log), "-c", str(conf)]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_listening(self, port: int) -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.error_log()
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx not listening on {port}:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Site:
    def __init__(self, base: str, http_url: str, cert: Path, access_log: Path, nginx: Nginx) -> None:
        self.base = base  # https://localhost:PORT/carvae
        self.http_url = http_url  # http://127.0.0.1:PORT
        self.cert = cert
        self.access_log = access_log
        self.nginx = nginx

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, local_address: str | None = None) -> httpx.Client:
        transport = httpx.HTTPTransport(verify=self.tls(), local_address=local_address)
        return httpx.Client(base_url=self.base, transport=transport, timeout=30)


def self_signed(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def at_site_root(conf: str) -> str:
    """The edits the file's header describes for serving at the site root instead of under /carvae/."""
    conf = replace_once(conf, "    location = / {\n        return 302 /carvae/;\n    }\n", "")
    conf = replace_once(conf, "    location / {\n        return 404;\n    }\n", "")
    conf = replace_once(conf, "location /carvae/ {", "location / {")
    conf = replace_once(conf, "proxy_pass http://carvae/;", "proxy_pass http://carvae;")
    conf = replace_once(conf, "location = /carvae/metrics {", "location = /metrics {")
    return replace_once(conf, "proxy_pass http://carvae/metrics;", "proxy_pass http://carvae;")


def start_nginx(workdir: Path, upstream: int, prefix: str = PREFIX) -> Site:
    binary = _nginx()
    if binary is None:
        pytest.skip(NO_NGINX)
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (it makes the test's self-signed certificate)")
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(workdir)
    http, https = free_port(), free_port()
    log = workdir / "access.log"
    conf = CONF.read_text() if prefix else at_site_root(CONF.read_text())
    site = adapted(conf, http=http, https=https, upstream=upstream, cert=cert, key=key, log=log)
    nginx = Nginx(binary, workdir, site)
    nginx.wait_listening(http)
    return Site(f"https://localhost:{https}{prefix}", f"http://127.0.0.1:{http}", cert, log, nginx)


@pytest.fixture(scope="module")
def upstream_port(service_checkpoint: Path) -> Iterator[int]:
    if _nginx() is None:  # before starting the service
        pytest.skip(NO_NGINX)
    with serving(service_checkpoint, ROOT_PATH=PREFIX) as srv:
        yield srv.port


@pytest.fixture(scope="module")
def site(upstream_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_nginx(tmp_path_factory.mktemp("nginx"), upstream_port)
    try:
        yield s
    finally:
        s.nginx.stop()


def error_of(r: httpx.Response) -> dict[str, str]:
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    err: dict[str, str] = r.json()["error"]
    assert err["request_id"] == r.headers["x-request-id"]
    return err


def assert_service_error_headers(r: httpx.Response) -> None:
    """nginx's own error answers carry what the service's carry (service/headers.py), and HSTS."""
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert r.headers["strict-transport-security"] == "max-age=63072000"


def test_readme_upload_through_https(site: Site) -> None:
    """The README's curl line, through the proxy: `curl -F file=@car.jpg https://…/carvae/reconstruct`."""
    photo = site.nginx.workdir / "car.png"
    photo.write_bytes(photo_bytes(64, 48))
    out = site.nginx.workdir / "reconstruction.png"
    if shutil.which("curl"):
        run = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(site.cert), "-F", f"file=@{photo}",
             f"{site.base}/reconstruct", "-o", str(out), "-w", "%{http_code} %{content_type}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout == "200 image/png"
    else:
        with site.client() as c:
            r = c.post("/reconstruct", files={"file": ("car.png", photo.read_bytes())})
        assert (r.status_code, r.headers["content-type"]) == (200, "image/png")
        out.write_bytes(r.content)
    assert decode_png(out.read_bytes()).shape == (32, 32, 3)  # the tiny test model's size


def test_upload_over_the_limit_is_nginx_json_413(site: Site) -> None:
    """Over client_max_body_size = CARVAE_MAX_UPLOAD_BYTES: nginx answers, in the service's error shape,
    with the request id; declared (Content-Length) or found out while a chunked body streams in."""
    big = b"\0" * (MAX_UPLOAD + 1)
    with site.client() as c:
        declared = c.post("/reconstruct", content=big, headers={"Content-Type": "image/png"})
        chunked = c.post(
            "/reconstruct",
            content=iter([big[i : i + 2**20] for i in range(0, len(big), 2**20)]),
            headers={"Content-Type": "image/png", "X-Request-ID": "chunked-413"},
        )
    for r in (declared, chunked):
        assert r.status_code == 413
        assert error_of(r) == {
            "code": "payload_too_large",
            "message": "request body is larger than the limit of 10485760 bytes (10 MiB)",  # the service's
            "request_id": r.headers["x-request-id"],
        }
        assert_service_error_headers(r)
    assert HEX_ID.match(declared.headers["x-request-id"])
    assert chunked.headers["x-request-id"] == "chunked-413"
    # nginx answered both, not the service
    assert site.nginx.error_log().count("client intended to send too large") == 2


def test_limit_is_exactly_the_services(site: Site) -> None:
    """A body of exactly CARVAE_MAX_UPLOAD_BYTES passes nginx and reaches the service (which refuses it as
    an image, not for its size); a JSON body over the service's own 1 MiB limit gets the service's 413,
    in the same shape."""
    with site.client() as c:
        at_limit = c.post("/reconstruct", files={"file": ("x.png", b"\0" * (MAX_UPLOAD - 200))})
        json_413 = c.post("/sample", content=b" " * (2**20 + 1), headers={"Content-Type": "application/json"})
    assert at_limit.status_code == 415, at_limit.text
    assert error_of(at_limit)["code"] == "unsupported_media_type"
    assert json_413.status_code == 413
    assert error_of(json_413)["code"] == "payload_too_large"
    assert "1048576 bytes" in error_of(json_413)["message"]


def test_docs_and_openapi_under_the_prefix(site: Site) -> None:
    with site.client() as c:
        docs = c.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        for url in (f"{PREFIX}/openapi.json", f"{PREFIX}/docs/assets/swagger-ui-bundle.js"):
            assert f"'{url}'" in docs.text or f'"{url}"' in docs.text, url
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        schema = c.get("/openapi.json")
        assert schema.status_code == 200
        assert schema.json()["servers"] == [{"url": PREFIX}]
        assert "/reconstruct" in schema.json()["paths"]
        # The web page at the prefix, and the host's root leading to it
        assert c.get("/").status_code == 200
        root = c.get(site.base.removesuffix(PREFIX) + "/")
        assert (root.status_code, root.headers["location"]) == (302, f"{PREFIX}/")
        bare = c.get(site.base)
        assert (bare.status_code, bare.headers["location"]) == (301, f"{PREFIX}/")


def test_request_id_round_trips(site: Site) -> None:
    with site.client() as c:
        own = c.get("/v1/model", headers={"X-Request-ID": "client-id.42"})
        made = c.get("/v1/model")
        odd = c.get("/v1/model", headers={"X-Request-ID": "not a sane id"})
        missing = c.get("/no-such-route", headers={"X-Request-ID": "client-id.43"})
    assert own.status_code == 200
    assert own.headers["x-request-id"] == "client-id.42"
    assert error_of(missing)["request_id"] == "client-id.43"
    # No id, or one the service would not keep: nginx's own (32 hex), the same one the service answers with
    for r in (made, odd):
        assert HEX_ID.match(r.headers["x-request-id"]), r.headers["x-request-id"]
    assert made.headers["x-request-id"] != odd.headers["x-request-id"]
    log = site.access_log.read_text()
    for rid in ("client-id.42", "client-id.43", made.headers["x-request-id"], odd.headers["x-request-id"]):
        assert f"request_id={rid} " in log


def test_http_redirects_to_https(site: Site) -> None:
    https_port = httpx.URL(site.base).port
    r = httpx.get(f"{site.http_url}{PREFIX}/docs?x=1", headers={"Host": "localhost"})
    assert r.status_code == 301
    assert r.headers["location"] == f"https://localhost:{https_port}{PREFIX}/docs?x=1"
    post = httpx.post(f"{site.http_url}{PREFIX}/reconstruct", files={"file": ("a.png", b"x")})
    assert post.status_code == 301  # never proxied in plain HTTP


def test_tls_12_and_13_with_hsts(site: Site) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        tls = site.tls()
        tls.minimum_version = tls.maximum_version = version
        r = httpx.get(site.base + "/healthz", verify=tls)
        assert r.status_code == 200, version
        assert r.headers["strict-transport-security"] == "max-age=63072000"


def test_services_redirects_keep_https_host_and_port(site: Site) -> None:
    """The service's own redirects (the page's file folder without its slash) are absolute: they need
    X-Forwarded-Proto (believed from 127.0.0.1) and the Host with its port."""
    with site.client() as c:
        r = c.get("/static")
    assert r.status_code == 307
    assert r.headers["location"] == f"{site.base}/static/"


def _connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port, from /proc/net/tcp."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    remote = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[2] == remote and row.split()[3] == "01")


def test_upstream_connections_are_reused(site: Site, upstream_port: int) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("counts connections in Linux's /proc/net/tcp")
    with site.client() as c:
        for _ in range(6):
            assert c.get("/healthz").status_code == 200
    for _ in range(6):  # a new client connection each time: the upstream one is still reused
        assert httpx.get(site.base + "/healthz", verify=site.tls()).status_code == 200
    assert _connections_to(upstream_port) == 1


def _directive(conf: str, name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", conf, re.MULTILINE)
    assert len(values) == 1, (name, values)
    return str(values[0])


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_numbers_follow_the_services_defaults() -> None:
    """The config's limits and timeouts against the service's defaults (README "Settings"), so that a
    change of a default that the file does not follow fails here."""
    conf = CONF.read_text()
    d = Settings.model_fields
    assert d["MAX_UPLOAD_BYTES"].default == MAX_UPLOAD
    size = _directive(conf, "client_max_body_size")
    assert int(size.removesuffix("m")) * 2**20 == MAX_UPLOAD
    assert str(MAX_UPLOAD) in conf  # the 413's message
    # nginx lets an idle upstream connection go before the service closes it
    assert _seconds(_directive(conf, "keepalive_timeout")) < d["KEEP_ALIVE_S"].default
    assert _seconds(_directive(conf, "client_body_timeout")) == d["BODY_TIMEOUT_S"].default
    assert _seconds(_directive(conf, "client_header_timeout")) == d["HEADER_TIMEOUT_S"].default
    # nginx waits longer than the service may take to answer what it accepted (then its JSON 504/503)
    longest = d["BODY_TIMEOUT_S"].default + d["REQUEST_TIMEOUT_S"].default + 5
    assert _seconds(_directive(conf, "proxy_read_timeout")) > longest


def test_metrics_only_from_internal_addresses(site: Site) -> None:
    with site.client() as c:
        inside = c.get("/metrics")
    assert inside.status_code == 200
    assert "carvae_requests_total" in inside.text
    # From 127.0.0.2 (loopback, but not an allowed address): as a client outside would be answered
    with site.client(local_address="127.0.0.2") as c:
        outside = c.get("/metrics")
    assert outside.status_code == 403
    assert error_of(outside)["code"] == "forbidden"
    assert_service_error_headers(outside)
    with site.client() as c:
        elsewhere = c.get(site.base.removesuffix(PREFIX) + "/wp-login.php")
    assert elsewhere.status_code == 404
    assert error_of(elsewhere)["code"] == "not_found"


def test_service_down_is_json_502(tmp_path: Path) -> None:
    """nginx's own 502 (nothing listens at the upstream's address) in the service's error shape."""
    site = start_nginx(tmp_path, free_port())
    try:
        with site.client() as c:
            r = c.get("/healthz", headers={"X-Request-ID": "down-1"})
        assert r.status_code == 502
        assert r.headers["retry-after"] == "5"
        assert_service_error_headers(r)
        assert error_of(r) == {
            "code": "bad_gateway",
            "message": "the service is not answering (starting, restarting or down)",
            "request_id": "down-1",
        }
    finally:
        site.nginx.stop()


def test_at_the_site_root(service_checkpoint: Path, tmp_path: Path) -> None:
    """The variant without a prefix, made with the edits the file's header describes, in front of a
    service without CARVAE_ROOT_PATH."""
    if _nginx() is None:
        pytest.skip(NO_NGINX)
    with serving(service_checkpoint) as srv:
        site = start_nginx(tmp_path, srv.port, prefix="")
        try:
            with site.client() as c:
                r = c.post("/reconstruct", files={"file": ("car.png", photo_bytes(64, 48))})
                assert (r.status_code, r.headers["content-type"]) == (200, "image/png")
                docs = c.get("/docs")
                assert docs.status_code == 200
                assert "'/openapi.json'" in docs.text
                assert "servers" not in c.get("/openapi.json").json()
                assert c.get("/").status_code == 200  # the web page
                assert c.get("/metrics").status_code == 200
                assert error_of(c.get("/nope"))["code"] == "not_found"
            with site.client(local_address="127.0.0.2") as c:
                assert c.get("/metrics").status_code == 403
        finally:
            site.nginx.stop()
