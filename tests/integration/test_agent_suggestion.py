"""The agent's suggested answer: in human mode the bot does not answer the visitor, but the agent console
is offered what the knowledge base answers (the cited sentence) with each visitor message and on accept."""

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.model]

PRICE = "The L2 desk lamp costs 129 yuan and has three brightness levels."
WARRANTY = "The L2 desk lamp has a two-year warranty; the bulb is covered for one year."


async def next_frame(ws, kind: str, timeout: float = 30) -> dict:
    while True:
        frame = await ws.receive_json(timeout=timeout)
        if frame["type"] == kind:
            return frame


async def test_agent_sees_what_the_bot_would_answer(stack, unique):
    tenant = unique("suggest")
    admin = {"Authorization": f"Bearer {stack.admin}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
        for doc_id, title, text in (("lamp-price", "Desk lamp L2 price", PRICE),
                                    ("lamp-warranty", "Desk lamp L2 warranty", WARRANTY)):
            async with s.put(f"{stack.http}/v1/tenants/{tenant}/documents/{doc_id}", headers=admin,
                             json={"title": title, "text": text}) as r:
                assert r.status == 200
        async with s.post(f"{stack.http}/v1/tenants/{tenant}/conversations", json={}) as r:
            conv = await r.json()
        cid, visitor = conv["conversation_id"], {"Authorization": f"Bearer {conv['visitor_token']}"}

        async def ask(text: str) -> dict:
            async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": text},
                              headers=visitor) as r:
                assert r.status == 200
                return (await r.json())["reply"]

        assert "129" in (await ask("How much is the L2 desk lamp?"))["text"]
        assert (await ask("talk to a human please"))["source"] == "handoff"

        async with s.ws_connect(f"{stack.http}/v1/agent/ws?token={stack.admin}") as agent:
            await next_frame(agent, "queue")
            await agent.send_json({"type": "accept", "conversation_id": cid})
            accepted = await next_frame(agent, "accepted")
            # The last question is the price one (asking for a person is not a question to answer).
            assert accepted["suggestion"]["citations"] == ["lamp-price"]
            assert "129 yuan" in accepted["suggestion"]["text"]

            reply = await ask("What is the warranty of the L2 desk lamp?")
            assert reply["source"] == "handoff" and "warranty" not in reply["text"]  # the bot stays quiet
            seen = await next_frame(agent, "visitor_message")
            assert seen["text"] == "What is the warranty of the L2 desk lamp?"
            assert seen["suggestion"]["citations"] == ["lamp-warranty"]
            assert "two-year warranty" in seen["suggestion"]["text"]

            await ask("Can I pay with seashells on Mars?")
            seen = await next_frame(agent, "visitor_message")
            assert seen["text"] == "Can I pay with seashells on Mars?" and "suggestion" not in seen
            await agent.send_json({"type": "release", "conversation_id": cid})
            await next_frame(agent, "released")
