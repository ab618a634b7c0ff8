"""What the gateway asks of the other services, shared by HTTP, WebSocket and gRPC handlers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.js.errors

from kefu.gateway.router import OutRouter
from kefu.proto.bus.v1 import common_pb2, plugin_pb2, retrieval_pb2, turn_pb2
from kefu.shared.audit import AuditLog
from kefu.shared.bus import Bus, decode, ensure_kv, ensure_object_store, ensure_stream, stream_publish, subject_token
from kefu.shared.crypto import Keyring
from kefu.shared.errors import BadRequest, DeadlineExceeded, KefuError, NotFound, PayloadTooLarge, Unavailable
from kefu.shared.service import health_subject
from kefu.shared.streams import (
    MAX_DOCUMENT_BYTES,
    MAX_MEDIA_BYTES,
    TURN_CANCEL,
    handoff_context,
    handoffs_kv,
    kb_stream,
    kb_subject,
    media_context,
    media_store,
)

MAX_MESSAGE_CHARS = 4000
MAX_TITLE_CHARS = 512


@dataclass
class Delta:
    text: str
    # The seq of the visitor message this is a piece of the answer to.
    seq: int = 0


@dataclass
class Final:
    reply: turn_pb2.TurnReply


class Core:
    """The gateway's view of kefu: conversations via dialogue, knowledge via stream KB and retrieval."""

    def __init__(self, bus: Bus, *, turn_timeout: float, services: list[str], tenants: frozenset[str] = frozenset(),
                 search_timeout: float = 40.0, keyring: Keyring | None = None, audit: AuditLog | None = None) -> None:
        self.bus = bus
        # Encryption at rest of what the gateway stores (media) and reads (the handoff queue).
        self.keyring = keyring or Keyring(bus.js, None)
        # Where admin actions are recorded (None: not recorded, e.g. a test's bare Core).
        self.audit = audit
        self.turn_timeout = turn_timeout
        # Retrieval may wait for a just-stored document to be indexed (up to its KEFU_SEARCH_WAIT).
        self.search_timeout = search_timeout
        self.services = services
        # When set, the only tenants this deployment serves; others are unknown (404).
        self.tenants = tenants
        # Highest KB sequence this gateway has stored: searches and answers wait for retrieval to reach it.
        self.kb_seq = 0
        self.router = OutRouter()
        # Turn requests whose visitor left before the reply: kept until dialogue answers them.
        self._left: set[asyncio.Task[turn_pb2.TurnReply]] = set()
        # Set while the connection to NATS is down: turns in flight are answered "retry" at once.
        self._bus_down = asyncio.Event()
        bus.on_connection_change(self._bus_down.set, self._bus_down.clear)

    async def setup(self) -> None:
        await ensure_stream(self.bus.js, kb_stream())
        if self.audit is not None:
            await self.audit.setup()
        self.media = await ensure_object_store(self.bus.js, media_store())
        self.handoffs = await ensure_kv(self.bus.js, handoffs_kv())
        await self.router.start(self.bus.nc)

    def tenant(self, tenant: str) -> str:
        """``tenant`` validated: a well-formed identifier, and one this deployment serves."""
        subject_token(tenant)
        if self.tenants and tenant not in self.tenants:
            raise NotFound(f"unknown tenant {tenant!r}", code="unknown_tenant")
        return tenant

    # Knowledge

    async def audited(self, action: str, actor: str, *, tenant: str = "", target: str = "",
                      details: dict[str, object] | None = None) -> None:
        """Record an admin action that was just done in the audit log (stream AUDIT)."""
        if self.audit is not None:
            await self.audit.record(action, actor, tenant=tenant, target=target, details=details)

    async def upsert_document(self, tenant: str, doc_id: str, title: str, text: str,
                              metadata: dict[str, str], actor: str = "admin") -> int:
        self.tenant(tenant)
        subject_token(doc_id)
        if not text.strip():
            raise BadRequest("text must not be empty", code="invalid_field")
        if len(title) > MAX_TITLE_CHARS:
            raise BadRequest(f"title is longer than {MAX_TITLE_CHARS} characters", code="invalid_field")
        doc = retrieval_pb2.Document(tenant=tenant, doc_id=doc_id, title=title, text=text,
                                     updated_ms=int(time.time() * 1000))
        doc.metadata.update({str(k)[:128]: str(v)[:1024] for k, v in metadata.items()})
        data = doc.SerializeToString()
        if len(data) > MAX_DOCUMENT_BYTES:
            raise PayloadTooLarge(f"documents are limited to {MAX_DOCUMENT_BYTES} bytes")
        version = await self._store_kb(kb_subject(tenant, doc_id), data)
        await self.audited("document.upsert", actor, tenant=tenant, target=doc_id,
                           details={"version": version, "bytes": len(text.encode())})
        return version

    async def delete_document(self, tenant: str, doc_id: str, actor: str = "admin") -> int:
        self.tenant(tenant)
        subject_token(doc_id)
        tombstone = retrieval_pb2.Document(tenant=tenant, doc_id=doc_id, deleted=True,
                                           updated_ms=int(time.time() * 1000))
        version = await self._store_kb(kb_subject(tenant, doc_id), tombstone.SerializeToString())
        await self.audited("document.delete", actor, tenant=tenant, target=doc_id, details={"version": version})
        return version

    async def _store_kb(self, subject: str, data: bytes) -> int:
        self.bus.require_connection()  # not into the reconnect buffer: "stored" must mean stored
        try:
            ack = await stream_publish(self.bus.js, subject, data)  # one message per subject: a resend replaces
        except Exception as exc:
            raise Unavailable(f"the knowledge store did not confirm the write: {exc}") from None
        self.kb_seq = max(self.kb_seq, ack.seq)
        return int(ack.seq)

    async def search(self, tenant: str, query: str, k: int) -> retrieval_pb2.SearchReply:
        self.tenant(tenant)
        return await self.bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(
            tenant=tenant, query=query[:MAX_MESSAGE_CHARS], k=k, min_kb_seq=self.kb_seq), retrieval_pb2.SearchReply,
            timeout=self.search_timeout)

    # Conversations

    async def start_conversation(self, tenant: str, visitor_id: str) -> str:
        self.tenant(tenant)
        reply = await self.bus.request("kefu.dialogue.start", turn_pb2.StartConversationRequest(
            tenant=tenant, visitor_id=visitor_id), turn_pb2.StartConversationReply)
        return reply.conversation_id

    async def get_state(self, conversation_id: str, at_seq: int | None = None) -> turn_pb2.ConversationState:
        req = turn_pb2.GetStateRequest(conversation_id=subject_token(conversation_id))
        if at_seq is not None:
            req.has_at_seq, req.at_seq = True, at_seq
        return await self.bus.request("kefu.dialogue.get", req, turn_pb2.ConversationState)

    async def send_message(self, conversation_id: str, text: str, client_msg_id: str = "",
                           turn_id: str = "") -> AsyncIterator[Delta | Final]:
        """Deltas of the reply as dialogue produces them, then the final reply."""
        subject_token(conversation_id)
        if not text.strip():
            raise BadRequest("text must not be empty", code="missing_field")
        if len(text) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"text is longer than {MAX_MESSAGE_CHARS} characters", code="invalid_field")
        turn_id = turn_id or uuid.uuid4().hex
        events: asyncio.Queue[turn_pb2.OutEvent] = asyncio.Queue()

        def on_out(ev: turn_pb2.OutEvent) -> None:
            if ev.turn_id == turn_id:
                events.put_nowait(ev)

        self.router.listen(conversation_id, on_out)
        request = asyncio.create_task(self.bus.request(
            "kefu.dialogue.turn",
            turn_pb2.TurnRequest(conversation_id=conversation_id, text=text, client_msg_id=client_msg_id[:128],
                                 turn_id=turn_id, kb_min_seq=self.kb_seq),
            turn_pb2.TurnReply, timeout=self.turn_timeout))
        # The bus dropping while the turn is out: its reply may never come (dialogue may or may not have
        # stored the message), so the visitor is told at once to send it again; the same client_msg_id
        # then gets the stored answer or stores it now, never twice.
        down = asyncio.ensure_future(self._bus_down.wait())
        try:
            replied = False  # dialogue's "reply" event: every delta of this turn is in before it
            while not request.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, request, down}, return_when=asyncio.FIRST_COMPLETED)
                if down.done() and not request.done():
                    getter.cancel()
                    raise Unavailable("the message bus went out of reach during the turn: send the message again "
                                      "with the same client_msg_id", code="service_unavailable")
                if getter.done():
                    ev = getter.result()
                    if ev.kind == "delta":
                        yield Delta(ev.text, ev.seq)
                    replied = replied or ev.kind == "reply"
                else:
                    getter.cancel()
            reply = request.result()
            if reply.replayed:
                yield Delta(reply.reply.text, reply.seq)
            else:
                # Deltas travel on another subscription than the reply: take the ones still queued.
                deadline = time.monotonic() + 2.0
                while not replied and time.monotonic() < deadline:
                    try:
                        ev = await asyncio.wait_for(events.get(), deadline - time.monotonic())
                    except TimeoutError:
                        break
                    if ev.kind == "delta":
                        yield Delta(ev.text, ev.seq)
                    replied = ev.kind == "reply"
            yield Final(reply)
        finally:
            down.cancel()
            if not request.done():
                # The visitor left (the stream was closed before the reply): stop the model's work for
                # this turn; dialogue still records a reply, which the visitor sees on coming back. The
                # request itself goes on: cancelled before it went out, the message would be lost.
                self._left.add(request)
                request.add_done_callback(self._forget)
                with contextlib.suppress(Exception):
                    await self.bus.publish(TURN_CANCEL, turn_pb2.TurnRequest(conversation_id=conversation_id,
                                                                             turn_id=turn_id))
            self.router.unlisten(conversation_id, on_out)

    def _forget(self, task: asyncio.Task[turn_pb2.TurnReply]) -> None:
        self._left.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: nobody is waiting for this reply any more

    async def agent_action(self, conversation_id: str, agent_id: str, action: str, text: str = "") -> turn_pb2.AgentReply:
        return await self.bus.request("kefu.dialogue.agent", turn_pb2.AgentRequest(
            conversation_id=subject_token(conversation_id), agent_id=agent_id, action=action, text=text),
            turn_pb2.AgentReply)

    async def waiting(self) -> list[turn_pb2.HandoffNotice]:
        """Every conversation in human mode (the agents' queue), oldest first."""
        try:
            keys = await self.handoffs.keys()
        except nats.js.errors.NoKeysError:
            return []
        notices = []
        for key in keys:
            try:
                entry = await self.handoffs.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                value = await self.keyring.open(entry.value, handoff_context(key))
                notices.append(decode(turn_pb2.HandoffNotice, value))
        return sorted(notices, key=lambda n: n.ts_ms)

    async def add_image(self, conversation_id: str, image: bytes, tenant: str = "") -> turn_pb2.ImageReply:
        """Store a PNG or JPEG the visitor sent (sealed with ``tenant``'s key when encryption is on) and
        add its text (OCR) to the conversation."""
        subject_token(conversation_id)
        if not image.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            raise BadRequest("the file must be a PNG or JPEG image", code="invalid_image")
        if len(image) > MAX_MEDIA_BYTES:
            raise PayloadTooLarge(f"images are limited to {MAX_MEDIA_BYTES} bytes")
        media_id = f"{conversation_id}/{uuid.uuid4().hex}"
        if self.keyring.enabled:
            if not tenant:
                raise BadRequest("the conversation's tenant is needed to store its media", code="missing_field")
            image = await self.keyring.seal(tenant, image, media_context(media_id))
        self.bus.require_connection()
        try:
            await self.media.put(media_id, image)
        except Exception as exc:
            raise Unavailable(f"the media store did not take the image: {exc}") from None
        return await self.bus.request("kefu.dialogue.image", turn_pb2.ImageRequest(
            conversation_id=conversation_id, media_id=media_id), turn_pb2.ImageReply, timeout=self.turn_timeout)

    async def reply(self, conversation_id: str, text: str, client_msg_id: str = "") -> turn_pb2.TurnReply:
        final = None
        async for item in self.send_message(conversation_id, text, client_msg_id):
            if isinstance(item, Final):
                final = item.reply
        assert final is not None
        return final

    # Plugins

    async def plugins(self, tenant: str) -> plugin_pb2.ListPluginsReply:
        """Every loaded plugin, with whether it is enabled for ``tenant`` and its settings there."""
        return await self.bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(
            tenant=self.tenant(tenant), all=True), plugin_pb2.ListPluginsReply)

    async def configure_plugin(self, tenant: str, plugin: str, enabled: bool,
                               settings_json: str, actor: str = "admin") -> plugin_pb2.ConfigurePluginReply:
        done = await self.bus.request("kefu.plugins.configure", plugin_pb2.ConfigurePluginRequest(
            tenant=self.tenant(tenant), plugin=subject_token(plugin), enabled=enabled, settings_json=settings_json),
            plugin_pb2.ConfigurePluginReply)
        try:
            names = ",".join(sorted(json.loads(settings_json or "{}")))  # the setting names, never their values
        except (ValueError, TypeError):
            names = ""
        await self.audited("plugin.configure", actor, tenant=tenant, target=done.plugin,
                           details={"enabled": done.enabled, "settings": names})
        return done

    async def reload_plugins(self, wait: float = 3.0, actor: str = "admin") -> list[plugin_pb2.ListPluginsReply]:
        """Reload the plugins on every plugins replica; what each one now serves (and what failed)."""
        replies: list[plugin_pb2.ListPluginsReply] = []
        async with self.bus.inbox() as (inbox, sub):
            await self.bus.nc.publish("kefu.plugins.reload", plugin_pb2.ReloadRequest().SerializeToString(),
                                      reply=inbox)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=min(left, 0.5 if replies else left))
                except TimeoutError:
                    if replies:
                        break  # the replicas that were going to answer have answered
                    continue
                with contextlib.suppress(KefuError):
                    replies.append(decode(plugin_pb2.ListPluginsReply, msg.data))
        if not replies:
            raise Unavailable("no plugins service answered", code="service_unavailable")
        await self.audited("plugins.reload", actor, details={
            "replicas": len(replies), "errors": sum(len(r.errors) for r in replies)})
        return replies

    # Keys and the audit log

    async def rotate_keys(self, *, data_keys: bool, tenants: list[str] | None, actor: str) -> dict[str, object]:
        """Re-wrap every data key under the current master key, or (``data_keys``) give ``tenants`` (default:
        all) a new data key version for new writes. Safe to run while everything runs, and to run again."""
        if not self.keyring.enabled:
            raise BadRequest("encryption at rest is off: set KEFU_MASTER_KEY first", code="encryption_off")
        if data_keys:
            report = await self.keyring.rotate_data_keys([self.tenant(t) for t in tenants] if tenants else None)
            await self.audited("keys.rotate_data", actor, details={
                "tenants": report.tenants, "versions": ",".join(f"{t}={v}" for t, v in sorted(report.added.items()))})
            return {"rotated": "data_keys", "tenants": report.tenants, "versions": report.added}
        report = await self.keyring.rotate_master()
        assert self.keyring.master is not None
        await self.audited("keys.rotate_master", actor, details={
            "master_key_id": self.keyring.master.id, "tenants": report.tenants, "rewrapped": report.rewrapped,
            "failed": ",".join(sorted(report.failed))})
        return {"rotated": "master_key", "master_key_id": self.keyring.master.id, "tenants": report.tenants,
                "rewrapped": report.rewrapped, "already": report.already,
                "failed": [{"tenant": t, "reason": why} for t, why in sorted(report.failed.items())]}

    async def keys(self) -> dict[str, object]:
        """Whether encryption is on, the master key's fingerprint, and each tenant's key versions."""
        master = self.keyring.master
        return {"enabled": self.keyring.enabled, "suite": self.keyring.suite,
                "master_key_id": master.id if master else "", "old_master_key_ids": [m.id for m in self.keyring.old],
                "tenants": await self.keyring.describe() if (master or self.keyring.old) else []}

    def _audit(self) -> AuditLog:
        if self.audit is None:
            raise Unavailable("this gateway keeps no audit log", code="audit_unavailable")
        return self.audit

    async def audit_list(self, limit: int, tenant: str = "") -> list[dict[str, object]]:
        return await self._audit().list(limit=limit, tenant=tenant)

    async def audit_verify(self) -> dict[str, object]:
        report = await self._audit().verify()
        problem = report.problem
        return {"ok": report.ok, "records": report.records, "head": report.head,
                "algorithms": sorted(report.algorithms),
                "problem": {"index": problem.index, "seq": problem.seq, "reason": problem.reason} if problem else None}

    # Readiness

    async def readiness(self, timeout: float = 2.0) -> dict[str, str]:
        """service -> "ok", or the reason it is not ready."""

        async def probe(name: str) -> str:
            try:
                reply = await self.bus.request(health_subject(name), common_pb2.HealthRequest(),
                                               common_pb2.HealthReply, timeout=timeout)
                return reply.status or "unknown"
            except Unavailable:
                return "not running"
            except DeadlineExceeded:
                return "not answering"
            except KefuError as exc:
                return exc.code

        results = await asyncio.gather(*(probe(s) for s in self.services))
        return dict(zip(self.services, results, strict=True))
