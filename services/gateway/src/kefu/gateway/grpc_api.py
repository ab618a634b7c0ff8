"""The gRPC API (package kefu.v1): Conversations and Knowledge, with health and reflection."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kefu.gateway.auth import Auth, bearer
from kefu.gateway.core import Core, Delta
from kefu.proto.bus.v1 import turn_pb2
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from kefu.shared.errors import BadRequest, Internal, KefuError
from kefu.shared.logging import get_logger

log = get_logger("kefu.gateway.grpc")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


async def _abort(context: grpc.aio.ServicerContext, exc: KefuError) -> None:
    context.set_trailing_metadata((("kefu-error-code", exc.code),))
    await context.abort(exc.grpc_status, exc.message)


def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map KefuError (and anything unexpected) to a gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except KefuError as exc:
            await _abort(context, exc)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception:
            log.exception("grpc handler failed", method=fn.__name__)
            await _abort(context, Internal("internal error"))

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except KefuError as exc:
            await _abort(context, exc)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception:
            log.exception("grpc stream failed", method=fn.__name__)
            await _abort(context, Internal("internal error"))

    return wrapper


class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


async def _reject(context: grpc.aio.ServicerContext, bad: _Malformed) -> None:
    context.set_trailing_metadata((("kefu-error-code", "invalid_protobuf"),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {bad.error}")


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Turns undecodable request bytes into INVALID_ARGUMENT (grpc would answer UNKNOWN)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def safe(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Malformed(str(exc))

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                return await inner(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                async for item in inner_us(request, context):
                    yield item

            return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                async def checked() -> AsyncIterator[Any]:
                    async for r in requests:
                        if isinstance(r, _Malformed):
                            await _reject(context, r)
                        yield r

                async for item in inner_ss(checked(), context):
                    yield item

            return handler._replace(request_deserializer=safe, stream_stream=stream_stream)
        return handler


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer(value if isinstance(value, str) else value.decode())
    return None


def _reply(r: turn_pb2.TurnReply) -> conversations_pb2.FinalReply:
    return conversations_pb2.FinalReply(seq=r.seq, reply=conversations_pb2.Reply(
        text=r.reply.text, source=r.reply.source, citations=list(r.reply.citations)))


def _state(s: turn_pb2.ConversationState) -> conversations_pb2.ConversationState:
    pb = conversations_pb2.ConversationState(conversation_id=s.conversation_id, tenant=s.tenant,
                                             mode=s.mode or "bot", seq=s.seq, summary=s.summary)
    for t in s.turns:
        pb.turns.add(seq=t.seq, role=t.role, text=t.text, source=t.source, citations=list(t.citations))
    pb.slots.update(s.slots)
    return pb


class ConversationsService(conversations_pb2_grpc.ConversationsServicer):
    def __init__(self, core: Core, auth: Auth) -> None:
        self.core = core
        self.auth = auth

    @unary
    async def Start(self, request: conversations_pb2.StartRequest, context: Any) -> conversations_pb2.StartResponse:
        cid = await self.core.start_conversation(request.tenant, request.visitor_id)
        return conversations_pb2.StartResponse(conversation_id=cid,
                                               visitor_token=self.auth.issue_visitor(cid, request.tenant))

    @streaming
    async def SendMessage(self, request: conversations_pb2.SendMessageRequest,
                          context: Any) -> AsyncIterator[conversations_pb2.ReplyChunk]:
        self.auth.require_conversation(_token(context), request.conversation_id, admin_ok=False)
        async for item in self.core.send_message(request.conversation_id, request.text, request.client_msg_id):
            if isinstance(item, Delta):
                yield conversations_pb2.ReplyChunk(delta=item.text)
            else:
                yield conversations_pb2.ReplyChunk(done=_reply(item.reply))

    async def Converse(self, request_iterator: AsyncIterator[conversations_pb2.ConverseRequest],
                       context: Any) -> AsyncIterator[conversations_pb2.ConverseResponse]:
        token = _token(context)
        try:
            async for req in request_iterator:
                self.auth.require_conversation(token, req.conversation_id, admin_ok=False)
                async for item in self.core.send_message(req.conversation_id, req.text, req.client_msg_id):
                    if isinstance(item, Delta):
                        yield conversations_pb2.ConverseResponse(delta=item.text)
                    else:
                        yield conversations_pb2.ConverseResponse(reply=_reply(item.reply))
        except KefuError as exc:
            await _abort(context, exc)

    @unary
    async def Get(self, request: conversations_pb2.GetRequest, context: Any) -> conversations_pb2.ConversationState:
        self.auth.require_conversation(_token(context), request.conversation_id, admin_ok=True)
        return _state(await self.core.get_state(request.conversation_id))

    @unary
    async def StateAt(self, request: conversations_pb2.StateAtRequest,
                      context: Any) -> conversations_pb2.ConversationState:
        self.auth.require_admin(_token(context))
        return _state(await self.core.get_state(request.conversation_id, request.at_seq))


class KnowledgeService(knowledge_pb2_grpc.KnowledgeServicer):
    def __init__(self, core: Core, auth: Auth) -> None:
        self.core = core
        self.auth = auth

    @unary
    async def Upsert(self, request: knowledge_pb2.UpsertRequest, context: Any) -> knowledge_pb2.UpsertResponse:
        self.auth.require_admin(_token(context))
        version = await self.core.upsert_document(request.tenant, request.doc_id, request.title, request.text,
                                                  dict(request.metadata))
        return knowledge_pb2.UpsertResponse(doc_id=request.doc_id, version=version)

    @unary
    async def Delete(self, request: knowledge_pb2.DeleteRequest, context: Any) -> knowledge_pb2.DeleteResponse:
        self.auth.require_admin(_token(context))
        await self.core.delete_document(request.tenant, request.doc_id)
        return knowledge_pb2.DeleteResponse(doc_id=request.doc_id)

    @unary
    async def Search(self, request: knowledge_pb2.SearchRequest, context: Any) -> knowledge_pb2.SearchResponse:
        self.auth.require_admin(_token(context))
        k = request.k or 5
        if k > 50:
            raise BadRequest("k must be at most 50", code="invalid_field")
        found = await self.core.search(request.tenant, request.query, k)
        return knowledge_pb2.SearchResponse(hits=[knowledge_pb2.Hit(
            doc_id=h.doc_id, chunk_id=h.chunk_id, title=h.title, text=h.text, score=h.score) for h in found.hits])


async def start_grpc(core: Core, auth: Auth, address: str) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start the gRPC server on ``address`` ("host:port", port 0 for a free one); returns it and its port."""
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()], options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    conversations_pb2_grpc.add_ConversationsServicer_to_server(ConversationsService(core, auth), server)
    knowledge_pb2_grpc.add_KnowledgeServicer_to_server(KnowledgeService(core, auth), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        conversations_pb2.DESCRIPTOR.services_by_name["Conversations"].full_name,
        knowledge_pb2.DESCRIPTOR.services_by_name["Knowledge"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    for name in ("", *names[:2]):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health


