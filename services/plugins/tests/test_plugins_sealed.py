"""The plugins service with encryption at rest on: tenants' plugin settings and stored tool results are
sealed in their KV buckets, and a confirmation whose event body is sealed in CONV still lets the call run."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import time
import uuid

import pytest
from aiohttp import web

from kefu.plugins.app import BUILTIN_DIR, KV_PLUGIN_CALLS, KV_PLUGIN_CONFIG, PluginsService, PluginsSettings
from kefu.proto.bus.v1 import events_pb2, plugin_pb2
from kefu.shared.bus import Bus
from kefu.shared.crypto import Keyring, is_sealed, seal_event
from kefu.shared.errors import Conflict
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import conv_subject

pytestmark = pytest.mark.integration

MASTER = os.urandom(32)


@pytest.fixture
async def sealed(tmp_path):
    async def order(request: web.Request) -> web.Response:
        return web.json_response({"status": "shipped", "carrier": "SF Express", "tracking_no": "SF5550001111",
                                  "eta": "2026-11-27"})

    async def refund(_: web.Request) -> web.Response:
        return web.json_response({"refund_id": "R0001", "status": "requested"})

    app = web.Application()
    app.add_routes([web.get("/orders/{oid}", order), web.post("/refunds", refund)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    directory = tmp_path / "plugins"
    shutil.copytree(BUILTIN_DIR, directory, ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    with NatsServer(tmp_path / "js") as nats:
        service = PluginsService(PluginsSettings(
            nats_url=nats.url, data_dir=tmp_path, log_level="warning", plugins_dir=directory,
            plugins_allowed_hosts=f"127.0.0.1:{port}", plugins_allowed_networks="127.0.0.1/32",
            master_key=base64.b64encode(MASTER).decode()))
        stop = asyncio.Event()
        task = await start_in_background(service, stop)
        bus = await Bus.connect([nats.url], "test")
        try:
            yield bus, f"http://127.0.0.1:{port}"
        finally:
            await bus.close()
            stop.set()
            await asyncio.wait_for(task, 20)
    await runner.cleanup()


async def call(bus, tool, args, tenant="shop", **kw):
    plugin, _, name = tool.partition(".")
    req = plugin_pb2.ToolCallRequest(tenant=tenant, plugin=plugin, tool=name, arguments_json=json.dumps(args), **kw)
    return await bus.request("kefu.plugins.call", req, plugin_pb2.ToolCallReply)


async def test_settings_and_results_are_sealed_and_a_sealed_confirmation_counts(sealed):
    bus, crm = sealed
    await bus.request("kefu.plugins.configure", plugin_pb2.ConfigurePluginRequest(
        tenant="shop", plugin="crm_adapter", enabled=True,
        settings_json=json.dumps({"base_url": crm, "api_key": "crm-api-key-123"})), plugin_pb2.ConfigurePluginReply)
    config = await (await bus.js.key_value(KV_PLUGIN_CONFIG)).get("shop.crm_adapter")
    assert is_sealed(config.value) and b"crm-api-key-123" not in config.value

    call_id = uuid.uuid4().hex
    reply = await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"}, call_id=call_id, lang="zh")
    assert "SF5550001111" in json.loads(reply.result_json)["message"]
    stored = await (await bus.js.key_value(KV_PLUGIN_CALLS)).get(call_id)
    assert is_sealed(stored.value) and b"SF5550001111" not in stored.value
    again = await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"}, call_id=call_id)
    assert again.replayed and again.result_json == reply.result_json
    await bus.request("kefu.plugins.configure", plugin_pb2.ConfigurePluginRequest(
        tenant="other", plugin="crm_adapter", enabled=True, settings_json=json.dumps({"base_url": crm})),
        plugin_pb2.ConfigurePluginReply)
    with pytest.raises(Conflict):  # another tenant cannot read a result through its call id
        await call(bus, "crm_adapter.order_status", {"order_id": "20261124001"}, tenant="other", call_id=call_id)

    # A refund confirmed by the visitor, the confirmation's body sealed as dialogue writes it.
    await bus.request("kefu.plugins.configure", plugin_pb2.ConfigurePluginRequest(
        tenant="shop", plugin="payment", enabled=True, settings_json=json.dumps({"base_url": crm})),
        plugin_pb2.ConfigurePluginReply)
    args = json.dumps({"order_id": "20261124001", "reason": "damaged"})
    cid, refund_call = uuid.uuid4().hex, uuid.uuid4().hex
    ev = events_pb2.Event(id=uuid.uuid4().hex, conversation_id=cid, tenant="shop", seq=1,
                          ts_ms=int(time.time() * 1000), writer="test")
    ev.tool_confirmed.CopyFrom(events_pb2.ToolCallConfirmed(
        call_id=refund_call, plugin="payment", tool="create_refund", by="visitor", message_seq=1,
        arguments_sha256=hashlib.sha256(args.encode()).hexdigest()))
    pb = await seal_event(Keyring(bus.js, MASTER), ev)
    assert pb.WhichOneof("body") == "sealed"
    ack = await bus.js.publish(conv_subject("shop", cid), pb.SerializeToString())
    req = plugin_pb2.ToolCallRequest(tenant="shop", plugin="payment", tool="create_refund", arguments_json=args,
                                     call_id=refund_call, conversation_id=cid, confirmation_stream_seq=ack.seq)
    done = await bus.request("kefu.plugins.call", req, plugin_pb2.ToolCallReply)
    assert json.loads(done.result_json)["refund"]["refund_id"] == "R0001"
