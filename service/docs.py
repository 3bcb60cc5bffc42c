"""/docs without the internet: Swagger UI served from the `swagger-ui-bundle-v2` package, not a CDN.

FastAPI's default /docs page loads its JavaScript and CSS from a CDN (and its favicon from fastapi's site),
so on an offline host, behind a strict firewall or under a Content-Security-Policy of 'self' the page is
blank. Here the same page points at the bundled files, mounted under /docs/assets. ReDoc has no such
package, so it is switched off (create_app passes redoc_url=None).
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
# validatorUrl None: Swagger UI would otherwise send the spec to swagger.io's online validator.
SWAGGER_PARAMETERS = {"validatorUrl": None, "deepLinking": True}


# Swagger UI: its bundle and stylesheet from /docs/assets, the schema and "Try it out" requests to this
# origin, icons as data: URLs, and style attributes it sets as it renders; its start-up script is inline,
# allowed by its hash (with_policy) rather than by 'unsafe-inline'.
POLICY = (
    "default-src 'self'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def with_policy(page: HTMLResponse) -> HTMLResponse:
    """The page with a Content-Security-Policy that allows its own inline scripts and nothing inline else
    (service.headers gives every other page and answer its policy)."""
    hashes = (hashlib.sha256(script).digest() for script in _INLINE_SCRIPT.findall(page.body))
    scripts = " ".join(f"'sha256-{base64.b64encode(h).decode()}'" for h in hashes)
    page.headers["content-security-policy"] = POLICY.format(scripts=scripts)
    return page


def mount_docs(app: FastAPI) -> None:
    """GET /docs, /docs/oauth2-redirect and the Swagger UI files under /docs/assets/."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # Relative to where the app is mounted, so the page also works behind a path-prefixing proxy.
        root = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root}{ASSETS_PATH}"
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )
        return with_policy(page)

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return with_policy(get_swagger_ui_oauth2_redirect_html())
