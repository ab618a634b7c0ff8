"""Rate limits per tenant, per client address and per conversation, on every transport: 429 with
Retry-After over HTTP, an ``error`` frame ``rate_limited`` on the visitor socket, RESOURCE_EXHAUSTED
(with a retry-after trailer) over gRPC — against a gateway replica with small limits."""

import asyncio
import contextlib
import io

import aiohttp
import grpc
import pytest
from PIL import Image

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model]

SLOW = 0.001  # tokens per second: nothing refills during the test


@contextlib.asynccontextmanager
async def gateway(stack, **limits):
    svc = GatewayService(GatewaySettings(nats_url=stack.nats_url, data_dir=stack.data_dir, http_port=0, grpc_port=0,
                                         log_level="warning", **limits))
    stop = asyncio.Event()
    task = await start_in_background(svc, stop)
    try:
        yield svc
    finally:
        stop.set()
        await task


async def start(s, base, tenant):
    async with s.post(f"{base}/v1/tenants/{tenant}/conversations", json={}) as r:
        assert r.status == 201, await r.text()
        conv = await r.json()
    return conv["conversation_id"], conv["visitor_token"]


async def ask(s, base, cid, token):
    async with s.post(f"{base}/v1/conversations/{cid}/messages", json={"text": "转人工"},
                      headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(), r.headers


async def test_messages_are_limited_per_tenant_on_every_transport(stack, unique):
    tenant, other = unique("lt"), unique("lo")
    async with gateway(stack, rate_tenant_messages_per_second=SLOW, rate_tenant_messages_burst=3) as gw, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        base = f"http://127.0.0.1:{gw.http_port}"
        convs = [await start(s, base, tenant) for _ in range(4)]
        for cid, token in convs[:3]:  # three conversations of the tenant use its three tokens
            assert (await ask(s, base, cid, token))[0] == 200
        status, body, headers = await ask(s, base, *convs[3])
        assert status == 429 and body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
        assert (await ask(s, base, *(await start(s, base, other))))[0] == 200  # another tenant is not held back

        async with s.ws_connect(f"{base}/v1/ws?token={convs[3][1]}") as ws:
            await ws.send_json({"type": "message", "text": "转人工"})
            while (frame := await ws.receive_json(timeout=10))["type"] != "error":
                pass
            assert frame["code"] == "rate_limited"

        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as ch:
            call = conversations_pb2_grpc.ConversationsStub(ch).SendMessage(
                conversations_pb2.SendMessageRequest(conversation_id=convs[3][0], text="转人工"),
                metadata=(("authorization", f"Bearer {convs[3][1]}"),), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
            trailers = dict(exc.value.trailing_metadata())
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert trailers["kefu-error-code"] == "rate_limited" and int(trailers["retry-after"]) >= 1
        async with s.get(f"{base}/v1/conversations/{convs[3][0]}", headers={"Authorization": f"Bearer {stack.admin}"}) as r:
            assert (await r.json())["turns"] == []  # none of the refused messages became a turn


async def test_messages_are_limited_per_client_address(stack, unique):
    async with gateway(stack, rate_ip_messages_per_second=SLOW, rate_ip_messages_burst=2) as gw, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        base = f"http://127.0.0.1:{gw.http_port}"
        convs = [await start(s, base, unique("ip")) for _ in range(3)]  # three tenants, one address
        assert [(await ask(s, base, *c))[0] for c in convs] == [200, 200, 429]


async def test_starts_are_limited_per_tenant(stack, unique):
    tenant = unique("st")
    async with gateway(stack, rate_tenant_starts_per_second=SLOW, rate_tenant_starts_burst=2) as gw, \
            aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{gw.http_port}"
        statuses = []
        for _ in range(3):
            async with s.post(f"{base}/v1/tenants/{tenant}/conversations", json={}) as r:
                statuses.append(r.status)
        assert statuses == [201, 201, 429]
        await start(s, base, unique("st"))  # another tenant still starts
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await conversations_pb2_grpc.ConversationsStub(ch).Start(
                    conversations_pb2.StartRequest(tenant=tenant), timeout=10)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_uploads_are_limited_per_conversation(stack, unique):
    out = io.BytesIO()
    Image.new("RGB", (48, 48), "white").save(out, "PNG")
    async with gateway(stack, rate_uploads_per_second=SLOW, rate_uploads_burst=1) as gw, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{gw.http_port}"
        cid, token = await start(s, base, unique("up"))
        statuses = []
        for _ in range(2):
            form = aiohttp.FormData()
            form.add_field("file", out.getvalue(), filename="a.png", content_type="image/png")
            async with s.post(f"{base}/v1/conversations/{cid}/images", data=form,
                              headers={"Authorization": f"Bearer {token}"}) as r:
                statuses.append((r.status, r.headers.get("Retry-After") is not None))
        assert statuses == [(200, False), (429, True)]
        assert (await ask(s, base, cid, token))[0] == 200  # messages have their own bucket
