"""The plugins service on its own nats-server: the real built-in plugins against a small CRM HTTP
server started here, hot reload, and the policy a model cannot get past."""

from __future__ import annotations

import asyncio
import json
import shutil
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from kefu.plugins.app import BUILTIN_DIR, PluginsService, PluginsSettings, arguments_sha256
from kefu.proto.bus.v1 import events_pb2, plugin_pb2
from kefu.shared.bus import Bus
from kefu.shared.errors import KefuError
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import conv_subject

pytestmark = pytest.mark.integration



class Crm:
    """A small CRM: orders, customers and refunds over HTTP, counting what it was asked."""

    def __init__(self) -> None:
        self.orders = {"20261124001": {"status": "shipped", "carrier": "SF Express", "tracking_no": "SF1234567890",
                                       "eta": "2026-11-27"}}
        self.refunds: list[dict] = []

    async def order(self, request: web.Request) -> web.Response:
        found = self.orders.get(request.match_info["oid"])
        return web.json_response(found) if found else web.json_response({"error": "no such order"}, status=404)

    async def refund(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["order_id"] not in self.orders:
            return web.json_response({"error": "no such order"}, status=404)
        self.refunds.append(body)
        return web.json_response({"refund_id": f"R{len(self.refunds):04d}", "status": "requested"})

    async def redirect(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")


@pytest.fixture
async def crm():
    c = Crm()
    app = web.Application()
    app.add_routes([web.get("/orders/{oid}", c.order), web.post("/refunds", c.refund),
                    web.get("/redirect", c.redirect)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield c
    await runner.cleanup()


@pytest.fixture
async def plugins(tmp_path: Path, crm: Crm):
    """The plugins service over a copy of the built-in plugins, allowed to reach the test CRM on loopback only."""
    directory = tmp_path / "plugins"
    shutil.copytree(BUILTIN_DIR, directory, ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    with NatsServer(tmp_path / "js") as nats:
        port = crm.url.rsplit(":", 1)[1]
        service = PluginsService(PluginsSettings(nats_url=nats.url, data_dir=tmp_path, log_level="warning",
                                                 plugins_dir=directory, plugins_allowed_hosts=f"127.0.0.1:{port}",
                                                 plugins_allowed_networks="127.0.0.1/32"))
        stop = asyncio.Event()
        task = await start_in_background(service, stop)
        bus = await Bus.connect([nats.url], "test")
        try:
            yield service, bus, directory
        finally:
            await bus.close()
            stop.set()
            await asyncio.wait_for(task, 20)


async def configure(bus, tenant, plugin, enabled=True, **settings):
    return await bus.request("kefu.plugins.configure", plugin_pb2.ConfigurePluginRequest(
        tenant=tenant, plugin=plugin, enabled=enabled, settings_json=json.dumps(settings)),
        plugin_pb2.ConfigurePluginReply)


async def call(bus, tool, args, tenant="shop", **kw):
    plugin, _, name = tool.partition(".")
    req = plugin_pb2.ToolCallRequest(tenant=tenant, plugin=plugin, tool=name, arguments_json=json.dumps(args), **kw)
    reply = await bus.request("kefu.plugins.call", req, plugin_pb2.ToolCallReply)
    return json.loads(reply.result_json), reply


async def append(bus, tenant, cid, body_name, body, ts_ms=None) -> int:
    """An event in stream CONV, as dialogue writes it; returns its stream sequence."""
    ev = events_pb2.Event(id=uuid.uuid4().hex, conversation_id=cid, tenant=tenant, seq=1,
                          ts_ms=ts_ms or int(time.time() * 1000), writer="test")
    getattr(ev, body_name).CopyFrom(body)
    ack = await bus.js.publish(conv_subject(tenant, cid), ev.SerializeToString())
    return ack.seq


async def test_order_status_from_the_crm_in_the_visitors_language(plugins, crm):
    _, bus, _ = plugins
    await configure(bus, "shop", "crm_adapter", base_url=crm.url)
    zh, reply = await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"}, lang="zh")
    assert zh["found"] and zh["status"] == "shipped" and reply.version == "1.0.0"
    assert "已发货" in zh["message"] and "SF1234567890" in zh["message"]
    en, _ = await call(bus, "crm_adapter.order_status", {"order_id": "20269999999"}, lang="en")
    assert not en["found"] and "couldn't find order 20269999999" in en["message"]


async def test_listing_tells_tools_intents_and_what_is_enabled(plugins, crm):
    _, bus, _ = plugins
    everything = await bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(), plugin_pb2.ListPluginsReply)
    assert {p.name for p in everything.plugins} == {"crm_adapter", "payment", "ai_enhancer"}
    assert not everything.errors
    refund = next(t for p in everything.plugins for t in p.tools if t.name == "create_refund")
    assert refund.side_effecting and refund.confirmation == "visitor" and "{order_id}" in refund.confirm_zh
    # A tenant sees what is enabled for it: ai_enhancer by default, the others once configured.
    tenant = await bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(tenant="fresh"),
                               plugin_pb2.ListPluginsReply)
    assert [p.name for p in tenant.plugins] == ["ai_enhancer"]
    await configure(bus, "fresh", "crm_adapter", base_url=crm.url)
    tenant = await bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(tenant="fresh"),
                               plugin_pb2.ListPluginsReply)
    crm_info = next(p for p in tenant.plugins if p.name == "crm_adapter")
    assert crm_info.intents[0].slot_arguments == {"order_id": "order_id"}


async def test_policy_refuses_disabled_plugins_bad_arguments_and_bad_settings(plugins, crm):
    _, bus, _ = plugins
    with pytest.raises(KefuError) as err:
        await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"}, tenant="other")
    assert err.value.code == "plugin_disabled"
    await configure(bus, "shop", "crm_adapter", base_url=crm.url)
    for bad in ({}, {"order_id": "1; DROP TABLE"}, {"order_id": 20261124001}, {"order_id": "20261124001", "x": 1}):
        with pytest.raises(KefuError) as err:
            await call(bus, "crm_adapter.order_status", bad)
        assert err.value.code == "invalid_field", bad
    with pytest.raises(KefuError) as err:
        await configure(bus, "shop", "crm_adapter", base_url="file:///etc/passwd")
    assert err.value.code == "invalid_field"
    with pytest.raises(KefuError) as err:
        await call(bus, "crm_adapter.no_such_tool", {})
    assert err.value.code == "unknown_tool"


async def test_a_refund_runs_only_with_the_recorded_confirmation_of_exactly_that_call(plugins, crm):
    _, bus, _ = plugins
    await configure(bus, "shop", "payment", base_url=crm.url)
    cid, call_id = uuid.uuid4().hex, uuid.uuid4().hex
    args = {"order_id": "20261124001", "reason": "broken"}
    text = json.dumps(args)
    confirmed = events_pb2.ToolCallConfirmed(call_id=call_id, plugin="payment", tool="create_refund",
                                             arguments_sha256=arguments_sha256(text), by="visitor", message_seq=3)

    async def refund(**kw):
        req = plugin_pb2.ToolCallRequest(tenant="shop", conversation_id=cid, plugin="payment", tool="create_refund",
                                         arguments_json=text, **kw)
        return await bus.request("kefu.plugins.call", req, plugin_pb2.ToolCallReply)

    async def refused(code, **kw):
        with pytest.raises(KefuError) as err:
            await refund(**kw)
        assert err.value.code == code, kw

    # No confirmation, a claimed one that is not in the log, one from another conversation, one for
    # other arguments, a declined one, an expired one: none runs.
    await refused("confirmation_required", call_id=call_id)
    await refused("confirmation_required", call_id=call_id, confirmation="yes", confirmation_stream_seq=999999)
    elsewhere = await append(bus, "shop", uuid.uuid4().hex, "tool_confirmed", confirmed)
    await refused("confirmation_required", call_id=call_id, confirmation_stream_seq=elsewhere)
    other = events_pb2.ToolCallConfirmed()
    other.CopyFrom(confirmed)
    other.arguments_sha256 = arguments_sha256(json.dumps({"order_id": "20261124001", "reason": "x"}))
    await refused("confirmation_required", call_id=call_id,
                  confirmation_stream_seq=await append(bus, "shop", cid, "tool_confirmed", other))
    declined = events_pb2.ToolCallConfirmed()
    declined.CopyFrom(confirmed)
    declined.declined = True
    await refused("confirmation_declined", call_id=call_id,
                  confirmation_stream_seq=await append(bus, "shop", cid, "tool_confirmed", declined))
    await refused("confirmation_expired", call_id=call_id, confirmation_stream_seq=await append(
        bus, "shop", cid, "tool_confirmed", confirmed, ts_ms=int(time.time() * 1000) - 3600_000))
    visitor_said = events_pb2.VisitorMessage(text="确认")
    await refused("confirmation_required", call_id=call_id,
                  confirmation_stream_seq=await append(bus, "shop", cid, "visitor_message", visitor_said))
    assert crm.refunds == []

    seq = await append(bus, "shop", cid, "tool_confirmed", confirmed)
    first = await refund(call_id=call_id, confirmation_stream_seq=seq)
    assert json.loads(first.result_json)["created"] and not first.replayed
    again = await refund(call_id=call_id, confirmation_stream_seq=seq)
    assert again.replayed and again.result_json == first.result_json
    assert len(crm.refunds) == 1 and crm.refunds[0]["idempotency_key"] == call_id


async def test_outbound_calls_refuse_private_addresses_and_hosts_off_the_list(plugins, crm, tmp_path):
    service, bus, directory = plugins
    (directory / "fetcher.py").write_text(textwrap.dedent('''
        MANIFEST = {"name": "fetcher", "version": "1", "enabled_by_default": True,
                    "tools": [{"name": "fetch", "side_effecting": False, "rate_per_minute": 6000,
                               "arguments": {"type": "object", "properties": {"url": {"type": "string"}}}}]}

        async def fetch(ctx, url):
            resp = await ctx.http.get(url)
            return {"status": resp.status}
    '''))
    await service.reload()
    port = crm.url.rsplit(":", 1)[1]
    ok, _ = await call(bus, "fetcher.fetch", {"url": f"{crm.url}/orders/20261124001"})
    assert ok == {"status": 200}
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:80/",
                f"http://localhost:{port}/orders/1", "http://example.com/", f"http://127.0.0.2:{port}/",
                "file:///etc/passwd", f"http://user:pw@127.0.0.1:{port}/", "gopher://127.0.0.1:70/"):
        with pytest.raises(KefuError) as err:
            await call(bus, "fetcher.fetch", {"url": url})
        assert err.value.code == "outbound_refused", url
    with pytest.raises(KefuError) as err:
        await call(bus, "fetcher.fetch", {"url": f"{crm.url}/redirect"})
    assert err.value.code == "outbound_failed"


async def test_a_reload_switches_versions_and_calls_in_flight_finish_on_the_old_one(plugins):
    service, bus, directory = plugins
    source = textwrap.dedent('''
        import asyncio
        MANIFEST = {"name": "slow", "version": "VERSION", "enabled_by_default": True,
                    "tools": [{"name": "work", "side_effecting": False, "arguments": {"type": "object"}}]}

        async def work(ctx):
            await asyncio.sleep(0.5)
            return {"version": "VERSION"}
    ''')
    (directory / "slow.py").write_text(source.replace("VERSION", "1"))
    await service.reload()
    in_flight = asyncio.create_task(call(bus, "slow.work", {}))
    await asyncio.sleep(0.1)
    (directory / "slow.py").write_text(source.replace("VERSION", "2"))
    await service.reload()
    (old, _), (new, _) = await asyncio.gather(in_flight, call(bus, "slow.work", {}))
    assert old == {"version": "1"} and new == {"version": "2"}


async def test_a_broken_new_version_keeps_the_old_one_serving_and_says_why(plugins, crm):
    service, bus, directory = plugins
    await configure(bus, "shop", "crm_adapter", base_url=crm.url)
    path = directory / "crm_adapter.py"
    good = path.read_text()
    for broken, why in ((good + "\ndef broken(:\n", "SyntaxError"),
                        (good.replace('"side_effecting": False,\n            "timeout_s": 5,\n            "rate',
                                      '"side_effecting": True, "confirmation": "none",\n            "rate', 1),
                         "must need a confirmation"),
                        (good + "\nasync def self_check(ctx):\n    raise RuntimeError('CRM schema changed')\n",
                         "CRM schema changed")):
        path.write_text(broken)
        snap = await service.reload()
        assert snap.plugins["crm_adapter"].version == "1.0.0"
        listed = await bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(), plugin_pb2.ListPluginsReply)
        (error,) = listed.errors
        assert error.path.endswith("crm_adapter.py") and why in error.error and error.serving_version == "1.0.0"
        result, _ = await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"})
        assert result["found"]
    path.write_text(good.replace('"version": "1.0.0"', '"version": "1.0.1"'))
    listed = await bus.request("kefu.plugins.reload", plugin_pb2.ReloadRequest(), plugin_pb2.ListPluginsReply)
    assert not listed.errors and {p.name: p.version for p in listed.plugins}["crm_adapter"] == "1.0.1"


async def test_the_enhancer_tags_sentiment_and_urgency_and_asks_for_a_person_when_both_are_bad(plugins):
    _, bus, _ = plugins

    async def hook(text, lang="zh"):
        reply = await bus.request("kefu.plugins.hook", plugin_pb2.HookRequest(
            hook="on_message", tenant="shop", conversation_id="c1", text=text, lang=lang), plugin_pb2.HookReply)
        (result,) = reply.results
        return result

    calm = await hook("请问 X100 保修多久？")
    assert list(calm.tags) == [] and not calm.handoff_reason
    angry = await hook("太差了！我今天必须拿到货，马上给我处理！！")
    assert set(angry.tags) == {"sentiment:negative", "urgency:high"} and angry.handoff_reason == "urgent_negative"
    happy = await hook("Thanks, that was helpful", lang="en")
    assert list(happy.tags) == ["sentiment:positive"]


async def test_the_first_start_fills_the_data_dir_with_the_built_in_plugins(tmp_path):
    with NatsServer(tmp_path / "js") as nats:
        service = PluginsService(PluginsSettings(nats_url=nats.url, data_dir=tmp_path / "data", log_level="warning"))
        stop = asyncio.Event()
        task = await start_in_background(service, stop)
        try:
            assert sorted(p.name for p in (tmp_path / "data" / "plugins").glob("*.py")) == [
                "ai_enhancer.py", "crm_adapter.py", "payment.py"]
            assert set(service.plugins) == {"ai_enhancer", "crm_adapter", "payment"}
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)


async def test_reloads_under_load_fail_no_call(plugins):
    service, bus, directory = plugins
    source = textwrap.dedent('''
        MANIFEST = {"name": "echo", "version": "VERSION", "enabled_by_default": True,
                    "tools": [{"name": "echo", "side_effecting": False, "rate_per_minute": 100000,
                               "arguments": {"type": "object", "properties": {"n": {"type": "integer"}}}}]}

        async def echo(ctx, n):
            return {"n": n, "version": "VERSION"}
    ''')
    (directory / "echo.py").write_text(source.replace("VERSION", "0"))
    await service.reload()
    failures, versions, done = [], set(), asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not done.is_set():
            n += 1
            try:
                result, _ = await call(bus, "echo.echo", {"n": n})
                assert result["n"] == n
                versions.add(result["version"])
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
            await asyncio.sleep(0.005)

    runners = [asyncio.create_task(traffic()) for _ in range(4)]
    for v in range(1, 21):
        (directory / "echo.py").write_text(source.replace("VERSION", str(v)))
        await bus.request("kefu.plugins.reload", plugin_pb2.ReloadRequest(), plugin_pb2.ListPluginsReply)
        await asyncio.sleep(0.02)
    done.set()
    await asyncio.gather(*runners)
    assert failures == []
    assert "20" in versions and len(versions) > 5
