"""The agent console (WS /v1/agent/ws): the handoff queue, accept, reply to the visitor, release."""

import asyncio

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def next_frame(ws, kind: str, timeout: float = 30) -> dict:
    while True:
        frame = await ws.receive_json(timeout=timeout)
        if frame["type"] == kind:
            return frame


async def test_agent_takes_over_a_conversation(stack, unique):
    tenant = unique("agent")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        admin = {"Authorization": f"Bearer {stack.admin}"}
        async with s.post(f"{stack.http}/v1/agents", json={"agent_id": "alice"}, headers=admin) as r:
            assert r.status == 201
            agent_token = (await r.json())["agent_token"]

        async def start_and_handoff() -> tuple[str, str]:
            async with s.post(f"{stack.http}/v1/tenants/{tenant}/conversations", json={}) as r:
                conv = await r.json()
            async with s.post(f"{stack.http}/v1/conversations/{conv['conversation_id']}/messages",
                              json={"text": "转人工"}, headers={"Authorization": f"Bearer {conv['visitor_token']}"}) as r:
                assert (await r.json())["reply"]["source"] == "handoff"
            return conv["conversation_id"], conv["visitor_token"]

        first, _ = await start_and_handoff()
        async with s.ws_connect(f"{stack.http}/v1/agent/ws?token={agent_token}") as agent:
            queue = await next_frame(agent, "queue")
            assert queue["agent_id"] == "alice"
            waiting = {c["conversation_id"]: c for c in queue["conversations"]}
            assert first in waiting and waiting[first]["summary"].startswith("reason: asked")

            cid, visitor_token = await start_and_handoff()  # announced live
            handoff = await next_frame(agent, "handoff")
            assert handoff["conversation_id"] == cid and handoff["last_text"] == "转人工"

            await agent.send_json({"type": "accept", "conversation_id": cid})
            accepted = await next_frame(agent, "accepted")
            assert accepted["state"]["mode"] == "human" and "handoff_summary" in accepted["state"]

            async with s.ws_connect(f"{stack.http}/v1/ws?token={visitor_token}") as visitor:
                await asyncio.sleep(0.2)  # the visitor socket subscribes to its conversation
                await agent.send_json({"type": "reply", "conversation_id": cid, "text": "您好，我是客服 Alice。"})
                assert (await next_frame(agent, "sent"))["seq"] > 0
                assert (await next_frame(visitor, "agent_message"))["text"] == "您好，我是客服 Alice。"
                await visitor.send_json({"type": "message", "text": "我的订单 KF20260301123456 还没到"})
                seen = await next_frame(agent, "visitor_message")
                assert seen["conversation_id"] == cid and "KF20260301123456" in seen["text"]

            await agent.send_json({"type": "reply", "conversation_id": cid, "text": ""})
            assert (await next_frame(agent, "error"))["code"] == "missing_field"
            await agent.send_json({"type": "release", "conversation_id": cid})
            await next_frame(agent, "released")
            await agent.send_json({"type": "reply", "conversation_id": cid, "text": "still there?"})
            assert (await next_frame(agent, "error"))["code"] == "not_in_human_mode"
            await agent.send_json({"type": "dance"})
            assert (await next_frame(agent, "error"))["code"] == "invalid_field"

        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers=admin) as r:
            state = await r.json()
        assert state["mode"] == "bot" and "agent:alice" in state["tags"]
        assert [t["text"] for t in state["turns"] if t["role"] == "agent"] == ["您好，我是客服 Alice。"]


async def test_agent_console_needs_an_agent_token(stack, unique):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{stack.http}/v1/tenants/{unique('t')}/conversations", json={}) as r:
            visitor_token = (await r.json())["visitor_token"]
        for token in ("", "nope", visitor_token):
            async with s.get(f"{stack.http}/v1/agent/ws?token={token}") as r:
                assert r.status == 401 and (await r.json())["error"]["code"] in ("unauthenticated", "invalid_token")
        async with s.post(f"{stack.http}/v1/agents", json={"agent_id": "bob"},
                          headers={"Authorization": f"Bearer {visitor_token}"}) as r:
            assert r.status == 403
