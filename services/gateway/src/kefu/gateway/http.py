"""The HTTP and SSE API of CONTRACT.md (aiohttp); the WebSockets are in :mod:`kefu.gateway.sockets`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kefu.gateway.agents import AgentDirectory, account_json
from kefu.gateway.auth import ROLES, Auth, Origins, bearer
from kefu.gateway.core import Core, Delta, Final
from kefu.gateway.ratelimit import RateLimits, client_address
from kefu.gateway.sockets import Sockets
from kefu.gateway.ui import Ui
from kefu.gateway.wire import JSON_LIMIT, field, json_response, parse_json_object, reply_json, state_json
from kefu.proto.bus.v1 import plugin_pb2
from kefu.shared import metrics
from kefu.shared.bus import subject_token
from kefu.shared.errors import (
    BadRequest,
    Internal,
    KefuError,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from kefu.shared.logging import get_logger
from kefu.shared.streams import MAX_MEDIA_BYTES

log = get_logger("kefu.gateway.http")

DOCUMENT_LIMIT = 5 * 1024 * 1024
IMAGE_LIMIT = MAX_MEDIA_BYTES
# Bodies up to this size are read to the end before a 413, so the client gets the answer instead of a reset.
DRAIN_LIMIT = 64 * 1024 * 1024
MAX_K = 50

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How often a streaming reply checks that its visitor is still connected.
DISCONNECT_POLL_S = 0.2


def error_response(exc: KefuError) -> web.Response:
    metrics.count_error("gateway", exc.code)
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return json_response(exc.to_json(), status=exc.http_status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the CONTRACT error JSON; nothing escapes as a bare 500."""
    try:
        return await handler(request)
    except KefuError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "bad_request")
        metrics.count_error("gateway", code)
        return json_response({"error": {"code": code, "message": exc.reason}}, status=exc.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(Internal("internal error"))


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by its route template (never the raw path: ids would make a series each)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        status = 499  # the client went away first
        raise
    finally:
        resource = request.match_info.route.resource
        metrics.http_requests().labels(resource.canonical if resource is not None else "unmatched", str(status)).inc()


def counted_socket(handler: Handler) -> Handler:
    """``handler`` of a WebSocket route, counted in ``kefu_ws_connections`` while it runs."""

    async def run(request: web.Request) -> web.StreamResponse:
        gauge = metrics.ws_connections()
        gauge.inc()
        try:
            return await handler(request)
        finally:
            gauge.dec()

    return run


async def read_json(request: web.Request, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """The JSON object in the body, with typed errors for every way it can be wrong."""
    if request.content_length is not None and request.content_length > DRAIN_LIMIT:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    read = 0  # what the client sent: the body stops growing past the limit, the count does not
    while chunk := await request.content.read(65536):
        read += len(chunk)
        if len(body) <= limit:
            body += chunk
        elif request.content_length is None and read > DRAIN_LIMIT:
            break
    if len(body) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not valid UTF-8", code="invalid_utf8") from None
    return parse_json_object(text)


async def read_file_part(request: web.Request, name: str, limit: int) -> bytes:
    """The bytes of multipart field ``name``, at most ``limit`` of them."""
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(f"send the file as multipart/form-data field {name!r}", code="invalid_field")
    if request.content_length is not None and request.content_length > DRAIN_LIMIT:
        raise PayloadTooLarge(f"the file is larger than {limit} bytes")
    found: bytes | None = None
    too_large = False
    read = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = bytearray()
            while chunk := await part.read_chunk(65536):  # type: ignore[union-attr]
                read += len(chunk)
                if len(data) <= limit:
                    data += chunk
                elif request.content_length is None and read > DRAIN_LIMIT:  # a chunked body without end
                    raise PayloadTooLarge(f"the file is larger than {limit} bytes")
            if getattr(part, "name", None) == name and found is None:
                too_large = len(data) > limit
                found = bytes(data)
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # e.g. LineTooLong: no boundary in sight
        raise BadRequest(f"malformed multipart body: {str(exc)[:200]}", code="invalid_field") from None
    if found is None:
        raise BadRequest(f"missing multipart field {name!r}", code="missing_field")
    if too_large:
        raise PayloadTooLarge(f"the file is larger than {limit} bytes")
    return found


class HttpApi:
    def __init__(self, core: Core, auth: Auth, *, agents: AgentDirectory, limits: RateLimits,
                 agent_token_ttl: float = 12 * 3600.0, origins: Origins | None = None, forwarded_hops: int = 0) -> None:
        self.core = core
        self.auth = auth
        self.agents = agents
        self.agent_token_ttl = agent_token_ttl
        self.limits = limits
        self.forwarded_hops = forwarded_hops
        self.sockets = Sockets(core, auth, agents=agents, limits=limits, origins=origins or Origins(),
                               address=self._address)
        # The widget's REST calls answer CORS for the origins its sockets admit.
        self.ui = Ui(origins or Origins())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[metrics_middleware, self.ui.cors, errors_middleware], client_max_size=IMAGE_LIMIT + 64 * 1024)
        app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.put("/v1/tenants/{tenant}/documents/{doc_id}", self.put_document),
            web.delete("/v1/tenants/{tenant}/documents/{doc_id}", self.delete_document),
            web.get("/v1/tenants/{tenant}/search", self.search),
            web.post("/v1/tenants/{tenant}/conversations", self.start_conversation),
            web.post("/v1/conversations/{cid}/messages", self.post_message),
            web.get("/v1/conversations/{cid}", self.get_conversation),
            web.get("/v1/conversations/{cid}/state", self.get_state_at),
            web.post("/v1/conversations/{cid}/images", self.post_image),
            web.get("/v1/ws", counted_socket(self.sockets.visitor_ws)),
            web.post("/v1/agents", self.create_agent),
            web.post("/v1/agent/login", self.agent_login),
            web.put("/v1/tenants/{tenant}/agents/{agent_id}", self.put_agent),
            web.get("/v1/tenants/{tenant}/agents", self.list_agents),
            web.delete("/v1/tenants/{tenant}/agents/{agent_id}", self.delete_agent),
            web.get("/v1/agent/ws", counted_socket(self.sockets.agent_ws)),
            web.get("/v1/tenants/{tenant}/plugins", self.list_plugins),
            web.put("/v1/tenants/{tenant}/plugins/{plugin}", self.put_plugin),
            web.post("/v1/plugins/reload", self.reload_plugins),
            web.get("/v1/keys", self.get_keys),
            web.post("/v1/keys/rotate", self.rotate_keys),
            web.get("/v1/audit", self.list_audit),
            web.get("/v1/audit/verify", self.verify_audit),
        ])
        self.ui.add_routes(app)  # the widget, its demo page and the agent console
        return app

    def _token(self, request: web.Request) -> str | None:
        return bearer(request.headers.get("Authorization"))

    def _address(self, request: web.Request) -> str:
        return client_address(request.remote, request.headers.get("X-Forwarded-For"), self.forwarded_hops)

    async def healthz(self, _: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        services = await self.core.readiness()
        ready = all(v == "ok" for v in services.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "services": services}
        if not ready:
            waiting = ", ".join(k for k, v in services.items() if v != "ok")
            body["error"] = {"code": "unavailable", "message": f"not ready: {waiting}"}
        return json_response(body, status=200 if ready else 503)

    async def put_document(self, request: web.Request) -> web.Response:
        self.auth.require_admin(self._token(request))
        body = await read_json(request, DOCUMENT_LIMIT)
        title = field(body, "title", required=False, default="")
        text = field(body, "text")
        metadata = field(body, "metadata", required=False, kind=dict, default={})
        tenant, doc_id = request.match_info["tenant"], request.match_info["doc_id"]
        version = await self.core.upsert_document(tenant, doc_id, title, text, metadata)
        return json_response({"doc_id": doc_id, "version": version})

    async def delete_document(self, request: web.Request) -> web.Response:
        self.auth.require_admin(self._token(request))
        tenant, doc_id = request.match_info["tenant"], request.match_info["doc_id"]
        version = await self.core.delete_document(tenant, doc_id)
        return json_response({"doc_id": doc_id, "deleted": True, "version": version})

    async def search(self, request: web.Request) -> web.Response:
        self.auth.require_admin(self._token(request))
        query = request.query.get("q", "")
        try:
            k = int(request.query.get("k", "5"))
        except ValueError:
            raise BadRequest("k must be an integer", code="invalid_field") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be between 1 and {MAX_K}", code="invalid_field")
        found = await self.core.search(request.match_info["tenant"], query, k)
        hits = [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "title": h.title, "text": h.text,
                 "score": round(h.score, 6), "version": h.version} for h in found.hits]
        return json_response({"hits": hits})

    async def start_conversation(self, request: web.Request) -> web.Response:
        tenant = self.core.tenant(request.match_info["tenant"])
        self.limits.start(self._address(request), tenant)
        body = await read_json(request) if request.can_read_body else {}
        visitor_id = field(body, "visitor_id", required=False, default="")
        cid = await self.core.start_conversation(tenant, visitor_id)
        token = self.auth.issue_visitor(cid, tenant)
        return json_response({"conversation_id": cid, "visitor_token": token}, status=201)

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["cid"]
        grant = self.auth.require_conversation(self._token(request), cid, admin_ok=False)
        assert grant is not None
        body = await read_json(request)
        text = field(body, "text")
        cmid = field(body, "client_msg_id", required=False, default="")
        self.limits.message(self._address(request), cid, grant.tenant)
        if "text/event-stream" in request.headers.get("Accept", ""):
            return await self._stream_reply(request, cid, text, cmid)
        return json_response(reply_json(await self.core.reply(cid, text, cmid)))

    async def _stream_reply(self, request: web.Request, cid: str, text: str, cmid: str) -> web.StreamResponse:
        stream = self.core.send_message(cid, text, cmid)
        # The first item is awaited before the 200 goes out, so an early error is still a proper status.
        waiting = asyncio.ensure_future(anext(stream))
        if not await self._while_connected(request, waiting):
            await stream.aclose()
            return web.Response(status=499)  # nobody is there to read it (nginx's "client closed request")
        try:
            first = waiting.result()
        except StopAsyncIteration:
            raise Internal("no reply") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)

        async def send(item: Delta | Final) -> None:
            # id: the conversation seq (a delta's visitor message, the reply's own event for done).
            if isinstance(item, Delta):
                event, seq, data = "delta", item.seq, {"text": item.text}
            else:
                event, seq, data = "done", item.reply.reply_seq, reply_json(item.reply)
            await resp.write(f"id: {seq}\nevent: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

        async def relay() -> None:
            await send(first)
            async for item in stream:
                await send(item)

        relaying = asyncio.create_task(relay())
        try:
            if not await self._while_connected(request, relaying):
                return resp
            relaying.result()
        except KefuError as exc:
            metrics.count_error("gateway", exc.code)
            err = {"code": exc.code, "message": exc.message}
            await resp.write(f"event: error\ndata: {json.dumps(err, ensure_ascii=False)}\n\n".encode())
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return resp  # gone while we wrote
        finally:
            await stream.aclose()
        await resp.write_eof()
        return resp

    @staticmethod
    async def _while_connected(request: web.Request, task: asyncio.Future[Any]) -> bool:
        """Wait for ``task``; False (and ``task`` cancelled) if the client disconnects first. A visitor
        who closes the page while the reply is being made is noticed at once, not at the next write,
        and the cancellation reaches dialogue, which stops the model's work for the turn."""
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and (request.transport is None or request.transport.is_closing()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return False
        return True

    async def post_image(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        grant = self.auth.require_conversation(self._token(request), cid, admin_ok=False)
        assert grant is not None
        self.limits.upload(self._address(request), cid, grant.tenant)
        image = await read_file_part(request, "file", IMAGE_LIMIT)
        reply = await self.core.add_image(cid, image, tenant=grant.tenant)
        return json_response({"seq": reply.seq, "text": reply.text})

    async def get_conversation(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        token = self._token(request)
        self.auth.require_conversation(token, cid, admin_ok=True)
        return json_response(state_json(await self.core.get_state(cid), admin=self.auth.is_admin(token)))

    async def get_state_at(self, request: web.Request) -> web.Response:
        self.auth.require_admin(self._token(request))
        raw = request.query.get("at_seq")
        if raw is None:
            raise BadRequest("missing query parameter at_seq", code="missing_field")
        try:
            at_seq = int(raw)
        except ValueError:
            raise BadRequest("at_seq must be an integer", code="invalid_field") from None
        if not 0 <= at_seq < 2**63:
            raise BadRequest("at_seq must be between 0 and 2^63-1", code="invalid_field")
        return json_response(state_json(await self.core.get_state(request.match_info["cid"], at_seq), admin=True))

    async def create_agent(self, request: web.Request) -> web.Response:
        """A token without an account: for ``tenant`` when given, else deployment-wide (every tenant)."""
        self.auth.require_admin(self._token(request))
        body = await read_json(request)
        agent_id = subject_token(field(body, "agent_id"))
        tenant = field(body, "tenant", required=False, default="")
        if tenant:
            self.core.tenant(tenant)
        role = _role(body)
        token = self.auth.issue_agent(agent_id, self.agent_token_ttl, tenant=tenant, role=role)
        await self.core.audited("agent.token", "admin", tenant=tenant, target=agent_id, details={"role": role})
        return json_response({"agent_id": agent_id, "agent_token": token, "tenant": tenant, "role": role,
                              "expires_in": int(self.agent_token_ttl)}, status=201)

    async def _require_manager(self, request: web.Request, tenant: str) -> str:
        """The admin token, or an agent token with role admin of ``tenant`` (or of every tenant); who it is,
        as the audit log names them."""
        token = self._token(request)
        if not token:
            raise Unauthenticated("an admin token or a tenant admin's agent token is required")
        if self.auth.is_admin(token):
            return "admin"
        if not self.auth.is_agent_token(token):
            raise PermissionDenied("this call needs the admin token or a tenant admin's agent token")
        grant = await self.agents.admit(token)
        if not grant.may_manage(tenant):
            raise PermissionDenied(f"this token does not manage the agents of tenant {tenant!r}",
                                   code="permission_denied")
        return f"agent:{grant.tenant or '*'}.{grant.agent_id}"

    async def put_agent(self, request: web.Request) -> web.Response:
        tenant = self.core.tenant(request.match_info["tenant"])
        agent_id = subject_token(request.match_info["agent_id"])
        actor = await self._require_manager(request, tenant)
        body = await read_json(request)
        password = field(body, "password")
        name = field(body, "name", required=False, default="")
        account = await self.agents.put(tenant, agent_id, password, _role(body), name)
        log.info("agent account saved", tenant=tenant, agent_id=agent_id, role=account.role)
        await self.core.audited("agent.put", actor, tenant=tenant, target=agent_id, details={"role": account.role})
        return json_response(account_json(account))

    async def list_agents(self, request: web.Request) -> web.Response:
        tenant = self.core.tenant(request.match_info["tenant"])
        await self._require_manager(request, tenant)
        accounts = await self.agents.list(tenant)
        return json_response({"agents": [{k: v for k, v in account_json(a).items() if k != "tenant"}
                                         for a in accounts]})

    async def delete_agent(self, request: web.Request) -> web.Response:
        tenant = self.core.tenant(request.match_info["tenant"])
        agent_id = subject_token(request.match_info["agent_id"])
        actor = await self._require_manager(request, tenant)
        await self.agents.remove(tenant, agent_id)
        log.info("agent account removed", tenant=tenant, agent_id=agent_id)
        await self.core.audited("agent.delete", actor, tenant=tenant, target=agent_id)
        return json_response({"tenant": tenant, "agent_id": agent_id, "deleted": True})

    async def list_plugins(self, request: web.Request) -> web.Response:
        tenant = self.core.tenant(request.match_info["tenant"])
        await self._require_manager(request, tenant)
        found = await self.core.plugins(tenant)
        return json_response({"plugins": [plugin_json(p) for p in found.plugins],
                              "errors": [{"path": e.path, "error": e.error, "serving_version": e.serving_version}
                                         for e in found.errors]})

    async def put_plugin(self, request: web.Request) -> web.Response:
        """Enable or disable a plugin for a tenant, with its settings (e.g. the CRM's base_url)."""
        tenant = self.core.tenant(request.match_info["tenant"])
        actor = await self._require_manager(request, tenant)
        body = await read_json(request)
        enabled = field(body, "enabled", kind=bool)
        settings = field(body, "settings", required=False, kind=dict, default={})
        done = await self.core.configure_plugin(tenant, request.match_info["plugin"], enabled,
                                                json.dumps(settings, ensure_ascii=False), actor=actor)
        log.info("plugin configured", tenant=tenant, plugin=done.plugin, enabled=done.enabled)
        return json_response({"tenant": done.tenant, "plugin": done.plugin, "enabled": done.enabled,
                              "settings": _masked(done.settings_json)})

    async def reload_plugins(self, request: web.Request) -> web.Response:
        """Reload the plugins directory on every plugins replica (what SIGHUP does), and say what each serves."""
        self.auth.require_admin(self._token(request))
        replies = await self.core.reload_plugins()
        return json_response({"replicas": [
            {"instance": r.instance, "generation": r.generation,
             "plugins": {p.name: p.version for p in r.plugins},
             "errors": [{"path": e.path, "error": e.error, "serving_version": e.serving_version} for e in r.errors]}
            for r in replies]})

    async def get_keys(self, request: web.Request) -> web.Response:
        """Encryption at rest: on or off, the master key's fingerprint, each tenant's key versions."""
        self.auth.require_admin(self._token(request))
        return json_response(await self.core.keys())

    async def rotate_keys(self, request: web.Request) -> web.Response:
        """``{}``: re-wrap every data key under the current master key (after KEFU_MASTER_KEY changed);
        ``{"data_keys": true, "tenants"?: [...]}``: new data key versions for new writes."""
        self.auth.require_admin(self._token(request))
        body = await read_json(request) if request.can_read_body else {}
        data_keys = field(body, "data_keys", required=False, kind=bool, default=False)
        tenants = field(body, "tenants", required=False, kind=list, default=[])
        if not all(isinstance(t, str) for t in tenants):
            raise BadRequest("tenants must be a list of tenant ids", code="invalid_field")
        return json_response(await self.core.rotate_keys(data_keys=data_keys, tenants=tenants, actor="admin"))

    async def list_audit(self, request: web.Request) -> web.Response:
        self.auth.require_admin(self._token(request))
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise BadRequest("limit must be an integer", code="invalid_field") from None
        tenant = request.query.get("tenant", "")
        if tenant:
            subject_token(tenant)
        return json_response({"records": await self.core.audit_list(limit, tenant)})

    async def verify_audit(self, request: web.Request) -> web.Response:
        """Walk the audit chain: ``ok``, how many records, the head hash, and the first problem if any."""
        self.auth.require_admin(self._token(request))
        return json_response(await self.core.audit_verify())

    async def agent_login(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        tenant = self.core.tenant(field(body, "tenant"))
        agent_id = subject_token(field(body, "agent_id"))
        password = field(body, "password")
        self.limits.login(self._address(request), f"{tenant}.{agent_id}")
        token, account = await self.agents.login(tenant, agent_id, password)
        return json_response({"agent_token": token, **account_json(account),
                              "expires_in": int(self.agent_token_ttl)})


def _masked(settings_json: str) -> dict[str, Any]:
    """A plugin's settings as shown back: secrets (keys, tokens, passwords) replaced by "***"."""
    try:
        settings = json.loads(settings_json or "{}")
    except ValueError:
        return {}
    return {k: "***" if _SECRET.search(k) and v else v for k, v in settings.items()} if isinstance(settings, dict) else {}


_SECRET = re.compile(r"key|token|secret|password|credential", re.I)


def plugin_json(p: plugin_pb2.PluginInfo) -> dict[str, Any]:
    return {"name": p.name, "version": p.version, "description": p.description, "enabled": p.enabled,
            "settings": _masked(p.settings_json), "hooks": list(p.hooks),
            "tools": [{"name": t.name, "description": t.description, "side_effecting": t.side_effecting,
                       "confirmation": t.confirmation} for t in p.tools]}


def _role(body: dict[str, Any]) -> str:
    role = field(body, "role", required=False, default="agent")
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", code="invalid_field")
    return role
