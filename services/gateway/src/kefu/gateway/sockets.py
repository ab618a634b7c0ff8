"""The WebSocket API of CONTRACT.md: the visitor socket (``/v1/ws``) and the agent console's socket
(``/v1/agent/ws``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import WSMsgType, web

from kefu.gateway.auth import Auth, bearer
from kefu.gateway.core import Core, Delta
from kefu.gateway.ratelimit import RateLimiter
from kefu.gateway.wire import JSON_LIMIT, field, parse_json_object, reply_json, state_json, suggestion_json
from kefu.proto.bus.v1 import turn_pb2
from kefu.shared.errors import BadRequest, KefuError, Unauthenticated
from kefu.shared.streams import out_subject


class Sockets:
    def __init__(self, core: Core, auth: Auth, *, message_limiter: RateLimiter) -> None:
        self.core = core
        self.auth = auth
        self.message_limiter = message_limiter

    def _token(self, request: web.Request) -> str | None:
        return bearer(request.headers.get("Authorization"))

    async def agent_ws(self, request: web.Request) -> web.StreamResponse:
        """The agent console: the queue of conversations waiting for a person; accept, reply, release.

        Server frames: ``queue`` (on connect), ``handoff`` (a conversation starts waiting), ``accepted``
        (with the state), ``visitor_message``, ``sent``, ``released``, ``error``. ``accepted`` and
        ``visitor_message`` carry ``suggestion`` (``{"text","citations"}``) when the knowledge base answers
        the visitor's (last) question: what the bot would have said. Client frames:
        ``{"type": "accept"|"release", "conversation_id"}``, ``{"type": "reply", "conversation_id", "text"}``.
        """
        agent = self.auth.verify_agent(request.query.get("token") or self._token(request))
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=JSON_LIMIT)
        await ws.prepare(request)
        lock = asyncio.Lock()
        subs: dict[str, Any] = {}

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

        handoff_sub = await self.core.bus.nc.subscribe("kefu.handoff.*", cb=on_handoff)
        try:
            await send({"type": "queue", "agent_id": agent,
                        "conversations": [notice_json(n) for n in await self.core.waiting()]})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = parse_json_object(msg.data)
                    kind = data.get("type")
                    if kind not in ("accept", "reply", "release"):
                        raise BadRequest("type must be accept, reply or release", code="invalid_field")
                    cid = field(data, "conversation_id")
                    text = field(data, "text") if kind == "reply" else ""
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
                    await send({"type": "error", "code": exc.code, "message": exc.message})
        finally:
            for sub in (handoff_sub, *subs.values()):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return ws

    async def visitor_ws(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token") or self._token(request)
        if not token:
            raise Unauthenticated("a visitor token is required (?token=)")
        grant = self.auth.verify_visitor(token)
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=JSON_LIMIT)
        await ws.prepare(request)
        cid = grant.conversation_id
        send_lock = asyncio.Lock()

        async def send(obj: dict[str, Any]) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_str(json.dumps(obj, ensure_ascii=False))

        async def on_out(msg: Any) -> None:
            with contextlib.suppress(Exception):
                ev = turn_pb2.OutEvent.FromString(msg.data)
                if ev.kind == "agent_message":
                    await send({"type": "agent_message", "text": ev.text})

        sub = await self.core.bus.nc.subscribe(out_subject(cid), cb=on_out)
        tasks: set[asyncio.Task[None]] = set()

        async def handle(text: str, cmid: str) -> None:
            try:
                self.message_limiter.check(cid)
                async for item in self.core.send_message(cid, text, cmid):
                    if isinstance(item, Delta):
                        await send({"type": "delta", "text": item.text})
                    else:
                        await send({"type": "reply", **reply_json(item.reply)})
            except KefuError as exc:
                await send({"type": "error", "code": exc.code, "message": exc.message})

        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        await send({"type": "error", "code": "bad_request", "message": "send JSON text frames"})
                    continue
                try:
                    data = parse_json_object(msg.data)
                    if data.get("type") != "message":
                        raise BadRequest("unknown frame type (expected \"message\")", code="invalid_field")
                    text = field(data, "text")
                    cmid = field(data, "client_msg_id", required=False, default="")
                except KefuError as exc:
                    await send({"type": "error", "code": exc.code, "message": exc.message})
                    continue
                task = asyncio.create_task(handle(text, cmid))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return ws
