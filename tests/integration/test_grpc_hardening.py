"""gRPC limits a client can run into: deadlines (the client's, and the server's own when it brings none),
message sizes either way, and a graceful shutdown that lets the calls in flight finish."""

import asyncio
import contextlib
import time

import grpc
import nats.js.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.proto.bus.v1 import llm_pb2, turn_pb2
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from kefu.shared.service import start_in_background
from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE, STREAM_CONV, conv_subject

pytestmark = [pytest.mark.integration, pytest.mark.model]


def auth(token):
    return (("authorization", f"Bearer {token}"),)


def error_code(exc: grpc.aio.AioRpcError) -> str:
    return dict(exc.trailing_metadata() or ()).get("kefu-error-code", "")


@contextlib.asynccontextmanager
async def gateway(stack, **overrides):
    """A second gateway on the test stack's services, with its own settings."""
    svc = GatewayService(GatewaySettings(nats_url=stack.nats_url, data_dir=stack.data_dir, http_port=0, grpc_port=0,
                                         log_level="warning", **overrides))
    stop = asyncio.Event()
    task = await start_in_background(svc, stop)
    try:
        yield svc, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def busy_model(bus, unique):
    """A long job holds the model, so the next turn's generation waits for it (a slow turn on purpose)."""
    filler = llm_pb2.GenerateRequest(job_id=unique("filler"), max_tokens=400, reply_inbox=unique("nobody"),
                                     deadline_ms=int((time.time() + 60) * 1000),
                                     messages=[llm_pb2.ChatMessage(role="user", content="Write a long story.")])
    for _ in range(300):
        try:
            await bus.js.publish(LLM_GENERATE, filler.SerializeToString())
            break
        except nats.js.errors.APIError:
            await asyncio.sleep(0.1)
    try:
        yield
    finally:
        await bus.nc.publish(LLM_CANCEL, filler.job_id.encode())


async def lamp_conversation(conv, admin, kb, unique):
    tenant = unique("lamp")
    await kb.Upsert(knowledge_pb2.UpsertRequest(tenant=tenant, doc_id="l2", title="L2 Lamp",
                                                text="The L2 desk lamp costs 129 yuan."), metadata=auth(admin), timeout=10)
    started = await conv.Start(conversations_pb2.StartRequest(tenant=tenant), timeout=10)
    return started.conversation_id, started.visitor_token, tenant


async def events_logged(bus, tenant, cid) -> int:
    """How many events stream CONV holds for the conversation (the visitor message is there before any reply)."""
    info = await bus.js.stream_info(STREAM_CONV, subjects_filter=conv_subject(tenant, cid))
    return sum((info.state.subjects or {}).values())


async def bot_turns(bus, cid, wait=10.0):
    deadline = time.monotonic() + wait
    while True:
        state = await bus.request("kefu.dialogue.get", turn_pb2.GetStateRequest(conversation_id=cid),
                                  turn_pb2.ConversationState)
        bots = [t for t in state.turns if t.role == "bot"]
        if bots or time.monotonic() > deadline:
            return state, bots
        await asyncio.sleep(0.1)


async def test_a_call_without_a_deadline_gets_the_servers_and_the_turn_stops(stack, bus, unique):
    async with gateway(stack, grpc_max_call_s=0.5) as (svc, _, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel:
        conv = conversations_pb2_grpc.ConversationsStub(channel)
        cid, tok, _ = await lamp_conversation(conv, stack.admin, knowledge_pb2_grpc.KnowledgeStub(channel), unique)
        async with busy_model(bus, unique):
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in conv.SendMessage(conversations_pb2.SendMessageRequest(
                        conversation_id=cid, text="How much is the L2 lamp?"), metadata=auth(tok)):
                    pass
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and error_code(exc.value) == "deadline_exceeded"
            assert time.monotonic() - t0 < 3
            # The turn was cancelled at dialogue too: its reply is recorded without waiting for the model.
            _, bots = await bot_turns(bus, cid)
            assert bots and bots[0].provenance.generation_error == "visitor_left" and "129 yuan" in bots[0].text
        # Quick calls are untouched by the cap.
        state = await conv.Get(conversations_pb2.GetRequest(conversation_id=cid), metadata=auth(tok))
        assert [t.role for t in state.turns] == ["visitor", "bot"]


async def test_the_clients_deadline_is_honoured(stack, bus, unique):
    async with grpc.aio.insecure_channel(stack.grpc) as channel:
        conv = conversations_pb2_grpc.ConversationsStub(channel)
        cid, tok, _ = await lamp_conversation(conv, stack.admin, knowledge_pb2_grpc.KnowledgeStub(channel), unique)
        async with busy_model(bus, unique):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in conv.SendMessage(conversations_pb2.SendMessageRequest(
                        conversation_id=cid, text="How much is the L2 lamp?"), metadata=auth(tok), timeout=0.5):
                    pass
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            left = time.monotonic()
            _, bots = await bot_turns(bus, cid)
            assert bots and bots[0].provenance.generation_error == "visitor_left"
            assert time.monotonic() - left < 3  # the server stopped waiting for the model at once


async def test_oversized_messages_are_resource_exhausted(stack, unique):
    async with grpc.aio.insecure_channel(stack.grpc, options=[("grpc.max_send_message_length", -1)]) as channel:
        kb = knowledge_pb2_grpc.KnowledgeStub(channel)
        tenant = unique("big")
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # past the 8 MiB gRPC limit: refused by grpc itself
            await kb.Upsert(knowledge_pb2.UpsertRequest(tenant=tenant, doc_id="d", text="x" * (9 * 1024 * 1024)),
                            metadata=auth(stack.admin), timeout=30)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # within it, past the 4 MiB document limit: typed
            await kb.Upsert(knowledge_pb2.UpsertRequest(tenant=tenant, doc_id="d", text="x" * (5 * 1024 * 1024)),
                            metadata=auth(stack.admin), timeout=30)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_code(exc.value) == "payload_too_large"
        found = await kb.Search(knowledge_pb2.SearchRequest(tenant=tenant, query="x", k=3), metadata=auth(stack.admin),
                                timeout=20)
        assert list(found.hits) == []  # nothing of either was stored

    # The send side: a gateway whose limit is smaller than the state it would answer with.
    async with gateway(stack, grpc_max_message_bytes=2048) as (svc, _, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel:
        conv = conversations_pb2_grpc.ConversationsStub(channel)
        started = await conv.Start(conversations_pb2.StartRequest(tenant=unique("small")), timeout=10)
        meta = auth(started.visitor_token)
        for text in ("a" * 1500, "b" * 1500):
            [c async for c in conv.SendMessage(conversations_pb2.SendMessageRequest(
                conversation_id=started.conversation_id, text=text), metadata=meta, timeout=60)]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await conv.Get(conversations_pb2.GetRequest(conversation_id=started.conversation_id), metadata=meta,
                           timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await conv.SendMessage(conversations_pb2.SendMessageRequest(
                conversation_id=started.conversation_id, text="c" * 3000), metadata=meta, timeout=10).read()
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_graceful_shutdown_finishes_calls_in_flight_and_refuses_new_ones(stack, bus, unique):
    async with gateway(stack, grpc_grace=30) as (svc, stop, task):
        address = f"127.0.0.1:{svc.grpc_port}"
        async with grpc.aio.insecure_channel(address) as channel:
            conv = conversations_pb2_grpc.ConversationsStub(channel)
            cid, tok, tenant = await lamp_conversation(conv, stack.admin, knowledge_pb2_grpc.KnowledgeStub(channel),
                                                       unique)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            async with busy_model(bus, unique):
                call = conv.SendMessage(conversations_pb2.SendMessageRequest(
                    conversation_id=cid, text="How much is the L2 lamp?"), metadata=auth(tok), timeout=60)
                reading = asyncio.ensure_future(_chunks(call))
                for _ in range(100):  # the message is in (after Started): the call is in flight at dialogue
                    if await events_logged(bus, tenant, cid) >= 2:
                        break
                    await asyncio.sleep(0.05)
                assert not reading.done()

                stop.set()
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                refused = None
                for _ in range(50):
                    async with grpc.aio.insecure_channel(address) as fresh:
                        try:
                            await conversations_pb2_grpc.ConversationsStub(fresh).Start(
                                conversations_pb2.StartRequest(tenant=unique("late")), timeout=2)
                        except grpc.aio.AioRpcError as exc:
                            refused = exc.code()
                            break
                    await asyncio.sleep(0.05)
                assert refused == grpc.StatusCode.UNAVAILABLE
                assert not reading.done()  # still waiting for the model
                chunks = await asyncio.wait_for(reading, 40)
        assert chunks[-1].WhichOneof("chunk") == "done" and "129 yuan" in chunks[-1].done.reply.text
        await asyncio.wait_for(task, 30)


async def _chunks(call):
    return [c async for c in call]
