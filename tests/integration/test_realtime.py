"""Reconnect without loss: every server→client event carries its conversation seq, and a visitor who comes
back with the last seq it saw is sent what it missed (bot replies, agent messages) once, in order, before
live events — over real sockets, against the five real services."""

import asyncio
import contextlib
import json

import aiohttp
import grpc
import pytest

from kefu.proto.bus.v1 import turn_pb2
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc
from kefu.shared.streams import out_subject

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def start(s, stack, tenant):
    async with s.post(f"{stack.http}/v1/tenants/{tenant}/conversations", json={}) as r:
        conv = await r.json()
    return conv["conversation_id"], conv["visitor_token"]


async def put_doc(s, stack, tenant, doc_id, title, text):
    async with s.put(f"{stack.http}/v1/tenants/{tenant}/documents/{doc_id}", json={"title": title, "text": text},
                     headers={"Authorization": f"Bearer {stack.admin}"}) as r:
        assert r.status == 200


async def until_reply(ws) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] != "reply":
        frames.append(await ws.receive_json(timeout=60))
    return frames


async def quiet(ws, seconds=0.5) -> list[dict]:
    """Frames that arrive within ``seconds`` (none expected, usually)."""
    frames = []
    try:
        while True:
            frames.append(await ws.receive_json(timeout=seconds))
    except TimeoutError:
        return frames


async def agent(bus, cid, action, text=""):
    return await bus.request("kefu.dialogue.agent", turn_pb2.AgentRequest(
        conversation_id=cid, agent_id="alice", action=action, text=text), turn_pb2.AgentReply)


async def test_events_missed_while_away_arrive_once_in_order_on_reconnect(stack, bus, unique):
    tenant = unique("away")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await put_doc(s, stack, tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
        cid, tok = await start(s, stack, tenant)
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}") as ws:
            await ws.send_json({"type": "message", "text": "How much is the L2 desk lamp?"})
            frames = await until_reply(ws)
        reply = frames[-1]
        assert all(f["type"] == "delta" and f["seq"] == 1 for f in frames[:-1]) and frames[:-1]
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {tok}"}) as r:
            [bot] = [t for t in (await r.json())["turns"] if t["role"] == "bot"]
        assert reply["seq"] == 1 and reply["reply_seq"] == bot["seq"] > 1 and "129" in reply["reply"]["text"]
        last_seq = reply["reply_seq"]

        # Away: the visitor's other tab asks for a person (a bot reply), and an agent writes.
        async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": "转人工"},
                          headers={"Authorization": f"Bearer {tok}"}) as r:
            handoff = await r.json()
        assert handoff["reply"]["source"] == "handoff"
        await agent(bus, cid, "accept")
        said = await agent(bus, cid, "reply", "您好，我是客服 Alice。")

        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq={last_seq}") as ws:
            missed = [await ws.receive_json(timeout=10), await ws.receive_json(timeout=10)]
            assert [f["type"] for f in missed] == ["reply", "agent_message"]
            assert missed[0]["reply"] == handoff["reply"] and missed[0]["reply_seq"] == handoff["reply_seq"]
            assert missed[0]["seq"] == handoff["seq"]
            assert missed[1] == {"type": "agent_message", "text": "您好，我是客服 Alice。", "seq": said.seq}
            assert await quiet(ws) == []  # nothing twice
            # Live again: the next agent message comes straight after the replay.
            again = await agent(bus, cid, "reply", "订单已查到。")
            live = await ws.receive_json(timeout=10)
            assert live == {"type": "agent_message", "text": "订单已查到。", "seq": again.seq}
            assert await quiet(ws, 0.3) == []

        # Resuming from the latest seq replays nothing; from the start, everything visible.
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq={again.seq}") as ws:
            assert await quiet(ws, 0.3) == []
            await ws.send_json({"type": "resume", "last_seq": 0})
            everything = [await ws.receive_json(timeout=10) for _ in range(4)]
            assert [(f["type"], f.get("reply_seq", f["seq"])) for f in everything] == [
                ("reply", bot["seq"]), ("reply", handoff["reply_seq"]), ("agent_message", said.seq),
                ("agent_message", again.seq)]
            assert await quiet(ws, 0.3) == []


async def test_a_reply_finished_while_the_visitor_was_away_is_delivered_on_return(stack, unique):
    tenant = unique("back")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await put_doc(s, stack, tenant, "kettle", "电水壶 K5", "K5 电水壶容量 1.7 升，售价 199 元，保修 18 个月。")
        cid, tok = await start(s, stack, tenant)
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}") as ws:
            await ws.send_json({"type": "message", "text": "K5 电水壶保修多久？"})
        # The page closed before the answer; dialogue still records one.
        headers = {"Authorization": f"Bearer {stack.admin}"}
        for _ in range(100):
            async with s.get(f"{stack.http}/v1/conversations/{cid}", headers=headers) as r:
                state = await r.json()
            if any(t["role"] == "bot" for t in state["turns"]):
                break
            await asyncio.sleep(0.1)
        bot = [t for t in state["turns"] if t["role"] == "bot"]
        assert len(bot) == 1
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq=0") as ws:
            frame = await ws.receive_json(timeout=10)
            assert frame["type"] == "reply" and frame["seq"] == 1 and frame["reply_seq"] == bot[0]["seq"]
            assert frame["reply"]["text"] == bot[0]["text"] and "18" in frame["reply"]["text"]
            assert await quiet(ws, 0.3) == []


async def test_live_copies_of_replayed_events_are_dropped_at_the_boundary(stack, bus, unique):
    """An event can be both in the state read for the replay and published after the socket started
    listening: it is sent once. An event after the state is sent."""
    tenant = unique("edge")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        cid, tok = await start(s, stack, tenant)
        async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": "转人工"},
                          headers={"Authorization": f"Bearer {tok}"}) as r:
            assert (await r.json())["reply"]["source"] == "handoff"
        said = await agent(bus, cid, "reply", "在的。")
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq={said.seq - 1}") as ws:
            assert await ws.receive_json(timeout=10) == {"type": "agent_message", "text": "在的。", "seq": said.seq}
            # Dialogue's publication of the same event, late, and of the next one.
            for seq, text in ((said.seq, "在的。"), (said.seq + 1, "next")):
                await bus.publish(out_subject(cid), turn_pb2.OutEvent(conversation_id=cid, kind="agent_message",
                                                                      text=text, seq=seq))
            assert await quiet(ws) == [{"type": "agent_message", "text": "next", "seq": said.seq + 1}]


async def test_what_cannot_be_replayed_is_an_explicit_resync(stack, unique, monkeypatch):
    import kefu.gateway.feed

    tenant = unique("resync")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        cid, tok = await start(s, stack, tenant)
        for text in ("转人工", "hello?"):
            async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": text},
                              headers={"Authorization": f"Bearer {tok}"}) as r:
                assert r.status == 200
        # A seq the conversation never had (a client confused about which conversation it is in).
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq=99") as ws:
            frame = await ws.receive_json(timeout=10)
        assert frame["type"] == "resync" and frame["reason"] == "unknown_seq"
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {tok}"}) as r:
            now = await r.json()
        assert frame["state"]["conversation_id"] == cid and frame["seq"] == frame["state"]["seq"] == now["seq"] < 99
        monkeypatch.setattr(kefu.gateway.feed, "MAX_REPLAY", 1)  # too far behind: two replies missed
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}&last_seq=0") as ws:
            frame = await ws.receive_json(timeout=10)
            assert frame["type"] == "resync" and frame["reason"] == "too_far_behind"
            assert [t["role"] for t in frame["state"]["turns"]] == ["visitor", "bot", "visitor", "bot"]
            await ws.send_json({"type": "resume", "last_seq": -1})
            assert (await ws.receive_json(timeout=10))["code"] == "invalid_field"
            await ws.send_json({"type": "resume", "last_seq": "3"})
            assert (await ws.receive_json(timeout=10))["code"] == "invalid_field"
        async with s.get(f"{stack.http}/v1/ws?token={tok}&last_seq=abc") as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_field"


async def test_sse_events_carry_the_seq_as_id(stack, unique):
    tenant = unique("sseid")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await put_doc(s, stack, tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
        cid, tok = await start(s, stack, tenant)
        events = []
        async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": "How much is the L2 lamp?"},
                          headers={"Authorization": f"Bearer {tok}", "Accept": "text/event-stream"}) as r:
            event_id = None
            async for line in r.content:
                line = line.decode().rstrip("\r\n")
                if line.startswith("id:"):
                    event_id = int(line[3:])
                elif line.startswith("event:"):
                    events.append((line[6:].strip(), event_id))
                elif line.startswith("data:"):
                    events[-1] += (json.loads(line[5:]),)
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {tok}"}) as r:
            [bot] = [t for t in (await r.json())["turns"] if t["role"] == "bot"]
    assert events[-1][0] == "done" and events[-1][1] == events[-1][2]["reply_seq"] == bot["seq"] > 1
    assert {(e, i) for e, i, _ in events[:-1]} == {("delta", 1)}


async def test_grpc_converse_resumes_from_last_seq_and_streams_agent_messages(stack, bus, unique):
    tenant = unique("gconv")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        cid, tok = await start(s, stack, tenant)
    meta = (("authorization", f"Bearer {tok}"),)
    async with grpc.aio.insecure_channel(stack.grpc) as channel:
        conv = conversations_pb2_grpc.ConversationsStub(channel)
        chunks = [c async for c in conv.SendMessage(conversations_pb2.SendMessageRequest(
            conversation_id=cid, text="转人工"), metadata=meta, timeout=60)]
        done = chunks[-1]
        state = await conv.Get(conversations_pb2.GetRequest(conversation_id=cid), metadata=meta, timeout=10)
        [bot] = [t for t in state.turns if t.role == "bot"]  # after the message and the mode change
        assert done.done.seq == 1 and done.done.reply_seq == done.seq == bot.seq > 2
        assert done.done.reply.source == "handoff"
        assert all(c.seq == 1 for c in chunks[:-1])
        said = await agent(bus, cid, "reply", "Alice here.")

        more = asyncio.Event()

        async def requests():
            yield conversations_pb2.ConverseRequest(conversation_id=cid, last_seq=0)
            await more.wait()  # the stream stays open for agent messages until the client half-closes

        call = conv.Converse(requests(), metadata=meta, timeout=60)
        first = [await call.read(), await call.read()]
        assert [r.WhichOneof("event") for r in first] == ["reply", "agent_message"]
        assert first[0].seq == bot.seq and first[0].reply.reply.source == "handoff"
        assert first[1].agent_message == "Alice here." and first[1].seq == said.seq
        again = await agent(bus, cid, "reply", "Anything else?")
        live = await call.read()
        assert live.agent_message == "Anything else?" and live.seq == again.seq
        more.set()
        assert await call.read() == grpc.aio.EOF

        async def past_the_end():
            yield conversations_pb2.ConverseRequest(conversation_id=cid, last_seq=99)

        [resync] = [r async for r in conv.Converse(past_the_end(), metadata=meta, timeout=30)]
        assert resync.WhichOneof("event") == "resync" and resync.resync.seq == resync.seq == again.seq


async def test_a_socket_that_reads_too_slowly_is_closed_to_resume_not_buffered_without_end(stack, bus, unique):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        cid, tok = await start(s, stack, unique("slow"))
        async with s.ws_connect(f"{stack.http}/v1/ws?token={tok}") as ws:
            async def say(seq, text):
                await bus.publish(out_subject(cid), turn_pb2.OutEvent(conversation_id=cid, kind="agent_message",
                                                                      text=text, seq=seq))

            for _ in range(50):  # the socket is listening once one arrives
                await say(1, "hello")
                try:
                    if (await ws.receive_json(timeout=0.2))["text"] == "hello":
                        break
                except TimeoutError:
                    continue
            # The visitor's page stops reading; 24 MB of messages are more than the socket buffers hold.
            for seq in range(2, 3002):
                await say(seq, "x" * 8000)
            await bus.nc.flush()
            await asyncio.sleep(1.0)
            received = 0
            while (msg := await ws.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT:
                received += 1
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1013
            assert 0 < received < 3000


class Proxy:
    """A TCP proxy in front of nats-server, so one client's connection can be cut (a network blip)."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("nats://").rsplit(":", 1)
        self.target_port = int(port)
        self.down = False
        self.links: list[asyncio.StreamWriter] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.cut()
        self.server.close()

    async def _accept(self, reader, writer):
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        self.links += [writer, up_writer]

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        asyncio.ensure_future(pipe(reader, up_writer))
        asyncio.ensure_future(pipe(up_reader, writer))

    def cut(self) -> None:
        self.down = True
        for w in self.links:
            w.transport.abort()
        self.links.clear()


async def test_what_was_published_while_the_gateway_was_cut_off_from_nats_still_arrives(stack, bus, unique):
    from kefu.gateway.app import GatewayService, GatewaySettings
    from kefu.shared.service import start_in_background

    async with Proxy(stack.nats_url) as proxy:
        svc = GatewayService(GatewaySettings(nats_url=proxy.url, data_dir=stack.data_dir, http_port=0, grpc_port=0,
                                             log_level="error"))
        stop = asyncio.Event()
        task = await start_in_background(svc, stop)
        base = f"http://127.0.0.1:{svc.http_port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                stack_here = type("S", (), {"http": base})
                convs = [await start(s, stack_here, unique("blip")) for _ in range(2)]
                for cid, tok in convs:
                    async with s.post(f"{base}/v1/conversations/{cid}/messages", json={"text": "转人工"},
                                      headers={"Authorization": f"Bearer {tok}"}) as r:
                        assert (await r.json())["reply"]["source"] == "handoff"
                (cid, tok), (cid2, tok2) = convs
                async with s.ws_connect(f"{base}/v1/ws?token={tok}") as ws, \
                        s.ws_connect(f"{base}/v1/ws?token={tok2}") as ws2:
                    for _ in range(50):  # both sockets listening: the first one hears an agent message
                        first = await agent(bus, cid, "reply", "hello")
                        try:
                            if (await ws.receive_json(timeout=0.2))["seq"] == first.seq:
                                break
                        except TimeoutError:
                            continue
                    await asyncio.sleep(0.2)
                    while await quiet(ws, 0.2):
                        pass

                    proxy.cut()
                    for _ in range(100):
                        if not svc.bus.nc.is_connected:
                            break
                        await asyncio.sleep(0.02)
                    assert not svc.bus.nc.is_connected
                    missed = await agent(bus, cid, "reply", "said while you were cut off")
                    other = await agent(bus, cid2, "reply", "and here")
                    await asyncio.sleep(0.3)
                    proxy.down = False  # the gateway reconnects on its own

                    frame = await ws.receive_json(timeout=15)
                    assert frame == {"type": "agent_message", "text": "said while you were cut off", "seq": missed.seq}
                    # The second socket had been sent nothing: its client's position is unknown, so the state.
                    frame2 = await ws2.receive_json(timeout=15)
                    assert frame2["type"] == "resync" and frame2["reason"] == "gateway_reconnected"
                    assert frame2["seq"] == other.seq and frame2["state"]["turns"][-1]["text"] == "and here"
                    assert await quiet(ws, 0.3) == [] and await quiet(ws2, 0.1) == []
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
