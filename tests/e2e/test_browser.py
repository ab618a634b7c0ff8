"""The web widget and the agent console in a real browser: Debian's chromium driven by Playwright, against
the five real services (the in-process ``stack``) and a gateway replica that lets the test's shop page
(another origin) embed the widget. Screenshots are saved to tests/e2e/screenshots/ (printed)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kefu.shared.service import start_in_background
from kefu.shared.testing import screenshot

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).parent / "screenshots"
WAIT_MS = 90_000  # only a failing test waits this long: the first answers warm the model and the OCR on 2 cores

PRICE_EN = "The L2 desk lamp costs 129 yuan and has three brightness levels."
WARRANTY_EN = "The L2 desk lamp has a two-year warranty; the bulb is covered for one year."
PRICE_ZH = "L2 台灯售价 129 元，有三档亮度可调。"

# The shop's own page: a site whose CSS would wreck the widget if it leaked into it.
SHOP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Lamp shop</title>
<style>
  body {{ font-family: serif; margin: 40px; background: #fbf7ef; }}
  button {{ background: rgb(255, 0, 0) !important; font-size: 40px !important; border-radius: 0 !important; }}
  div {{ color: rgb(0, 128, 0); }}
</style></head><body>
<h1>Lamp shop · 台灯商城</h1><p>The L2 desk lamp: three brightness levels, 129 yuan.</p>
<script src="{gateway}/widget.js" data-tenant="{tenant}" data-lang="{lang}"></script>
</body></html>"""


@pytest.fixture(scope="module")
async def shop() -> AsyncIterator[dict[str, Any]]:
    """A customer's web server on its own origin, serving a page with the widget's script tag."""
    site: dict[str, Any] = {}

    async def page(request: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=SHOP_PAGE.format(
            gateway=request.query.get("gw", site.get("gateway")), tenant=request.query["tenant"],
            lang=request.query.get("lang", "auto")))

    app = web.Application()
    app.add_routes([web.get("/", page)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    site["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield site
    await runner.cleanup()


async def start_gateway(stack, origin: str, port: int = 0) -> tuple[Any, asyncio.Event, asyncio.Task]:
    """Another gateway replica on the stack's NATS whose sockets admit ``origin`` (KEFU_ALLOWED_ORIGINS)."""
    from kefu.gateway.app import GatewayService, GatewaySettings

    service = GatewayService(GatewaySettings(
        nats_url=stack.nats_url, data_dir=stack.data_dir, log_level="warning", http_port=port, grpc_port=0,
        allowed_origins=origin, rate_messages_per_second=1000, rate_messages_burst=1000))
    stop = asyncio.Event()
    return service, stop, await start_in_background(service, stop)


async def stop_gateway(stop: asyncio.Event, task: asyncio.Task) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


@pytest.fixture(scope="module")
async def gateway(stack, shop) -> AsyncIterator[str]:
    """The gateway the shop's page embeds the widget from."""
    service, stop, task = await start_gateway(stack, shop["url"])
    shop["gateway"] = f"http://127.0.0.1:{service.http_port}"
    yield shop["gateway"]
    await stop_gateway(stop, task)


@pytest.fixture(scope="module")
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium", pytrace=False)
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nbrowser test screenshots: {SHOTS}")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def admin(stack, method: str, path: str, body: dict | None = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(
            method, stack.http + path, json=body, headers={"Authorization": f"Bearer {stack.admin}"}) as r:
        assert r.status < 300, await r.text()
        return await r.json()


async def put_docs(stack, tenant: str, docs: dict[str, tuple[str, str]]) -> None:
    for doc_id, (title, text) in docs.items():
        await admin(stack, "PUT", f"/v1/tenants/{tenant}/documents/{doc_id}", {"title": title, "text": text})


def frames_of(page) -> list[dict]:
    """Every frame the page's widget socket receives, in order."""
    frames: list[dict] = []

    def on_socket(ws) -> None:
        if "/v1/ws" in ws.url:
            ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", on_socket)
    return frames


async def ask(page, text: str) -> None:
    box = page.locator("[data-kefu-widget] textarea")
    await box.fill(text)
    await box.press("Enter")


async def test_widget_on_another_origin_streams_cited_answers_keeps_history_and_reads_images(
        stack, gateway, shop, browser, unique):
    tenant = unique("widget")
    await put_docs(stack, tenant, {"lamp-price": ("Desk lamp L2 price", PRICE_EN)})
    context = await browser.new_context(viewport={"width": 1100, "height": 760}, locale="en-US")
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    frames = frames_of(page)
    await page.goto(f"{shop['url']}/?tenant={tenant}")

    launcher = page.locator("[data-kefu-widget] .launcher")
    # The host page's `button { background: red !important }` does not reach into the shadow root.
    assert await launcher.evaluate("b => getComputedStyle(b).backgroundColor") != "rgb(255, 0, 0)"
    await launcher.click()
    await page.locator("[data-kefu-widget] .status:not(.wait)").wait_for(timeout=WAIT_MS)
    await ask(page, "How much is the L2 desk lamp?")
    answer = page.locator("[data-kefu-widget] .row.bot:has(.cite)").last
    await answer.wait_for(timeout=WAIT_MS)
    assert "129" in await answer.locator(".bubble").inner_text()
    assert await answer.locator(".cite").all_inner_texts() == ["lamp-price"]
    kinds = [f["type"] for f in frames]
    assert "delta" in kinds and kinds.index("delta") < kinds.index("reply")  # streamed, then the cited reply
    reply = next(f for f in frames if f["type"] == "reply")
    assert (await answer.locator(".bubble").inner_text()).strip() == reply["reply"]["text"].strip()
    await page.screenshot(path=str(SHOTS / "widget-en.png"))

    # A reload continues the same conversation, its history on screen.
    stored = await page.evaluate("Object.entries(localStorage).filter(([k]) => k.startsWith('kefu:'))")
    assert len(stored) == 1
    await page.reload()
    history = page.locator("[data-kefu-widget] .row.me .bubble")
    await history.first.wait_for(timeout=WAIT_MS)
    assert await history.all_inner_texts() == ["How much is the L2 desk lamp?"]
    assert "129" in await page.locator("[data-kefu-widget] .row.bot:has(.cite) .bubble").last.inner_text()
    assert await page.evaluate("Object.entries(localStorage).filter(([k]) => k.startsWith('kefu:'))") == stored

    # An image: its text (OCR) is shown back.
    image = SHOTS / "order.png"
    image.write_bytes(screenshot(("订单详情 Order details", "订单号：20261124001"), size=(900, 260)))
    await page.locator("[data-kefu-widget] input[type=file]").set_input_files(str(image))
    ocr = page.locator("[data-kefu-widget] .ocr")
    await ocr.wait_for(timeout=WAIT_MS)
    assert "20261124001" in await ocr.inner_text()
    await page.screenshot(path=str(SHOTS / "widget-image.png"))

    # Refusals are said politely, in the visitor's language: a "PNG" that is not one (the gateway's
    # invalid_image), and a message the gateway refuses on the socket (an error frame).
    fake = SHOTS / "not-an-image.png"
    fake.write_bytes(b"this is text, not a picture")
    await page.locator("[data-kefu-widget] input[type=file]").set_input_files(str(fake))
    await page.locator("[data-kefu-widget] .note.error", has_text="Please send a PNG or JPEG image.").wait_for(
        timeout=WAIT_MS)
    await page.evaluate("window.__kefuWidget.send('x'.repeat(4001))")  # past the 4000-character limit
    await page.locator("[data-kefu-widget] .note.error", has_text="Sorry, something went wrong").wait_for(
        timeout=WAIT_MS)
    assert any(f["type"] == "error" and f["code"] == "invalid_field" for f in frames)
    assert errors == []
    await context.close()


async def test_widget_speaks_chinese(stack, gateway, shop, browser, unique):
    tenant = unique("widgetzh")
    await put_docs(stack, tenant, {"lamp-price-zh": ("L2 台灯价格", PRICE_ZH)})
    context = await browser.new_context(viewport={"width": 1100, "height": 760}, locale="zh-CN")
    page = await context.new_page()
    await page.goto(f"{shop['url']}/?tenant={tenant}&lang=auto")  # auto: the browser's language, zh-CN
    widget = page.locator("[data-kefu-widget]")
    assert await widget.locator(".launcher").get_attribute("aria-label") == "打开在线客服"
    await widget.locator(".launcher").click()
    assert await widget.locator(".who b").inner_text() == "在线客服"
    assert await widget.locator("[data-action=human]").inner_text() == "转人工"
    assert await widget.locator("textarea").get_attribute("placeholder") == "请输入您的问题…"
    await ask(page, "L2 台灯多少钱？")
    answer = widget.locator(".row.bot:has(.cite)").last
    await answer.wait_for(timeout=WAIT_MS)
    assert "129" in await answer.locator(".bubble").inner_text()
    assert await answer.locator(".cites > span").first.inner_text() == "来源:"
    await page.screenshot(path=str(SHOTS / "widget-zh.png"))
    await context.close()


async def test_visitor_asks_for_a_human_and_sees_the_agents_reply_live(stack, gateway, shop, browser, unique):
    tenant = unique("handoff")
    await put_docs(stack, tenant, {"lamp-price": ("Desk lamp L2 price", PRICE_EN),
                                   "lamp-warranty": ("Desk lamp L2 warranty", WARRANTY_EN)})
    password = "correct horse battery"
    await admin(stack, "PUT", f"/v1/tenants/{tenant}/agents/alice",
                {"password": password, "role": "agent", "name": "Alice"})

    visitor_ctx = await browser.new_context(viewport={"width": 1000, "height": 760}, locale="en-US")
    visitor = await visitor_ctx.new_page()
    await visitor.goto(f"{shop['url']}/?tenant={tenant}&lang=en")
    widget = visitor.locator("[data-kefu-widget]")
    await widget.locator(".launcher").click()
    await ask(visitor, "How much is the L2 desk lamp?")
    await widget.locator(".row.bot:has(.cite)").last.wait_for(timeout=WAIT_MS)
    await widget.locator("[data-action=human]").click()
    await widget.locator(".note", has_text="human agent").wait_for(timeout=WAIT_MS)
    assert await widget.locator(".status").inner_text() == "Agent connected"

    # The agent, in another browser, signs in with a password and finds the visitor in the queue.
    agent_ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
    agent = await agent_ctx.new_page()
    errors: list[str] = []
    agent.on("pageerror", lambda exc: errors.append(str(exc)))
    await agent.goto(f"{gateway}/console")
    await agent.fill("input[name=tenant]", tenant)
    await agent.fill("input[name=agent_id]", "alice")
    await agent.fill("input[name=password]", password)
    await agent.screenshot(path=str(SHOTS / "console-login.png"))
    await agent.click("#login-form button[type=submit]")
    item = agent.locator("#waiting .conv-item", has_text="talk to a human")
    await item.wait_for(timeout=WAIT_MS)
    assert await agent.locator("#me-name").inner_text() == "Alice"
    await item.click()
    summary = await agent.locator("#summary").inner_text()
    assert "the visitor asked for a person" in summary and "How much is the L2 desk lamp?" in summary
    await agent.click("#accept")
    await agent.locator("#mine .conv-item").wait_for(timeout=WAIT_MS)
    assert "129 yuan" in await agent.locator("#suggestion-text").inner_text()  # for the last question
    assert "How much is the L2 desk lamp?" in await agent.locator("#transcript").inner_text()

    # In human mode the bot stays quiet; the agent is offered what it would have said.
    await ask(visitor, "What is the warranty of the L2 desk lamp?")
    await agent.locator("#transcript .msg.visitor", has_text="warranty").wait_for(timeout=WAIT_MS)
    await agent.locator("#suggestion-text", has_text="two-year warranty").wait_for(timeout=WAIT_MS)
    assert await agent.locator("#suggestion-cites .cite").all_inner_texts() == ["lamp-warranty"]
    await agent.screenshot(path=str(SHOTS / "console.png"))
    await agent.click(".topbar .lang-toggle")  # the console in Chinese
    assert await agent.locator("#release").inner_text() == "交还机器人"
    assert await agent.locator("#use-suggestion").inner_text() == "使用此回答"
    assert "访客要求转人工" in await agent.locator("#summary").inner_text()
    await agent.screenshot(path=str(SHOTS / "console-zh.png"))
    await agent.click(".topbar .lang-toggle")
    suggested = await agent.locator("#suggestion-text").inner_text()
    await agent.click("#use-suggestion")
    assert await agent.locator("#reply-text").input_value() == suggested
    await agent.fill("#reply-text", f"Hi, this is Alice. {suggested}")
    await agent.click("#reply-form button[type=submit]")

    live = widget.locator(".row.agent .bubble", has_text="this is Alice")
    await live.wait_for(timeout=WAIT_MS)  # the visitor's page shows it live, no reload
    assert "two-year warranty" in await live.inner_text()
    await visitor.screenshot(path=str(SHOTS / "widget-agent-reply.png"))

    # Hand back to the bot: the conversation leaves the console and the bot answers again.
    await agent.click("#release")
    await agent.locator("#mine-empty").wait_for(state="visible", timeout=WAIT_MS)
    await ask(visitor, "How much is the L2 desk lamp?")
    await widget.locator(".row.bot:has(.cite)").nth(1).wait_for(timeout=WAIT_MS)
    state = await admin(stack, "GET", f"/v1/conversations/{await cid_of(visitor)}")
    assert state["mode"] == "bot"
    assert [t["text"] for t in state["turns"] if t["role"] == "agent"] == [f"Hi, this is Alice. {suggested}"]

    # The admin removes the account: the console is signed out at once, not left reconnecting.
    await admin(stack, "DELETE", f"/v1/tenants/{tenant}/agents/alice")
    await agent.locator("#login-form").wait_for(timeout=WAIT_MS)
    assert "sign in again" in await agent.locator("#login-error").inner_text()
    assert errors == []
    await agent_ctx.close()
    await visitor_ctx.close()


async def cid_of(page) -> str:
    stored = await page.evaluate("Object.entries(localStorage).filter(([k]) => k.startsWith('kefu:'))")
    return json.loads(stored[0][1])["cid"]


async def test_widget_reconnects_and_is_replayed_what_it_missed(stack, shop, browser, unique):
    tenant = unique("reconnect")
    service, stop, task = await start_gateway(stack, shop["url"])
    gw = f"http://127.0.0.1:{service.http_port}"
    context = await browser.new_context(viewport={"width": 1000, "height": 760}, locale="en-US")
    page = await context.new_page()
    await page.goto(f"{shop['url']}/?tenant={tenant}&lang=en&gw={gw}")
    widget = page.locator("[data-kefu-widget]")
    await widget.locator(".launcher").click()
    await widget.locator("[data-action=human]").click()
    await widget.locator(".note", has_text="human agent").wait_for(timeout=WAIT_MS)
    cid = await cid_of(page)

    async with aiohttp.ClientSession() as s, s.ws_connect(f"{stack.http}/v1/agent/ws?token={stack.admin}") as agent:
        async def agent_says(text: str) -> None:
            await agent.send_json({"type": "reply", "conversation_id": cid, "text": text})
            while (await agent.receive_json(timeout=30))["type"] != "sent":
                pass

        await agent.send_json({"type": "accept", "conversation_id": cid})
        while (await agent.receive_json(timeout=30))["type"] != "accepted":
            pass
        await stop_gateway(stop, task)  # the visitor's gateway goes away
        await widget.locator(".status.wait", has_text="Reconnecting").wait_for(timeout=WAIT_MS)
        await agent_says("Sorry for the wait, I am looking at your order.")  # said while the visitor is away
        service, stop, task = await start_gateway(stack, shop["url"], port=service.http_port)
        try:
            missed = widget.locator(".row.agent .bubble", has_text="Sorry for the wait")
            await missed.wait_for(timeout=WAIT_MS)  # replayed on reconnect (last_seq)
            await widget.locator(".status:not(.wait)").wait_for(timeout=WAIT_MS)
            await agent_says("It ships tomorrow.")
            await widget.locator(".row.agent .bubble", has_text="It ships tomorrow.").wait_for(timeout=WAIT_MS)
            assert await widget.locator(".row.agent .bubble").all_inner_texts() == [
                "Sorry for the wait, I am looking at your order.", "It ships tomorrow."]
            await page.screenshot(path=str(SHOTS / "widget-reconnected.png"))
        finally:
            await agent.send_json({"type": "release", "conversation_id": cid})
            await context.close()  # the page's socket first: a gateway waits for open sockets when it stops
            await stop_gateway(stop, task)
