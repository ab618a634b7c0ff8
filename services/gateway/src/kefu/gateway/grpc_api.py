"""The gRPC API (package kefu.v1): Conversations and Knowledge, with health and reflection."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kefu.gateway.auth import Auth, bearer
from kefu.gateway.core import Core, Delta
from kefu.gateway.feed import Feed, Frame
from kefu.gateway.ratelimit import RateLimits, client_address
from kefu.proto.bus.v1 import turn_pb2
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from kefu.shared import metrics
from kefu.shared.errors import BadRequest, DeadlineExceeded, Internal, KefuError, RateLimited
from kefu.shared.logging import get_logger

log = get_logger("kefu.gateway.grpc")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Server-side deadlines for calls that bring none: a turn may take KEFU_TURN_TIMEOUT (90 s) and more.
MAX_CALL_S = 120.0
MAX_STREAM_S = 3600.0


async def _abort(context: grpc.aio.ServicerContext, exc: KefuError) -> None:
    metrics.count_error("gateway", exc.code)
    trailers: tuple[tuple[str, str], ...] = (("kefu-error-code", exc.code),)
    if isinstance(exc, RateLimited):
        trailers += (("retry-after", str(max(1, math.ceil(exc.retry_after)))),)
    context.set_trailing_metadata(trailers)
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
    metrics.count_error("gateway", "invalid_protobuf")
    context.set_trailing_metadata((("kefu-error-code", "invalid_protobuf"),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {bad.error}")


class DeadlineInterceptor(grpc.aio.ServerInterceptor):
    """A deadline on every kefu.v1 call: the client's, capped by a server-side maximum (``max_call_s``,
    ``max_stream_s`` for the bidirectional Converse), so a call without one cannot hold the server for
    ever. Past it the handler is cancelled (a turn in flight is cancelled at dialogue too) and the call
    ends DEADLINE_EXCEEDED."""

    def __init__(self, max_call_s: float, max_stream_s: float) -> None:
        self.max_call_s = max_call_s
        self.max_stream_s = max_stream_s

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/kefu.v1."):
            return handler  # health Watch and reflection streams live as long as their clients want
        loop = asyncio.get_running_loop()

        def deadline(context: Any, cap: float) -> float:
            remaining = context.time_remaining()
            return loop.time() + (cap if remaining is None else min(cap, remaining))

        async def expired(context: Any) -> None:
            exc = DeadlineExceeded("the call ran past its deadline")
            await _abort(context, exc)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    async with asyncio.timeout_at(deadline(context, self.max_call_s)):
                        return await inner(request, context)
                except TimeoutError:
                    await expired(context)

            return handler._replace(unary_unary=unary_unary)

        def stream(inner: Callable[..., AsyncIterator[Any]], cap: float) -> Callable[..., AsyncIterator[Any]]:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                # Only the wait for the next item is timed inside this frame: a timeout around a yield
                # would fire in grpc's code instead, where it cannot become a status.
                when = deadline(context, cap)
                items = inner(request, context)
                try:
                    while True:
                        try:
                            async with asyncio.timeout_at(when):
                                item = await anext(items)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            await expired(context)
                        yield item
                finally:
                    await items.aclose()

            return wrapped

        if handler.unary_stream:
            return handler._replace(unary_stream=stream(handler.unary_stream, self.max_call_s))
        if handler.stream_stream:
            return handler._replace(stream_stream=stream(handler.stream_stream, self.max_stream_s))
        return handler


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
        if handler.unary_stream and not inspect.isasyncgenfunction(handler.unary_stream):
            # A handler that writes with context.write (health's Watch) is a coroutine, not a generator.
            inner_uw = handler.unary_stream

            async def unary_write(request: Any, context: Any) -> None:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                await inner_uw(request, context)

            return handler._replace(request_deserializer=safe, unary_stream=unary_write)
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


def _address(context: grpc.aio.ServicerContext, hops: int) -> str:
    """The client's address ("ipv4:10.0.0.7:50312" -> "10.0.0.7"), or the one X-Forwarded-For names."""
    forwarded = next((v for k, v in context.invocation_metadata() or () if k == "x-forwarded-for"), None)
    kind, _, rest = (context.peer() or "").partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    host = host.strip("[]")  # ipv6:[::1]:50312
    return client_address(host, forwarded if isinstance(forwarded, str) else None, hops)


def _reply(r: turn_pb2.TurnReply) -> conversations_pb2.FinalReply:
    return conversations_pb2.FinalReply(seq=r.seq, reply_seq=r.reply_seq, reply=conversations_pb2.Reply(
        text=r.reply.text, source=r.reply.source, citations=list(r.reply.citations)))


def _converse_response(f: Frame) -> conversations_pb2.ConverseResponse:
    if f.kind == "delta":
        return conversations_pb2.ConverseResponse(delta=f.text, seq=f.seq)
    if f.kind == "agent_message":
        return conversations_pb2.ConverseResponse(agent_message=f.text, seq=f.seq)
    if f.kind == "resync":
        assert f.state is not None
        return conversations_pb2.ConverseResponse(resync=_state(f.state), seq=f.seq)
    assert f.reply is not None
    return conversations_pb2.ConverseResponse(reply=conversations_pb2.FinalReply(
        seq=f.seq, reply_seq=f.reply_seq, reply=conversations_pb2.Reply(
            text=f.reply.text, source=f.reply.source, citations=list(f.reply.citations))), seq=f.reply_seq)


def _state(s: turn_pb2.ConversationState) -> conversations_pb2.ConversationState:
    pb = conversations_pb2.ConversationState(conversation_id=s.conversation_id, tenant=s.tenant,
                                             mode=s.mode or "bot", seq=s.seq, summary=s.summary)
    for t in s.turns:
        pb.turns.add(seq=t.seq, role=t.role, text=t.text, source=t.source, citations=list(t.citations))
    pb.slots.update(s.slots)
    return pb


class ConversationsService(conversations_pb2_grpc.ConversationsServicer):
    def __init__(self, core: Core, auth: Auth, limits: RateLimits | None = None, forwarded_hops: int = 0) -> None:
        self.core = core
        self.auth = auth
        self.limits = limits
        self.forwarded_hops = forwarded_hops

    def _limit_message(self, context: Any, conversation_id: str, tenant: str) -> None:
        if self.limits is not None:
            self.limits.message(_address(context, self.forwarded_hops), conversation_id, tenant)

    @unary
    async def Start(self, request: conversations_pb2.StartRequest, context: Any) -> conversations_pb2.StartResponse:
        if self.limits is not None:
            self.limits.start(_address(context, self.forwarded_hops), self.core.tenant(request.tenant))
        cid = await self.core.start_conversation(request.tenant, request.visitor_id)
        return conversations_pb2.StartResponse(conversation_id=cid,
                                               visitor_token=self.auth.issue_visitor(cid, request.tenant))

    @streaming
    async def SendMessage(self, request: conversations_pb2.SendMessageRequest,
                          context: Any) -> AsyncIterator[conversations_pb2.ReplyChunk]:
        grant = self.auth.require_conversation(_token(context), request.conversation_id, admin_ok=False)
        assert grant is not None
        self._limit_message(context, request.conversation_id, grant.tenant)
        async for item in self.core.send_message(request.conversation_id, request.text, request.client_msg_id):
            if isinstance(item, Delta):
                yield conversations_pb2.ReplyChunk(delta=item.text, seq=item.seq)
            else:
                yield conversations_pb2.ReplyChunk(done=_reply(item.reply), seq=item.reply.reply_seq)

    async def Converse(self, request_iterator: AsyncIterator[conversations_pb2.ConverseRequest],
                       context: Any) -> AsyncIterator[conversations_pb2.ConverseResponse]:
        """One conversation: messages in; deltas, replies and agent messages out, each with its seq. A
        first request with ``last_seq`` is first replayed what came after it (a resync when that cannot
        be). The stream ends once the client has half-closed and its last message is answered."""
        token = _token(context)
        frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        feed: Feed | None = None

        async def read() -> None:
            nonlocal feed
            tenant = ""
            try:
                async for req in request_iterator:
                    if feed is None:
                        grant = self.auth.require_conversation(token, req.conversation_id, admin_ok=False)
                        assert grant is not None
                        tenant = grant.tenant
                        feed = Feed(self.core, req.conversation_id, frames.put_nowait)
                        if req.HasField("last_seq"):
                            await feed.resume(req.last_seq)
                            if not req.text:
                                continue
                    elif req.conversation_id not in ("", feed.cid):
                        raise BadRequest("a Converse stream is about one conversation", code="invalid_field")
                    self._limit_message(context, feed.cid, tenant)
                    # One message at a time, as a visitor types them; agent messages come in meanwhile.
                    await feed.turn(req.text, req.client_msg_id)
            finally:
                frames.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (frame := await frames.get()) is not None:
                if frame.error is not None:
                    raise frame.error
                yield _converse_response(frame)
            reader.result()
        except KefuError as exc:
            await _abort(context, exc)
        finally:
            reader.cancel()
            if feed is not None:
                feed.close()

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


async def start_grpc(core: Core, auth: Auth, address: str, limits: RateLimits | None = None,
                     forwarded_hops: int = 0, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                     max_call_s: float = MAX_CALL_S, max_stream_s: float = MAX_STREAM_S,
                     tls: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start the gRPC server on ``address`` ("host:port", port 0 for a free one); returns it and its port.
    With ``tls`` (see kefu.gateway.app.grpc_tls) it serves TLS only.

    A message larger than ``max_message_bytes`` either way ends the call RESOURCE_EXHAUSTED; calls
    without a deadline get ``max_call_s`` (``max_stream_s`` for Converse).
    """
    interceptors = [MalformedRequestInterceptor(), DeadlineInterceptor(max_call_s, max_stream_s)]
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    conversations_pb2_grpc.add_ConversationsServicer_to_server(ConversationsService(core, auth, limits, forwarded_hops), server)
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
    port = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    for name in ("", *names[:2]):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health


