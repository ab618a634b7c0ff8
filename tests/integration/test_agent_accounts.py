"""Agent accounts: passwords, login, roles per tenant, tenant-scoped agent sockets, revocation on every
gateway replica, login limits, origins, and the `kefu agents` CLI — against the real services."""

import asyncio
import contextlib
import io
import time

import aiohttp
import pytest

from kefu.cli.main import main as kefu
from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model]


@contextlib.asynccontextmanager
async def replica(stack, **overrides):
    """Another gateway on the same NATS and data dir (so the same signing key): a second replica."""
    svc = GatewayService(GatewaySettings(nats_url=stack.nats_url, data_dir=stack.data_dir, http_port=0, grpc_port=0,
                                         log_level="warning", **overrides))
    stop = asyncio.Event()
    task = await start_in_background(svc, stop)
    try:
        yield f"http://127.0.0.1:{svc.http_port}"
    finally:
        stop.set()
        await task


class Client:
    def __init__(self, session, base, admin):
        self.s, self.base, self.admin = session, base, admin

    async def call(self, method, path, body=None, token=None, base=None, headers=None):
        h = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.s.request(method, (base or self.base) + path, json=body, headers={**h, **(headers or {})}) as r:
            return r.status, await r.json(), r.headers

    async def put_agent(self, tenant, agent_id, password, token=None, **extra):
        return await self.call("PUT", f"/v1/tenants/{tenant}/agents/{agent_id}", {"password": password, **extra},
                               token=token or self.admin)

    async def login(self, tenant, agent_id, password, base=None):
        return await self.call("POST", "/v1/agent/login", {"tenant": tenant, "agent_id": agent_id,
                                                           "password": password}, base=base)

    async def token(self, tenant, agent_id, password):
        status, body, _ = await self.login(tenant, agent_id, password)
        assert status == 200, body
        return body["agent_token"]

    async def socket_status(self, token, base=None):
        """What the agent socket answers ``token``: 101 (opened) or the error's status and code."""
        try:
            async with self.s.ws_connect(f"{base or self.base}/v1/agent/ws?token={token}") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "queue"
                return 101, None
        except aiohttp.WSServerHandshakeError as exc:
            async with self.s.get(f"{base or self.base}/v1/agent/ws?token={token}") as r:
                return exc.status, (await r.json())["error"]["code"]

    async def handoff(self, tenant):
        status, conv, _ = await self.call("POST", f"/v1/tenants/{tenant}/conversations", {})
        assert status == 201
        status, body, _ = await self.call("POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                                          {"text": "转人工"}, token=conv["visitor_token"])
        assert body["reply"]["source"] == "handoff"
        return conv["conversation_id"]


@pytest.fixture
async def api(stack):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield Client(s, stack.http, stack.admin)


async def next_frame(ws, kind, timeout=15):
    while True:
        frame = await ws.receive_json(timeout=timeout)
        if frame["type"] == kind:
            return frame


async def test_accounts_login_and_roles(api, unique):
    acme, globex = unique("acme"), unique("globex")
    status, body, _ = await api.put_agent(acme, "boss", "boss-password", role="admin", name="老板")
    assert status == 200 and body == {"tenant": acme, "agent_id": "boss", "role": "admin", "name": "老板"}
    for bad, code in (({"password": "short"}, "invalid_field"), ({"password": "long enough", "role": "root"},
                      "invalid_field"), ({}, "missing_field"), ({"password": 12345678}, "invalid_field")):
        status, body, _ = await api.call("PUT", f"/v1/tenants/{acme}/agents/x", bad, token=api.admin)
        assert (status, body["error"]["code"]) == (400, code), bad

    status, login, _ = await api.login(acme, "boss", "boss-password")
    assert status == 200 and login["expires_in"] == 12 * 3600
    assert (login["tenant"], login["agent_id"], login["role"], login["name"]) == (acme, "boss", "admin", "老板")
    wrong = await api.login(acme, "boss", "boss-passworD")
    unknown = await api.login(acme, "nobody", "boss-password")
    assert wrong[0] == unknown[0] == 401 and wrong[1] == unknown[1]  # nothing tells the two apart
    assert wrong[1]["error"]["code"] == "invalid_credentials"

    boss = login["agent_token"]  # a tenant admin manages its own tenant's accounts, and only those
    assert (await api.put_agent(acme, "alice", "alice-password", token=boss))[0] == 200
    status, body, _ = await api.call("GET", f"/v1/tenants/{acme}/agents", token=boss)
    assert status == 200 and body == {"agents": [{"agent_id": "alice", "role": "agent", "name": ""},
                                                 {"agent_id": "boss", "role": "admin", "name": "老板"}]}
    for method, path in (("GET", f"/v1/tenants/{globex}/agents"), ("PUT", f"/v1/tenants/{globex}/agents/x"),
                         ("DELETE", f"/v1/tenants/{acme}/agents/boss")):
        token = boss if "globex" in path else await api.token(acme, "alice", "alice-password")
        status, body, _ = await api.call(method, path, {"password": "password-x"}, token=token)
        assert (status, body["error"]["code"]) == (403, "permission_denied"), path
    _, conv, _ = await api.call("POST", f"/v1/tenants/{acme}/conversations", {})
    status, _, _ = await api.call("GET", f"/v1/tenants/{acme}/agents", token=conv["visitor_token"])
    assert status == 403
    assert (await api.call("GET", f"/v1/tenants/{acme}/agents"))[0] == 401

    # Demoted: the old token keeps working for the console but no longer manages accounts.
    assert (await api.put_agent(acme, "boss", "boss-password", role="agent"))[0] == 200
    assert (await api.call("GET", f"/v1/tenants/{acme}/agents", token=boss))[0] == 403
    assert (await api.socket_status(boss)) == (101, None)

    # A new password signs the earlier tokens out.
    alice = await api.token(acme, "alice", "alice-password")
    assert (await api.put_agent(acme, "alice", "alice-password-2"))[0] == 200
    assert await api.socket_status(alice) == (401, "token_revoked")
    assert (await api.login(acme, "alice", "alice-password"))[0] == 401
    alice = await api.token(acme, "alice", "alice-password-2")

    status, body, _ = await api.call("DELETE", f"/v1/tenants/{acme}/agents/alice", token=api.admin)
    assert status == 200
    assert [a["agent_id"] for a in (await api.call("GET", f"/v1/tenants/{acme}/agents", token=api.admin))[1]["agents"]] == ["boss"]
    assert (await api.login(acme, "alice", "alice-password-2"))[1]["error"]["code"] == "invalid_credentials"
    status, body, _ = await api.call("DELETE", f"/v1/tenants/{acme}/agents/alice", token=api.admin)
    assert (status, body["error"]["code"]) == (404, "unknown_agent")
    # Created again with the same id and password: the tokens from before are still dead.
    assert (await api.put_agent(acme, "alice", "alice-password-2"))[0] == 200
    assert await api.socket_status(alice) == (401, "token_revoked")
    assert (await api.socket_status(await api.token(acme, "alice", "alice-password-2")))[0] == 101


async def test_a_password_is_checked_as_slowly_for_an_unknown_agent(stack, api, unique, monkeypatch):
    """Unknown agent and wrong password both cost one full scrypt check (against a decoy hash)."""
    from kefu.gateway import agents

    tenant = unique("slow")
    assert (await api.put_agent(tenant, "ann", "ann-password"))[0] == 200
    checked = []

    def counting(password, stored):
        checked.append(stored.split("$")[:4])
        return real(password, stored)

    real = agents.check_password
    monkeypatch.setattr(agents, "check_password", counting)
    await api.login(tenant, "ann", "wrong-password")
    await api.login(tenant, "nobody", "wrong-password")
    assert checked == [["scrypt", "15", "8", "1"]] * 2


async def test_an_agent_sees_and_acts_on_its_own_tenant_only(api, stack, unique):
    acme, globex = unique("acme"), unique("globex")
    assert (await api.put_agent(acme, "amy", "amy-password"))[0] == 200
    amy = await api.token(acme, "amy", "amy-password")
    status, issued, _ = await api.call("POST", "/v1/agents", {"agent_id": "gus", "tenant": globex}, token=api.admin)
    assert status == 201 and issued["tenant"] == globex and issued["role"] == "agent"
    status, wide, _ = await api.call("POST", "/v1/agents", {"agent_id": "ops"}, token=api.admin)
    assert status == 201 and wide["tenant"] == ""
    mine, theirs = await api.handoff(acme), await api.handoff(globex)

    async with api.s.ws_connect(f"{stack.http}/v1/agent/ws?token={amy}") as ws, \
            api.s.ws_connect(f"{stack.http}/v1/agent/ws?token={issued['agent_token']}") as gus, \
            api.s.ws_connect(f"{stack.http}/v1/agent/ws?token={wide['agent_token']}") as ops:
        queue = await next_frame(ws, "queue")
        assert queue["tenant"] == acme and queue["agent_id"] == "amy"
        seen = {c["conversation_id"] for c in queue["conversations"]}
        assert mine in seen and theirs not in seen and {c["tenant"] for c in queue["conversations"]} == {acme}
        assert {c["tenant"] for c in (await next_frame(gus, "queue"))["conversations"]} == {globex}
        everything = {c["conversation_id"] for c in (await next_frame(ops, "queue"))["conversations"]}
        assert {mine, theirs} <= everything

        # Announced live: globex's first, then acme's; amy's first handoff frame is acme's.
        later_theirs = await api.handoff(globex)
        later_mine = await api.handoff(acme)
        assert (await next_frame(ws, "handoff"))["conversation_id"] == later_mine
        assert (await next_frame(gus, "handoff"))["conversation_id"] == later_theirs
        assert {(await next_frame(ops, "handoff"))["conversation_id"] for _ in range(2)} == {later_mine, later_theirs}

        for frame in ({"type": "accept", "conversation_id": theirs}, {"type": "release", "conversation_id": theirs},
                      {"type": "reply", "conversation_id": theirs, "text": "hello from acme"}):
            await ws.send_json(frame)
            error = await next_frame(ws, "error")
            assert error["code"] == "permission_denied", frame
        await ws.send_json({"type": "accept", "conversation_id": mine})
        assert (await next_frame(ws, "accepted"))["state"]["tenant"] == acme
        await ops.send_json({"type": "accept", "conversation_id": theirs})  # deployment-wide: any tenant
        assert (await next_frame(ops, "accepted"))["conversation_id"] == theirs

    _, state, _ = await api.call("GET", f"/v1/conversations/{theirs}", token=api.admin)
    assert "agent:amy" not in state["tags"] and not [t for t in state["turns"] if t["role"] == "agent"]


async def test_removing_an_agent_closes_its_sockets_on_every_replica(api, stack, unique):
    tenant = unique("rev")
    assert (await api.put_agent(tenant, "rob", "rob-password"))[0] == 200
    token = await api.token(tenant, "rob", "rob-password")
    _, issued, _ = await api.call("POST", "/v1/agents", {"agent_id": "rob", "tenant": tenant}, token=api.admin)
    async with replica(stack) as other:
        sockets = [await api.s.ws_connect(f"{base}/v1/agent/ws?token={t}")
                   for base in (stack.http, other) for t in (token, issued["agent_token"])]
        try:
            for ws in sockets:
                await next_frame(ws, "queue")
            assert (await api.call("DELETE", f"/v1/tenants/{tenant}/agents/rob", token=api.admin))[0] == 200
            removed = time.monotonic()
            # At once, on both replicas, for the login token and the one POST /v1/agents issued before.
            for base in (stack.http, other):
                for t in (token, issued["agent_token"]):
                    assert await api.socket_status(t, base) == (401, "token_revoked")
            for ws in sockets:
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401 and "revoked" in msg.extra
            assert time.monotonic() - removed < 5
        finally:
            for ws in sockets:
                await ws.close()


async def test_logins_are_rate_limited(api, stack, unique):
    tenant = unique("lim")
    assert (await api.put_agent(tenant, "lee", "lee-password"))[0] == 200
    async with replica(stack, rate_account_logins_per_second=0.01, rate_account_logins_burst=2,
                       rate_logins_per_second=0.01, rate_logins_burst=4) as other:
        statuses = [(await api.login(tenant, "lee", "guess-123", base=other))[0] for _ in range(2)]
        status, body, headers = await api.login(tenant, "lee", "lee-password", base=other)  # even the right one
        assert statuses == [401, 401] and status == 429 and body["error"]["code"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
        for agent in ("x1", "x2"):  # other accounts, same address: the address's bucket runs out too
            assert (await api.login(tenant, agent, "guess-123", base=other))[0] == 401
        assert (await api.login(tenant, "x3", "guess-123", base=other))[0] == 429


async def test_browser_origins_are_checked_before_the_upgrade(api, stack, unique):
    _, conv, _ = await api.call("POST", f"/v1/tenants/{unique('o')}/conversations", {})
    path = f"/v1/ws?token={conv['visitor_token']}"
    host = stack.http.removeprefix("http://")

    async def opens(base, origin):
        headers = {"Origin": origin} if origin else {}
        try:
            async with api.s.ws_connect(base + path, headers=headers):
                return True
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 403
            async with api.s.get(base + path, headers=headers) as r:
                assert (await r.json())["error"]["code"] == "origin_not_allowed"
            return False

    assert await opens(stack.http, None) and await opens(stack.http, f"http://{host}")
    assert not await opens(stack.http, "https://evil.example") and not await opens(stack.http, "null")
    async with api.s.get(f"{stack.http}/v1/agent/ws?token={api.admin}", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "origin_not_allowed"
    async with replica(stack, allowed_origins="https://shop.example") as other:
        assert await opens(other, "https://shop.example") and not await opens(other, "https://evil.example")
    async with replica(stack, allowed_origins="*") as other:
        assert await opens(other, "https://evil.example")


async def test_cli_manages_accounts(api, stack, unique, monkeypatch, capsys):
    tenant = unique("cli")
    common = ["--tenant", tenant, "--url", stack.http, "--data-dir", str(stack.data_dir)]
    monkeypatch.setattr("sys.stdin", io.StringIO("carol-password\n"))
    assert await asyncio.to_thread(kefu, ["agents", "add", "carol", "--role", "admin", "--password-stdin", *common]) == 0
    assert f"saved carol (admin) in {tenant}" in capsys.readouterr().out
    assert (await api.login(tenant, "carol", "carol-password"))[0] == 200
    assert await asyncio.to_thread(kefu, ["agents", "list", *common]) == 0
    assert capsys.readouterr().out.split() == ["carol", "admin"]
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert await asyncio.to_thread(kefu, ["agents", "add", "dan", "--password-stdin", *common]) == 1
    assert "(invalid_field)" in capsys.readouterr().err
    assert await asyncio.to_thread(kefu, ["agents", "remove", "carol", *common]) == 0
    assert await asyncio.to_thread(kefu, ["agents", "remove", "carol", *common]) == 1
    assert "unknown_agent" in capsys.readouterr().err
    assert (await api.login(tenant, "carol", "carol-password"))[0] == 401
