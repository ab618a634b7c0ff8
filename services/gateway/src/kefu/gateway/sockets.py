"""The WebSocket API of CONTRACT.md: the visitor socket (``/v1/ws``) and the agent console's socket
(``/v1/agent/ws``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from kefu.gateway.agents import AgentDirectory
from kefu.gateway.auth import Auth, Origins, bearer
from kefu.gateway.core import Core
from kefu.gateway.feed import Feed, Frame
from kefu.gateway.ratelimit import RateLimits
from kefu.gateway.wire import JSON_LIMIT, field, frame_json, parse_json_object, state_json, suggestion_json
from kefu.proto.bus.v1 import turn_pb2
from kefu.shared import metrics
from kefu.shared.errors import BadRequest, KefuError, PermissionDenied, Unauthenticated
from kefu.shared.streams import handoff_subject, out_subject

# Close code of an agent socket whose account was removed or whose token stopped counting (4000-4999
# are the application's; 4401 reads as "401 on a socket").
CLOSE_REVOKED = 4401


class Sockets:
    def __init__(self, core: Core, auth: Auth, *, agents: AgentDirectory, limits: RateLimits, origins: Origins,
                 address: Callable[[web.Request], str]) -> None:
        self.core = core
        self.auth = auth
        self.agents = agents
        self.limits = limits
        self.origins = origins
        self.address = address

    def _token(self, request: web.Request) -> str | None:
        return bearer(request.headers.get("Authorization"))

    def _check_origin(self, request: web.Request) -> None:
        """Before the upgrade: a browser page of another site may not open the socket (403 origin_not_allowed)."""
        self.origins.check(request.headers.get("Origin"), request.host)

    async def agent_ws(self, request: web.Request) -> web.StreamResponse:
        """The agent console: the queue of conversations waiting for a person; accept, reply, release.

        Server frames: ``queue`` (on connect), ``handoff`` (a conversation starts waiting), ``accepted``
        (with the state), ``visitor_message``, ``sent``, ``released``, ``error``. ``accepted`` and
        ``visitor_message`` carry ``suggestion`` (``{"text","citations"}``) when the knowledge base answers
        the visitor's (last) question: what the bot would have said. Client frames:
        ``{"type": "accept"|"release", "conversation_id"}``, ``{"type": "reply", "conversation_id", "text"}``.

        A tenant's agent sees and acts on that tenant's conversations only (another's: ``error``
        ``permission_denied``); the admin token and deployment-wide tokens see every tenant. When the
        agent's account is removed (or its token stops counting), the socket closes with code 4401.
        """
        self._check_origin(request)
        token = request.query.get("token") or self._token(request)
        grant = await self.agents.admit(token)
        agent = grant.agent_id
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=JSON_LIMIT)
        await ws.prepare(request)
        lock = asyncio.Lock()
        subs: dict[str, Any] = {}
        tenants: dict[str, str] = {}  # conversation -> its tenant (it never changes)

        async def on_revoked(reason: str) -> None:
            await ws.close(code=CLOSE_REVOKED, message=reason.encode()[:120])

        async def check_tenant(cid: str) -> None:
            if not grant.tenant:
                return
            if cid not in tenants:
                tenants[cid] = (await self.core.get_state(cid)).tenant
            if tenants[cid] != grant.tenant:
                raise PermissionDenied("that conversation belongs to another tenant", code="permission_denied")

        async def send(obj: dict[str, Any]) -> None:
            async with lock:
                if not ws.closed:
                    await ws.send_str(json.dumps(obj, ensure_ascii=False))

        def notice_json(n: turn_pb2.HandoffNotice) -> dict[str, Any]:
            return {"conversation_id": n.conversation_id, "tenant": n.tenant, "summary": n.summary,
                    "last_text": n.last_text, "since_ms": n.ts_ms, "agent_id": n.agent_id}

        async def on_handoff(msg: Any) -> None:
            with contextlib.suppress(Exception):
                await send({"type": "handoff", **notice_json(turn_pb2.HandoffNotice.FromString(msg.data))})

        async def follow(cid: str) -> None:
            async def on_out(msg: Any) -> None:
                with contextlib.suppress(Exception):
                    ev = turn_pb2.OutEvent.FromString(msg.data)
                    if ev.kind == "visitor_message":
                        frame = {"type": "visitor_message", "conversation_id": cid, "text": ev.text, "seq": ev.seq}
                        if ev.HasField("suggestion"):
                            frame["suggestion"] = suggestion_json(ev.suggestion)
                        await send(frame)

            if cid not in subs:
                subs[cid] = await self.core.bus.nc.subscribe(out_subject(cid), cb=on_out)

        handoff_sub = await self.core.bus.nc.subscribe(
            handoff_subject(grant.tenant) if grant.tenant else handoff_subject("*"), cb=on_handoff)
        forget = self.agents.watch(grant, on_revoked)
        try:
            waiting = [notice_json(n) for n in await self.core.waiting() if grant.sees(n.tenant)]
            await send({"type": "queue", "agent_id": agent, "tenant": grant.tenant, "role": grant.role,
                        "conversations": waiting})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        await send({"type": "error", "code": "bad_request", "message": "send JSON text frames"})
                    continue
                try:
                    data = parse_json_object(msg.data)
                    kind = data.get("type")
                    if kind not in ("accept", "reply", "release"):
                        raise BadRequest("type must be accept, reply or release", code="invalid_field")
                    cid = field(data, "conversation_id")
                    text = field(data, "text") if kind == "reply" else ""
                    try:
                        await self.agents.admit(token)  # removed a moment ago: not one more action
                    except Unauthenticated as exc:
                        await on_revoked(exc.message)
                        break
                    await check_tenant(cid)
                    reply = await self.core.agent_action(cid, agent, kind, text)
                    if kind == "accept":
                        await follow(cid)
                        accepted = {"type": "accepted", "conversation_id": cid, "state": state_json(reply.state, admin=True)}
                        if reply.HasField("suggestion"):
                            accepted["suggestion"] = suggestion_json(reply.suggestion)
                        await send(accepted)
                    elif kind == "reply":
                        await send({"type": "sent", "conversation_id": cid, "seq": reply.seq})
                    else:
                        if cid in subs:
                            with contextlib.suppress(Exception):
                                await subs.pop(cid).unsubscribe()
                        await send({"type": "released", "conversation_id": cid, "seq": reply.seq})
                except KefuError as exc:
                    metrics.count_error("gateway", exc.code)
                    await send({"type": "error", "code": exc.code, "message": exc.message})
        finally:
            forget()
            for sub in (handoff_sub, *subs.values()):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return ws

    async def visitor_ws(self, request: web.Request) -> web.StreamResponse:
        """The visitor's socket: client frames ``message`` and ``resume``; server frames ``delta``,
        ``reply``, ``agent_message``, ``resync`` and ``error``, each event with its conversation seq.
        ``?last_seq=N`` (or a ``{"type": "resume", "last_seq": N}`` frame) first replays every event
        after N (:class:`~kefu.gateway.feed.Feed`)."""
        self._check_origin(request)
        token = request.query.get("token") or self._token(request)
        if not token:
            raise Unauthenticated("a visitor token is required (?token=)")
        grant = self.auth.require_visitor(token)
        address = self.address(request)
        raw = request.query.get("last_seq")
        last_seq = None if raw is None else _seq(raw)
        # No permessage-deflate: a compressor per socket costs hundreds of KB for frames of a few words.
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=JSON_LIMIT, compress=False)
        await ws.prepare(request)
        cid = grant.conversation_id
        out = Outbox(ws)
        # Listening starts before any state is read, so nothing published meanwhile is missed.
        feed = Feed(self.core, cid, out.frame)
        # Idle sockets are most of them: nothing is allocated for turns until the first message.
        tasks: set[asyncio.Task[None]] | None = None
        try:
            if last_seq is not None:
                await feed.resume(last_seq)
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        out.error(BadRequest("send JSON text frames"))
                    continue
                try:
                    data = parse_json_object(msg.data)
                    kind = data.get("type")
                    if kind == "resume":
                        await feed.resume(_seq(field(data, "last_seq", kind=int)))
                        continue
                    if kind != "message":
                        raise BadRequest("unknown frame type (expected \"message\" or \"resume\")",
                                         code="invalid_field")
                    text = field(data, "text")
                    cmid = field(data, "client_msg_id", required=False, default="")
                except KefuError as exc:
                    out.error(exc)
                    continue
                task = asyncio.create_task(self._visitor_turn(feed, out, address, grant.tenant, text, cmid))
                tasks = tasks or set()
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            feed.close()
            # The visitor left: in-flight turns stop (and tell dialogue to stop the model's work), but only
            # after their first step, so a message received just before the close still goes out.
            loop = asyncio.get_running_loop()
            for task in tasks or ():
                loop.call_soon(task.cancel)
        return ws

    async def _visitor_turn(self, feed: Feed, out: Outbox, address: str, tenant: str, text: str, cmid: str) -> None:
        try:
            self.limits.message(address, feed.cid, tenant)
            await feed.turn(text, cmid)
        except KefuError as exc:
            out.error(exc)


def _seq(value: str | int) -> int:
    try:
        seq = int(value)
    except ValueError:
        raise BadRequest("last_seq must be an integer", code="invalid_field") from None
    if seq < 0:
        raise BadRequest("last_seq must not be negative", code="invalid_field")
    return seq


class Outbox:
    """A visitor socket's frames, written in order by a task that exists only while there is something to write.

    A reader that falls too far behind is disconnected (1013, try again later) rather than buffered
    without bound; it comes back with its last seq and is replayed what it missed.
    """

    __slots__ = ("_queue", "_writer", "ws")
    LIMIT = 1000

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        # JSON texts to write; None: close the socket (the reader fell behind), nothing after it.
        self._queue: deque[str | None] | None = None
        self._writer: asyncio.Task[None] | None = None

    def frame(self, f: Frame) -> None:
        self.push(frame_json(f))

    def error(self, exc: KefuError) -> None:
        metrics.count_error("gateway", exc.code)
        self.push({"type": "error", "code": exc.code, "message": exc.message})

    def push(self, obj: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        if self._queue is None:
            self._queue = deque()
        elif self._queue and self._queue[-1] is None:
            return  # closing
        if len(self._queue) >= self.LIMIT:
            self._queue.clear()
            self._queue.append(None)
        else:
            self._queue.append(json.dumps(obj, ensure_ascii=False))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._queue and not self.ws.closed:
                text = self._queue.popleft()
                if text is None:
                    await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow: reconnect with last_seq")
                    break
                await self.ws.send_str(text)
        except Exception:  # the socket went away under us: its handler ends on its own
            pass
        finally:
            self._queue = None
            self._writer = None
