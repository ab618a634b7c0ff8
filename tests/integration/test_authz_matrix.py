"""Authorization matrix: every conversation route (HTTP, both WebSockets, gRPC) against every wrong
credential — another visitor's token, another tenant's agent, an expired token, a forged signature, a
well-formed token signed with another key. None succeeds, each gets its typed error, and the
conversation is unchanged; the right credential (the positive control of each route) works."""

import base64
import io
import json
import time
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from PIL import Image

from kefu.gateway.auth import Auth
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc
from kefu.shared.config import signing_secret

pytestmark = [pytest.mark.integration, pytest.mark.model]

ATTACKERS = ("other_visitor", "other_tenant_agent", "expired", "forged_signature", "other_key")
CREDENTIALS = ("right", *ATTACKERS)


def _swap_payload(token: str, claims: dict) -> str:
    """``token``'s signature on a payload claiming ``claims`` instead (a forgery)."""
    head, _, sig = token.split(".")
    payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{head}.{payload}.{sig}"


@dataclass
class World:
    http: str
    admin: str
    session: aiohttp.ClientSession
    conversations: conversations_pb2_grpc.ConversationsStub
    tenant: str
    auth: Auth  # the gateway's own keys, to mint expired tokens
    foreign: Auth  # another deployment's keys
    amy: str  # agent of the tenant
    bob: str  # agent of another tenant
    attacker_cid: str
    attacker_token: str

    async def start(self, handoff: bool = False) -> tuple[str, str]:
        async with self.session.post(f"{self.http}/v1/tenants/{self.tenant}/conversations", json={}) as r:
            conv = await r.json()
        if handoff:
            async with self.session.post(f"{self.http}/v1/conversations/{conv['conversation_id']}/messages",
                                         json={"text": "转人工"},
                                         headers={"Authorization": f"Bearer {conv['visitor_token']}"}) as r:
                assert (await r.json())["reply"]["source"] == "handoff"
        return conv["conversation_id"], conv["visitor_token"]

    async def state(self, cid: str) -> dict:
        async with self.session.get(f"{self.http}/v1/conversations/{cid}",
                                    headers={"Authorization": f"Bearer {self.admin}"}) as r:
            return await r.json()

    def credential(self, who: str, kind: str, cid: str, token: str) -> str:
        """The token ``who`` presents to a route for ``kind`` ("visitor", "agent" or "admin")."""
        if who == "right":
            return {"visitor": token, "agent": self.amy, "admin": self.admin}[kind]
        if who == "other_visitor":
            return self.attacker_token
        if who == "other_tenant_agent":
            return self.bob
        agent = kind == "agent"
        if who == "expired":
            if agent:
                return self.auth.issue_agent("amy", 60, tenant=self.tenant, account=True, now=time.time() - 120,
                                             issued_ms=int(time.time() * 1000))
            return self.auth.issue_visitor(cid, self.tenant, now=time.time() - 2 * self.auth.visitor_ttl)
        if who == "forged_signature":
            if agent:  # bob's signature on a claim to be amy of this tenant
                return _swap_payload(self.bob, {"a": "amy", "r": "admin", "e": int(time.time()) + 3600,
                                                "i": int(time.time() * 1000), "t": self.tenant, "k": 1})
            return _swap_payload(self.attacker_token, {"c": cid, "t": self.tenant, "e": int(time.time()) + 3600})
        assert who == "other_key"
        if agent:
            return self.foreign.issue_agent("amy", 3600, tenant=self.tenant, account=True)
        return self.foreign.issue_visitor(cid, self.tenant)


@pytest.fixture(scope="module")
async def world(stack):
    tenant, other = f"mx{time.monotonic_ns()}", f"my{time.monotonic_ns()}"
    secret = signing_secret(stack.data_dir)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s, \
            grpc.aio.insecure_channel(stack.grpc) as channel:
        tokens = {}
        for t, agent in ((tenant, "amy"), (other, "bob")):
            async with s.put(f"{stack.http}/v1/tenants/{t}/agents/{agent}", json={"password": f"{agent}-password"},
                             headers={"Authorization": f"Bearer {stack.admin}"}) as r:
                assert r.status == 200
            async with s.post(f"{stack.http}/v1/agent/login",
                              json={"tenant": t, "agent_id": agent, "password": f"{agent}-password"}) as r:
                tokens[agent] = (await r.json())["agent_token"]
        w = World(stack.http, stack.admin, s, conversations_pb2_grpc.ConversationsStub(channel), tenant,
                  Auth(stack.admin, secret, 3600), Auth("another-admin", "another-deployment-key", 3600),
                  tokens["amy"], tokens["bob"], "", "")
        w.attacker_cid, w.attacker_token = await w.start()
        yield w


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), "white").save(out, "PNG")
    return out.getvalue()


async def http_call(w: World, method: str, path: str, token: str, **kwargs) -> tuple:
    async with w.session.request(method, w.http + path, headers={"Authorization": f"Bearer {token}",
                                                                 **kwargs.pop("headers", {})}, **kwargs) as r:
        if r.status != 200:
            return r.status, (await r.json())["error"]["code"]
        if r.content_type == "text/event-stream":
            text = await r.text()
            return ("ok", "done") if "event: done" in text else ("sse", text)
        return "ok", await r.json()


async def get_conversation(w, cid, token):
    return await http_call(w, "GET", f"/v1/conversations/{cid}", token)


async def get_state_at(w, cid, token):
    return await http_call(w, "GET", f"/v1/conversations/{cid}/state?at_seq=0", token)


async def post_message(w, cid, token):
    return await http_call(w, "POST", f"/v1/conversations/{cid}/messages", token, json={"text": "转人工"})


async def post_message_sse(w, cid, token):
    return await http_call(w, "POST", f"/v1/conversations/{cid}/messages", token, json={"text": "转人工"},
                           headers={"Accept": "text/event-stream"})


async def post_image(w, cid, token):
    form = aiohttp.FormData()
    form.add_field("file", tiny_png(), filename="shot.png", content_type="image/png")
    return await http_call(w, "POST", f"/v1/conversations/{cid}/images", token, data=form)


async def handshake_error(w, path, token) -> tuple:
    async with w.session.get(f"{w.http}{path}?token={token}") as r:
        return r.status, (await r.json())["error"]["code"]


async def visitor_ws(w, cid, token):
    try:
        async with w.session.ws_connect(f"{w.http}/v1/ws?token={token}") as ws:
            await ws.send_json({"type": "message", "text": "转人工"})
            while (frame := await ws.receive_json(timeout=30))["type"] not in ("reply", "error"):
                pass
            if frame["type"] == "error":
                return "frame", frame["code"]
    except aiohttp.WSServerHandshakeError:
        return await handshake_error(w, "/v1/ws", token)
    if token == w.attacker_token:
        # The token opens its own conversation's socket, and the message went there, not to ``cid``.
        return "own_conversation", len((await w.state(w.attacker_cid))["turns"]) > 0
    return "ok", frame


def agent_action(action: str):
    async def act(w, cid, token):
        try:
            async with w.session.ws_connect(f"{w.http}/v1/agent/ws?token={token}") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "queue"
                frame = {"type": action, "conversation_id": cid}
                if action == "reply":
                    frame["text"] = "您好"
                await ws.send_json(frame)
                answer = await ws.receive_json(timeout=20)
                if answer["type"] == "error":
                    return "frame", answer["code"]
                return "ok", answer["type"]
        except aiohttp.WSServerHandshakeError:
            return await handshake_error(w, "/v1/agent/ws", token)

    act.__name__ = f"agent_ws_{action}"
    return act


async def grpc_call(call) -> tuple:
    try:
        return "ok", await call
    except grpc.aio.AioRpcError as exc:
        code = dict(exc.trailing_metadata() or ()).get("kefu-error-code", "")
        return exc.code(), code


def meta(token):
    return (("authorization", f"Bearer {token}"),)


async def grpc_send_message(w, cid, token):
    async def run():
        return [c async for c in w.conversations.SendMessage(conversations_pb2.SendMessageRequest(
            conversation_id=cid, text="转人工"), metadata=meta(token), timeout=30)]
    return await grpc_call(run())


async def grpc_converse(w, cid, token):
    async def requests():
        yield conversations_pb2.ConverseRequest(conversation_id=cid, text="转人工")

    async def run():
        return [r async for r in w.conversations.Converse(requests(), metadata=meta(token), timeout=30)]
    return await grpc_call(run())


async def grpc_get(w, cid, token):
    return await grpc_call(w.conversations.Get(conversations_pb2.GetRequest(conversation_id=cid),
                                               metadata=meta(token), timeout=10))


async def grpc_state_at(w, cid, token):
    return await grpc_call(w.conversations.StateAt(conversations_pb2.StateAtRequest(conversation_id=cid, at_seq=0),
                                                   metadata=meta(token), timeout=10))


DENIED, UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
VISITOR_HTTP = {"other_visitor": (403, "forbidden"), "other_tenant_agent": (403, "permission_denied"),
                "expired": (401, "token_expired"), "forged_signature": (401, "invalid_token"),
                "other_key": (401, "invalid_token")}
ADMIN_HTTP = dict.fromkeys(ATTACKERS, (403, "forbidden"))
VISITOR_GRPC = {"other_visitor": (DENIED, "forbidden"), "other_tenant_agent": (DENIED, "permission_denied"),
                "expired": (UNAUTH, "token_expired"), "forged_signature": (UNAUTH, "invalid_token"),
                "other_key": (UNAUTH, "invalid_token")}
AGENT_WS = {"other_visitor": (401, "invalid_token"), "other_tenant_agent": ("frame", "permission_denied"),
            "expired": (401, "token_expired"), "forged_signature": (401, "invalid_token"),
            "other_key": (401, "invalid_token")}

# route -> (call, the kind of credential it takes, the conversation is in human mode, expected per attacker)
ROUTES = {
    "http_get_conversation": (get_conversation, "visitor", False, VISITOR_HTTP),
    "http_get_state_at_seq": (get_state_at, "admin", False, ADMIN_HTTP),
    "http_post_message": (post_message, "visitor", False, VISITOR_HTTP),
    "http_post_message_sse": (post_message_sse, "visitor", False, VISITOR_HTTP),
    "http_post_image": (post_image, "visitor", False, VISITOR_HTTP),
    "ws_visitor_message": (visitor_ws, "visitor", False, {**VISITOR_HTTP, "other_visitor": ("own_conversation", True)}),
    "ws_agent_accept": (agent_action("accept"), "agent", True, AGENT_WS),
    "ws_agent_reply": (agent_action("reply"), "agent", True, AGENT_WS),
    "ws_agent_release": (agent_action("release"), "agent", True, AGENT_WS),
    "grpc_send_message": (grpc_send_message, "visitor", False, VISITOR_GRPC),
    "grpc_converse": (grpc_converse, "visitor", False, VISITOR_GRPC),
    "grpc_get": (grpc_get, "visitor", False, VISITOR_GRPC),
    "grpc_state_at": (grpc_state_at, "admin", False, dict.fromkeys(ATTACKERS, (DENIED, "forbidden"))),
}
AGENT_ANSWERS = {"ws_agent_accept": "accepted", "ws_agent_reply": "sent", "ws_agent_release": "released"}


@pytest.mark.parametrize("who", CREDENTIALS)
@pytest.mark.parametrize("route", ROUTES)
async def test_route_with_credential(world, route, who):
    call, kind, human, expected = ROUTES[route]
    cid, token = await world.start(handoff=human)
    before = await world.state(cid)
    outcome = await call(world, cid, world.credential(who, kind, cid, token))
    after = await world.state(cid)
    if who == "right":
        assert outcome[0] == "ok", outcome
        if route in AGENT_ANSWERS:
            assert outcome[1] == AGENT_ANSWERS[route]
        if route.startswith(("http_post", "ws_", "grpc_send", "grpc_converse")):
            assert after["seq"] > before["seq"]  # the positive control really changed the conversation
        return
    assert outcome == expected[who]
    # Nothing reached the conversation: no event, no agent tag, no change of mode.
    assert (after["seq"], after["mode"], after["tags"]) == (before["seq"], before["mode"], before["tags"])
