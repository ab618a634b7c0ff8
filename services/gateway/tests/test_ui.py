"""The static UI (widget, demo page, console) and the widget routes' CORS, on a real aiohttp server."""

import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kefu.gateway.ui import Ui
from kefu.shared.errors import PermissionDenied

PAGE = "http://shop.example"


async def ok(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def client():
    async def make(ui: Ui) -> TestClient:
        app = web.Application(middlewares=[ui.cors])
        app.add_routes([web.post("/v1/tenants/{t}/conversations", ok), web.get("/v1/conversations/{c}", ok),
                        web.post("/v1/conversations/{c}/images", ok), web.post("/v1/conversations/{c}/messages", ok),
                        web.put("/v1/tenants/{t}/documents/{d}", ok)])
        ui.add_routes(app)
        c = TestClient(TestServer(app))
        await c.start_server()
        made.append(c)
        return c

    made: list[TestClient] = []
    yield make
    for c in made:
        await c.close()


async def test_the_files_are_served_from_the_package_with_revalidation(client):
    c = await client(Ui())
    for path, kind in (("/widget.js", "text/javascript"), ("/console", "text/html"), ("/console.js", "text/javascript"),
                       ("/console.css", "text/css")):
        r = await c.get(path)
        assert r.status == 200 and r.content_type == kind, path
        assert len(await r.read()) > 500
        again = await c.get(path, headers={"If-None-Match": r.headers["ETag"]})
        assert again.status == 304
    console = await c.get("/console")
    assert "frame-ancestors 'none'" in console.headers["Content-Security-Policy"]
    body = await console.text()
    # Nothing is fetched from anywhere but the gateway itself (air-gapped).
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", body)
    widget = await (await c.get("/widget.js")).text()
    assert "http://" not in widget.replace("http://GATEWAY", "") and "https://" not in widget


async def test_the_demo_page_embeds_the_widget_for_the_tenant_asked(client):
    c = await client(Ui())
    page = await (await c.get("/?tenant=acme&lang=zh")).text()
    assert '<script src="/widget.js" data-tenant="acme" data-lang="zh"></script>' in page
    assert f'src="http://{c.host}:{c.port}/widget.js" data-tenant="acme"' in page.replace("&quot;", '"')
    default = await (await c.get("/?lang=<b>")).text()
    assert 'data-tenant="shop" data-lang="auto"' in default and "<b>" not in default
    bad = await c.get("/?tenant=%3Cscript%3E")  # not a tenant id: refused, never written into the page
    assert bad.status >= 400 and "<script>" not in await bad.text()


async def test_cors_answers_for_the_widget_routes_only(client):
    c = await client(Ui())
    pre = await c.options("/v1/tenants/shop/conversations", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    got = await c.get("/v1/conversations/c1", headers={"Origin": PAGE})
    assert got.status == 200 and got.headers["Access-Control-Allow-Origin"] == "*"
    upload = await c.options("/v1/conversations/c1/images", headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"})
    assert upload.status == 204
    # Admin and message routes are not opened to other origins.
    for path, method in (("/v1/tenants/shop/documents/d", "PUT"), ("/v1/conversations/c1/messages", "POST")):
        r = await c.options(path, headers={"Origin": PAGE, "Access-Control-Request-Method": method})
        assert "Access-Control-Allow-Origin" not in r.headers, path
    r = await c.post("/v1/conversations/c1/messages", headers={"Origin": PAGE})
    assert "Access-Control-Allow-Origin" not in r.headers


class OnlyTheShop:
    def check(self, origin, host):
        if origin != PAGE:
            raise PermissionDenied("no", code="origin_not_allowed")


async def test_cors_follows_the_allowed_origins(client):
    c = await client(Ui(OnlyTheShop()))
    pre = await c.options("/v1/tenants/shop/conversations", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST"})
    assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == PAGE and pre.headers["Vary"] == "Origin"
    other = await c.options("/v1/tenants/shop/conversations", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers
    r = await c.post("/v1/tenants/shop/conversations", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
