"""A real 3-node NATS cluster under kefu (KEFU_STREAM_REPLICAS=3): kill -9 of the node that leads stream CONV
in the middle of conversations. Messages keep being accepted and answered, nothing acknowledged is lost or
doubled (read back from the log), and the node, restarted, catches up with the others."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from kefu.dialogue.app import DialogueService, DialogueSettings
from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.retrieval.app import RetrievalService, RetrievalSettings
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer, wait_for_cluster
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model]

ADMIN = "cluster-admin-token"
CONVERSATIONS = 12
MESSAGES = 4
NO_LIMITS = {f"rate_{k}_{x}": 1e6 for k in ("messages", "ip_messages", "tenant_messages", "starts", "tenant_starts")
             for x in ("per_second", "burst")}


def conv_copy(node: NatsServer) -> dict:
    """What ``node`` itself holds of stream CONV (its monitoring endpoint, not the leader's word)."""
    for account in node.monitor("/jsz?streams=true").get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream["name"] == "CONV":
                return dict(stream["state"])
    return {}


async def test_kill_of_the_conv_leader_loses_nothing_and_the_node_catches_up(tmp_path, models_data_dir,
                                                                             monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", ADMIN)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_data_dir / "models")
    nodes = NatsServer.cluster(tmp_path / "nats", 3)
    for n in nodes:
        n.start()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        wait_for_cluster(nodes)
        common = {"nats_url": ",".join(n.url for n in nodes), "data_dir": data, "log_level": "warning",
                  "stream_replicas": 3}
        for svc in (RetrievalService(RetrievalSettings(**common)),
                    DialogueService(DialogueSettings(**common, llm_enabled=False))):
            tasks.append(await start_in_background(svc, stop))
        gateway = GatewayService(GatewaySettings(**common, http_port=0, grpc_port=0, turn_timeout=30, **NO_LIMITS))
        tasks.append(await start_in_background(gateway, stop))
        base, admin = f"http://127.0.0.1:{gateway.http_port}", {"Authorization": f"Bearer {ADMIN}"}
        bus = await Bus.connect([n.url for n in nodes], "cluster-test")
        for stream in ("CONV", "KB", "KV_conv_state", "KV_handoffs", "OBJ_media"):
            assert (await bus.js.stream_info(stream)).config.num_replicas == 3, stream

        acknowledged: dict[str, list[tuple[str, int]]] = {}
        acked_after_kill: list[float] = []
        killed_at: list[float] = []
        under_way = asyncio.Event()  # every conversation has an answered message: time to kill
        retries = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as s:
            async with s.put(f"{base}/v1/tenants/ha/documents/lamp", headers=admin,
                             json={"title": "Desk lamp L2", "text": "The L2 desk lamp costs 129 yuan."}) as r:
                assert r.status == 200, await r.text()

            async def until_ok(method: str, path: str, body: dict, headers: dict) -> dict:
                """What a widget does: the same request (same client_msg_id) again until it is answered."""
                nonlocal retries
                deadline = time.monotonic() + 60
                while True:
                    try:
                        async with s.request(method, base + path, json=body, headers=headers) as r:
                            if r.status in (200, 201):
                                return dict(await r.json())
                            # typed, retryable answers only: never a 500, never "sent" but lost
                            assert r.status in (409, 503, 504), (r.status, await r.text())
                    except (TimeoutError, aiohttp.ClientError):
                        pass
                    assert time.monotonic() < deadline, "no answer within a minute"
                    retries += 1
                    await asyncio.sleep(0.2)

            async def visitor(n: int) -> None:
                conv = await until_ok("POST", "/v1/tenants/ha/conversations", {}, {})
                cid, h = conv["conversation_id"], {"Authorization": f"Bearer {conv['visitor_token']}"}
                acknowledged[cid] = []
                for m in range(MESSAGES):
                    text = f"How much is the L2 desk lamp? ({n}/{m})"
                    reply = await until_ok("POST", f"/v1/conversations/{cid}/messages",
                                           {"text": text, "client_msg_id": f"{n}-{m}"}, h)
                    assert "129" in reply["reply"]["text"], reply
                    acknowledged[cid].append((text, reply["seq"]))
                    if sum(len(v) for v in acknowledged.values()) >= CONVERSATIONS:
                        under_way.set()
                    if killed_at:
                        acked_after_kill.append(time.monotonic() - killed_at[0])
                    await asyncio.sleep(0.3)  # a visitor types: the load spans the kill

            load = asyncio.gather(*(visitor(n) for n in range(CONVERSATIONS)))
            await asyncio.wait_for(under_way.wait(), 60)
            info = await bus.js.stream_info("CONV")
            assert info.cluster is not None
            victim = next(n for n in nodes if n.name == info.cluster.leader)
            victim.kill()  # the stream's leader: its followers must elect another to accept anything
            killed_at.append(time.monotonic())
            await asyncio.wait_for(load, 120)

            total = sum(len(v) for v in acknowledged.values())
            assert total == CONVERSATIONS * MESSAGES
            assert acked_after_kill, "nothing was acknowledged after the kill"
            info = await bus.js.stream_info("CONV")
            assert info.cluster is not None and info.cluster.leader != victim.name
            # Read every conversation back from the log (no cache): each acknowledged message once, answered.
            for cid, sent in acknowledged.items():
                async with s.get(f"{base}/v1/conversations/{cid}", headers=admin) as r:
                    assert r.status == 200
                    state = await r.json()
                seqs = [t["seq"] for t in state["turns"]]
                assert seqs == sorted(set(seqs)), f"{cid}: seqs not strictly increasing {seqs}"
                assert [(t["text"], t["seq"]) for t in state["turns"] if t["role"] == "visitor"] == sent
                replies = [t for t in state["turns"] if t["role"] == "bot"]
                assert len(replies) == MESSAGES and all("129" in t["text"] for t in replies)

            # The killed node comes back and catches up: its own copy of CONV ends up as the leader's.
            victim.start()
            wanted = (await bus.js.stream_info("CONV")).state
            deadline = time.monotonic() + 30
            while (copy := conv_copy(victim)).get("last_seq") != wanted.last_seq or copy.get("messages") != wanted.messages:
                assert time.monotonic() < deadline, f"{victim.name} holds {copy}, the leader {wanted}"
                await asyncio.sleep(0.2)
            wait_for_cluster(nodes)
            # ... and serves: a new conversation goes through with the restarted node in the cluster.
            conv = await until_ok("POST", "/v1/tenants/ha/conversations", {}, {})
            reply = await until_ok("POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                                   {"text": "How much is the L2 desk lamp?"},
                                   {"Authorization": f"Bearer {conv['visitor_token']}"})
            assert "129" in reply["reply"]["text"]
        print(f"retries {retries}; first ack after the kill {min(acked_after_kill):.2f} s")
        await bus.close()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for n in nodes:
            n.stop()
