"""The kefu.v1 gRPC API over a real channel, with health and reflection."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
async def channel(stack):
    async with grpc.aio.insecure_channel(stack.grpc) as ch:
        yield ch


def auth(token):
    return (("authorization", f"Bearer {token}"),)


async def test_knowledge_and_conversation_over_grpc(channel, stack, unique):
    tenant = unique("g")
    kb = knowledge_pb2_grpc.KnowledgeStub(channel)
    up = await kb.Upsert(knowledge_pb2.UpsertRequest(tenant=tenant, doc_id="lamp", title="Desk lamp L2",
                                                     text="The L2 desk lamp costs 129 yuan."),
                         metadata=auth(stack.admin), timeout=10)
    assert up.doc_id == "lamp" and up.version > 0
    found = await kb.Search(knowledge_pb2.SearchRequest(tenant=tenant, query="L2 lamp", k=3),
                            metadata=auth(stack.admin), timeout=20)
    assert found.hits[0].doc_id == "lamp"

    conv = conversations_pb2_grpc.ConversationsStub(channel)
    started = await conv.Start(conversations_pb2.StartRequest(tenant=tenant, visitor_id="g1"), timeout=10)
    chunks = [c async for c in conv.SendMessage(conversations_pb2.SendMessageRequest(
        conversation_id=started.conversation_id, text="How much is the L2 desk lamp?"),
        metadata=auth(started.visitor_token), timeout=90)]
    assert chunks[0].WhichOneof("chunk") == "delta" and chunks[-1].WhichOneof("chunk") == "done"
    done = chunks[-1].done
    assert "129" in done.reply.text and list(done.reply.citations) == ["lamp"] and done.seq == 1

    state = await conv.Get(conversations_pb2.GetRequest(conversation_id=started.conversation_id),
                           metadata=auth(started.visitor_token), timeout=10)
    assert [t.role for t in state.turns] == ["visitor", "bot"] and state.tenant == tenant
    past = await conv.StateAt(conversations_pb2.StateAtRequest(conversation_id=started.conversation_id, at_seq=1),
                              metadata=auth(stack.admin), timeout=10)
    assert len(past.turns) == 1

    async def requests():
        yield conversations_pb2.ConverseRequest(conversation_id=started.conversation_id, text="转人工")

    out = [r async for r in conv.Converse(requests(), metadata=auth(started.visitor_token), timeout=60)]
    assert out[-1].reply.reply.source == "handoff"


async def test_grpc_errors_are_statuses(channel, stack, unique):
    kb = knowledge_pb2_grpc.KnowledgeStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await kb.Upsert(knowledge_pb2.UpsertRequest(tenant="t", doc_id="d", text="x"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await kb.Upsert(knowledge_pb2.UpsertRequest(tenant="t", doc_id="d", text="x"), metadata=auth("nope"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await kb.Upsert(knowledge_pb2.UpsertRequest(tenant="a.b", doc_id="d", text="x"), metadata=auth(stack.admin),
                        timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    conv = conversations_pb2_grpc.ConversationsStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await conv.Get(conversations_pb2.GetRequest(conversation_id=unique("c")), metadata=auth(stack.admin), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    # Bytes that are not a protobuf message: INVALID_ARGUMENT, and the server keeps serving.
    raw = channel.unary_unary("/kefu.v1.Knowledge/Search", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw(b"\xff\xff\xff\xff", metadata=auth(stack.admin), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kefu.v1.Conversations", "kefu.v1.Knowledge"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    [answer] = [r async for r in refl.ServerReflectionInfo(ask(), timeout=5)]
    names = {s.name for s in answer.list_services_response.service}
    assert {"kefu.v1.Conversations", "kefu.v1.Knowledge", "grpc.health.v1.Health"} <= names
