"""Floods at ten times the configured rate limits — per conversation (HTTP, the visitor WebSocket, gRPC),
per client address, per tenant, and conversation starts per address — against a gateway process with
small limits, generation on: every refused call gets 429 with Retry-After (HTTP), an ``error`` frame
``rate_limited`` (WebSocket) or RESOURCE_EXHAUSTED with ``kefu-error-code: rate_limited`` (gRPC), and
none reaches dialogue or the model: dialogue's turn count (its /metrics) grows by the accepted messages
exactly, the gateway's ``rate_limited`` count by the refused ones, and the generation jobs queued for the
model on ``kefu.llm.generate`` number no more than the accepted messages. No inference replica runs (the
jobs are counted where they enter the model's queue; dialogue answers with the cited sentence after
0.5 s), so the test does not wait for the model on a busy machine.

Malformed and oversized input on every transport is tests/integration/test_fuzz.py's (HTTP bodies,
invalid UTF-8, bad JSON, WebSocket frames past the limit or not UTF-8, malformed protobuf) and
test_grpc_hardening.py's (gRPC messages past the limit); what they do not send is a body streamed
without a Content-Length, below."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import nats
import pytest

from bench.load import ADMIN
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc
from kefu.shared.streams import LLM_GENERATE

pytestmark = [pytest.mark.integration, pytest.mark.model]

# The configured limits of the flooded gateway (tokens per second, burst). Each scope's flood comes from
# its own tenant, addresses and conversations, so only the limit under test binds.
CONV = (1.0, 2.0)
ADDRESS = (2.0, 3.0)
TENANT_LIMIT = (3.0, 4.0)
STARTS = (2.0, 3.0)
LIMITS = {
    "KEFU_RATE_MESSAGES_PER_SECOND": str(CONV[0]), "KEFU_RATE_MESSAGES_BURST": str(CONV[1]),
    "KEFU_RATE_IP_MESSAGES_PER_SECOND": str(ADDRESS[0]), "KEFU_RATE_IP_MESSAGES_BURST": str(ADDRESS[1]),
    "KEFU_RATE_TENANT_MESSAGES_PER_SECOND": str(TENANT_LIMIT[0]),
    "KEFU_RATE_TENANT_MESSAGES_BURST": str(TENANT_LIMIT[1]),
    "KEFU_RATE_STARTS_PER_SECOND": str(STARTS[0]), "KEFU_RATE_STARTS_BURST": str(STARTS[1]),
    "KEFU_FORWARDED_HOPS": "1",  # the flood's addresses are X-Forwarded-For's, as behind a proxy
}
FLOOD_S = 2.0
LAMP = {"title": "Desk lamp L2", "text": "The L2 desk lamp costs 129 yuan and has three brightness levels."}
QUESTION = "How much is the L2 desk lamp?"


def allowed(limit: tuple[float, float], seconds: float) -> float:
    """The most a token bucket lets through in ``seconds`` (a token of slack for the timing)."""
    rate, burst = limit
    return burst + rate * seconds + 1


async def flood(times: float, rate: float, call: Callable[[int], Awaitable[Any]]) -> tuple[list[Any], float]:
    """``call(i)`` started at ``rate`` per second for ``times`` calls, none waiting for another."""
    t0 = time.monotonic()

    async def at(i: int) -> Any:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        return await call(i)

    results = await asyncio.gather(*(at(i) for i in range(int(times))))
    return results, time.monotonic() - t0


def xff(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def start(s: aiohttp.ClientSession, base: str, tenant: str, address: str) -> tuple[str, str]:
    async with s.post(f"{base}/v1/tenants/{tenant}/conversations", json={}, headers=xff(address)) as r:
        assert r.status == 201, await r.text()
        body = await r.json()
    return body["conversation_id"], body["visitor_token"]


async def post_message(s: aiohttp.ClientSession, base: str, cid: str, token: str, address: str) -> str:
    """'ok', or the refusal's code (after checking it is a proper 429)."""
    async with s.post(f"{base}/v1/conversations/{cid}/messages", json={"text": QUESTION},
                      headers={"Authorization": f"Bearer {token}", **xff(address)}) as r:
        body = await r.json()
        if r.status == 200:
            assert body["reply"]["citations"] == ["lamp"], body
            return "ok"
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1, (r.status, body)
        return body["error"]["code"]


async def test_floods_at_ten_times_the_limits_are_refused_and_never_reach_the_model(load_stack):
    stack = load_stack
    # Generation on: every accepted message queues a job for the model (answered from the cited sentence
    # when no replica takes it within 0.5 s).
    await stack.phase("faq", 1, os.cpu_count() or 2, KEFU_LLM_ENABLED="true", KEFU_LLM_FIRST_CHUNK_TIMEOUT="0.5")
    nc = await nats.connect(stack.nats.url)
    jobs = 0

    async def job(_: Any) -> None:
        nonlocal jobs
        jobs += 1

    await nc.subscribe(LLM_GENERATE, cb=job)
    proc = stack.start("gateway", **LIMITS)
    await stack.ready(["gateway"])
    base, grpc_addr = f"http://127.0.0.1:{stack.http_ports[proc.pid]}", f"127.0.0.1:{stack.grpc_ports[proc.pid]}"
    run = uuid.uuid4().hex[:6]
    tenants = {scope: f"flood-{scope}-{run}" for scope in ("conv", "address", "tenant", "starts")}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    accepted = refused = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for tenant in tenants.values():
            async with s.put(f"{stack.base}/v1/tenants/{tenant}/documents/lamp", json=LAMP, headers=admin) as r:
                assert r.status == 200
        for tenant in tenants.values():  # searchable before the floods
            while True:
                async with s.get(f"{stack.base}/v1/tenants/{tenant}/search", params={"q": "L2 desk lamp"},
                                 headers=admin) as r:
                    if (await r.json())["hits"]:
                        break
                await asyncio.sleep(0.2)
        jobs0 = jobs
        turns0 = (await stack.scrape("dialogue")).get("kefu_turn_duration_seconds_count", 0.0)
        refusals0 = (await stack.scrape("gateway")).get('kefu_errors_total{code="rate_limited",service="gateway"}', 0)

        def tally(results: list[str], limit: tuple[float, float], elapsed: float, what: str) -> None:
            nonlocal accepted, refused
            ok = results.count("ok")
            assert set(results) <= {"ok", "rate_limited"}, (what, results)
            assert 1 <= ok <= allowed(limit, elapsed), (what, ok, len(results))
            accepted += ok
            refused += len(results) - ok

        # One conversation over HTTP at 10x its limit.
        conv_rate = 10 * CONV[0]
        cid, token = await start(s, base, tenants["conv"], "10.1.0.1")
        results, elapsed = await flood(conv_rate * FLOOD_S, conv_rate,
                                       lambda i: post_message(s, base, cid, token, "10.1.0.1"))
        tally(results, CONV, elapsed, "conversation, HTTP")

        # Another over the visitor socket: an error frame per refused message, a reply per accepted one.
        cid, token = await start(s, base, tenants["conv"], "10.1.0.2")
        async with s.ws_connect(f"{base}/v1/ws?token={token}", headers=xff("10.1.0.2")) as ws:
            sent = int(conv_rate * FLOOD_S)
            _, elapsed = await flood(sent, conv_rate, lambda i: ws.send_json(
                {"type": "message", "text": QUESTION, "client_msg_id": f"m{i}"}))
            results = []
            while len(results) < sent:
                frame = await ws.receive_json(timeout=60)
                if frame["type"] == "reply":
                    assert frame["reply"]["citations"] == ["lamp"], frame
                    results.append("ok")
                elif frame["type"] == "error":
                    results.append(frame["code"])
        tally(results, CONV, elapsed, "conversation, WebSocket")

        # A third over gRPC (SendMessage).
        cid, token = await start(s, base, tenants["conv"], "10.1.0.3")
        async with grpc.aio.insecure_channel(grpc_addr) as ch:
            stub = conversations_pb2_grpc.ConversationsStub(ch)

            async def send_grpc(i: int) -> str:
                call = stub.SendMessage(conversations_pb2.SendMessageRequest(conversation_id=cid, text=QUESTION),
                                        metadata=(("authorization", f"Bearer {token}"),
                                                  ("x-forwarded-for", "10.1.0.3")), timeout=120)
                try:
                    async for _ in call:
                        pass
                    return "ok"
                except grpc.aio.AioRpcError as exc:
                    trailers = dict(exc.trailing_metadata() or ())
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert int(trailers["retry-after"]) >= 1
                    return trailers["kefu-error-code"]

            results, elapsed = await flood(conv_rate * FLOOD_S, conv_rate, send_grpc)
        tally(results, CONV, elapsed, "conversation, gRPC")

        # One address, a new conversation for every message (each within its own limit).
        rate = 10 * ADDRESS[0]
        convs = await asyncio.gather(*(start(s, base, tenants["address"], f"10.2.{i // 250}.{i % 250}")
                                       for i in range(int(rate * FLOOD_S))))
        results, elapsed = await flood(len(convs), rate, lambda i: post_message(s, base, *convs[i], "10.2.255.1"))
        tally(results, ADDRESS, elapsed, "address")

        # One tenant, every message from its own address and conversation.
        rate = 10 * TENANT_LIMIT[0]
        addresses = [f"10.3.{i // 250}.{i % 250}" for i in range(int(rate * FLOOD_S))]
        convs = await asyncio.gather(*(start(s, base, tenants["tenant"], a) for a in addresses))
        results, elapsed = await flood(len(convs), rate,
                                       lambda i: post_message(s, base, *convs[i], addresses[i]))
        tally(results, TENANT_LIMIT, elapsed, "tenant")

        # Conversation starts from one address.
        async def start_one(_: int) -> str:
            async with s.post(f"{base}/v1/tenants/{tenants['starts']}/conversations", json={},
                              headers=xff("10.4.0.1")) as r:
                if r.status == 201:
                    return "ok"
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                return (await r.json())["error"]["code"]

        results, elapsed = await flood(10 * STARTS[0] * FLOOD_S, 10 * STARTS[0], start_one)
        assert set(results) <= {"ok", "rate_limited"} and 1 <= results.count("ok") <= allowed(STARTS, elapsed)
        starts_refused = results.count("rate_limited")

    # Nothing refused went further than the gateway.
    assert refused >= 3 * accepted, (accepted, refused)  # 10x the rate: most of each flood (about 4/5)
    turns = (await stack.scrape("dialogue")).get("kefu_turn_duration_seconds_count", 0.0) - turns0
    assert turns == accepted, (turns, accepted)
    refusals = (await stack.scrape("gateway")).get('kefu_errors_total{code="rate_limited",service="gateway"}', 0)
    assert refusals - refusals0 == refused + starts_refused
    await nc.flush()
    await nc.close()
    assert 1 <= jobs - jobs0 <= accepted, (jobs - jobs0, accepted)  # jobs for the accepted messages only
    with contextlib.suppress(KeyError):
        stack.procs["gateway"].remove(proc)
    proc.terminate()
    proc.wait(30)


async def chunked_post(base: str, path: str, token: str, content_type: str, head: bytes, tail: bytes,
                       total: int | None) -> tuple[int, bytes]:
    """POST ``head``, ``total`` bytes of filler (or filler without end) and ``tail`` in chunks, without a
    Content-Length, over a raw connection that reads the answer while still sending: (status, body)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    async def send() -> None:
        filler = b"x" * 65536
        sent = 0
        with contextlib.suppress(ConnectionError):
            writer.write(chunk(head))
            while total is None or sent < total:
                writer.write(chunk(filler))
                await writer.drain()
                sent += len(filler)
            writer.write(chunk(tail) + b"0\r\n\r\n")
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        status = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
    return status, body


async def test_a_body_without_content_length_past_the_limit_is_413(load_stack):
    """Chunked bodies (no Content-Length to refuse up front), a message and an image upload: one just past
    its limit, and one that never ends (read up to the 64 MB drain limit, then refused, not read forever);
    each answered 413 payload_too_large, and the gateway serves the next request."""
    stack = load_stack
    if "gateway" not in stack.procs:
        await stack.phase("faq", 1, os.cpu_count() or 2)
    base = stack.base
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        cid, token = await start(s, base, "chunked", "10.5.0.1")
        cases = [(f"/v1/conversations/{cid}/messages", "application/json", b'{"text": "', b'"}', 2 * 65536),
                 (f"/v1/conversations/{cid}/messages", "application/json", b'{"text": "', b'"}', None),
                 (f"/v1/conversations/{cid}/images", "multipart/form-data; boundary=b", part, b"\r\n--b--\r\n",
                  11 * 1024 * 1024),
                 (f"/v1/conversations/{cid}/images", "multipart/form-data; boundary=b", part, b"\r\n--b--\r\n",
                  None)]
        for path, content_type, head, tail, total in cases:
            status, body = await chunked_post(base, path, token, content_type, head, tail, total)
            assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large", (path, total, body)
        async with s.get(f"{base}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200 and (await r.json())["turns"] == []
