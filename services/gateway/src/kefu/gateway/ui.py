"""The browser side, served by the gateway itself so it works air-gapped: the embeddable web widget
(``/widget.js``, one script tag on any page), a demo page embedding it (``/``) and the agent console
(``/console``). Plain JavaScript and CSS from package data, no build step, nothing fetched from outside.

The widget runs on the customer's pages, another origin than the gateway: the REST routes it calls
answer CORS preflights and carry ``Access-Control-Allow-Origin``; no other route does.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from aiohttp import web

from kefu.shared.bus import subject_token
from kefu.shared.errors import KefuError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OriginPolicy(Protocol):
    def check(self, origin: str | None, host: str | None) -> None:
        """Raise a KefuError unless pages of ``origin`` may call this gateway (``host``: its Host header)."""

# The widget's REST calls: start a conversation, read its history, upload an image.
_WIDGET_ROUTES = (
    ("POST", re.compile(r"/v1/tenants/[^/]+/conversations")),
    ("GET", re.compile(r"/v1/conversations/[^/]+")),
    ("POST", re.compile(r"/v1/conversations/[^/]+/images")),
)
_PREFLIGHT_MAX_AGE = "600"
DEMO_TENANT = "shop"
_LANGS = ("auto", "zh", "en")

# The gateway's own pages load only the gateway's own files; no page may frame the console.
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")

_FILES = {
    # route: (file in static/, content type, extra headers)
    "/widget.js": ("widget.js", "text/javascript; charset=utf-8", {}),
    "/console": ("console.html", "text/html; charset=utf-8",
                 {"Content-Security-Policy": _PAGE_CSP + "; frame-ancestors 'none'", "X-Frame-Options": "DENY"}),
    "/console.js": ("console.js", "text/javascript; charset=utf-8", {}),
    "/console.css": ("console.css", "text/css; charset=utf-8", {}),
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str
    headers: dict[str, str]


def _widget_route(method: str, path: str) -> bool:
    return any(m == method and pattern.fullmatch(path) for m, pattern in _WIDGET_ROUTES)


class Ui:
    """The static UI and the widget's CORS.

    Args:
        origins: which page origins may call the widget's routes: the WebSockets' rule
            (``KEFU_ALLOWED_ORIGINS``, :class:`kefu.gateway.auth.Origins`), since the widget needs both.
            None: any origin.
    """

    def __init__(self, origins: OriginPolicy | None = None) -> None:
        self.origins = origins
        static = resources.files("kefu.gateway") / "static"
        self.assets: dict[str, _Asset] = {}
        for route, (name, content_type, headers) in _FILES.items():
            body = (static / name).read_bytes()
            self.assets[route] = _Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"', headers)

        self.demo_page = (static / "demo.html").read_text("utf-8")

    def add_routes(self, app: web.Application) -> None:
        app.add_routes([web.get(route, self.serve) for route in self.assets])
        app.add_routes([web.get("/", self.demo)])

    async def demo(self, request: web.Request) -> web.Response:
        """A page embedding the widget (``/?tenant=shop&lang=zh``), with the tag to copy for this gateway."""
        tenant = subject_token(request.query.get("tenant", DEMO_TENANT))
        lang = request.query.get("lang", "auto")
        if lang not in _LANGS:
            lang = "auto"
        page = (self.demo_page.replace("{{tenant}}", html.escape(tenant))
                .replace("{{lang}}", lang)
                .replace("{{widget_url}}", html.escape(f"{request.scheme}://{request.host}/widget.js")))
        return web.Response(text=page, content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"})

    async def serve(self, request: web.Request) -> web.Response:
        asset = self.assets[request.path]
        # Revalidated on every load (cheap: 304), so an upgraded gateway's widget reaches every page at once.
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", **asset.headers}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})

    def _allow(self, request: web.Request, origin: str) -> str | None:
        if self.origins is None:
            return "*"  # the calls carry a bearer token, never a cookie: no page can ride a visitor's session
        try:
            self.origins.check(origin, request.host)
        except KefuError:
            return None
        return origin

    @web.middleware
    async def cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Preflights and ``Access-Control-Allow-Origin`` for the widget's routes only."""
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if request.method == "OPTIONS":
            wanted = request.headers.get("Access-Control-Request-Method", "")
            if not _widget_route(wanted, request.path):
                return await handler(request)
            allowed = self._allow(request, origin)
            if allowed is None:
                return web.Response(status=403, headers={"Vary": "Origin"})
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": wanted,
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE, "Vary": "Origin"})
        response = await handler(request)
        if _widget_route(request.method, request.path) and (allowed := self._allow(request, origin)) is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"
        return response
