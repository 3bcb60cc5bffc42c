"""The headers every response gets, by path: how it may be cached, and what a browser may do with it.

Caching: the web page, its files and the docs are `no-cache` (kept, but revalidated before every use: a
304 from the ETag/Last-Modified StaticFiles sends), so a browser never runs last deploy's JavaScript
against this deploy's API; without a Cache-Control it may reuse them unasked for a tenth of their age
(RFC 9111 §4.2.2 heuristics). Everything else answers one request (an upload's reconstruction, the model
card, a probe) and is `no-store`: nothing, a shared cache least of all, may keep it — a cache does not know
that X-API-Key guards it.

Browsers: every response says `nosniff` (an error or a reconstruction is never guessed to be HTML) and
sends no Referer onwards. The web page may load only from its own origin — its scripts and styles are
files, not inline code; its images are data: and blob: URLs — and may not be framed by another site
(clickjacking). The docs page sets its own policy (service.docs: Swagger UI's inline start-up script is
allowed by its hash). API answers load and run nothing, should a browser ever open one as a page.
"""

from __future__ import annotations

from collections.abc import Collection

HeaderList = tuple[tuple[bytes, bytes], ...]

REVALIDATE = (b"cache-control", b"no-cache")
NO_STORE = (b"cache-control", b"no-store")
BROWSER = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def _policy(value: str) -> tuple[bytes, bytes]:
    return (b"content-security-policy", value.encode())


API_CSP = _policy(API_POLICY)
# An API answer or an error: also what the server itself writes when it refuses a connection or a request
# head before the app sees it (service.connections).
API_HEADERS: HeaderList = (NO_STORE, *BROWSER, API_CSP)
PAGE_HEADERS: HeaderList = (REVALIDATE, *BROWSER, _policy(PAGE_POLICY))
# The docs' files: revalidated like the page's, loading nothing themselves.
CACHED_HEADERS: HeaderList = (REVALIDATE, *BROWSER, API_CSP)
# A page that sets its policy itself (service.docs) gets the rest. Any other answer on its path (a 405, a
# CORS preflight, an error) sets none: it gets the API's (API_CSP), added by service.middleware.
OWN_POLICY: HeaderList = (REVALIDATE, *BROWSER)


class ResponseHeaders:
    """`headers(path)`: what a response to a request for `path` (the app's own path, without a proxy's
    prefix) gets. `cached_*`: revalidated, not no-store (the page, its files, the docs and theirs);
    `page_*`: the web page, under its policy; `own_policy_paths`: pages that set their policy themselves
    (OWN_POLICY: a response there without one gets API_CSP)."""

    def __init__(
        self,
        cached_paths: Collection[str] = (),
        cached_prefixes: Collection[str] = (),
        page_paths: Collection[str] = (),
        page_prefixes: Collection[str] = (),
        own_policy_paths: Collection[str] = (),
    ) -> None:
        self.cached_paths = frozenset(cached_paths)
        self.cached_prefixes = tuple(cached_prefixes)
        self.page_paths = frozenset(page_paths)
        self.page_prefixes = tuple(page_prefixes)
        self.own_policy_paths = frozenset(own_policy_paths)

    def __call__(self, path: str) -> HeaderList:
        if path in self.page_paths or path.startswith(self.page_prefixes):
            return PAGE_HEADERS
        if path in self.own_policy_paths:
            return OWN_POLICY
        if path in self.cached_paths or path.startswith(self.cached_prefixes):
            return CACHED_HEADERS
        return API_HEADERS
