"""kill -9 of the dialogue service in the middle of 200 concurrent conversations: no acknowledged
message is lost, no turn is duplicated, per-conversation seqs strictly increase (real nats-server,
dialogue as its own process, clients retrying with their client_msg_id as a real widget does)."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.retrieval.app import RetrievalService, RetrievalSettings
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.chaos]

CONVERSATIONS = 200
MESSAGES = 3
ADMIN = "chaos-admin-token"


def start_dialogue(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kefu.dialogue"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def test_kill_dialogue_under_load_loses_and_duplicates_nothing(tmp_path, models_data_dir, monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", ADMIN)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_data_dir / "models")
    with NatsServer(tmp_path / "js") as nats:
        common = {"nats_url": nats.url, "data_dir": data, "log_level": "warning"}
        stop = asyncio.Event()
        tasks = [await start_in_background(RetrievalService(RetrievalSettings(**common)), stop)]
        gateway = GatewayService(GatewaySettings(**common, http_port=0, grpc_port=0, turn_timeout=5,
                                                 # a load test from one address: no limit gets in the way
                                                 **{f"rate_{k}_{x}": 1e6 for k in ("messages", "ip_messages",
                                                                                   "tenant_messages", "starts",
                                                                                   "tenant_starts")
                                                    for x in ("per_second", "burst")}))
        tasks.append(await start_in_background(gateway, stop))
        env = dict(os.environ, KEFU_NATS_URL=nats.url, KEFU_DATA_DIR=str(data), KEFU_LLM_ENABLED="false",
                   KEFU_LOG_LEVEL="warning")
        dialogue = start_dialogue(env)
        base = f"http://127.0.0.1:{gateway.http_port}"
        acknowledged: dict[str, list[tuple[str, int]]] = {}
        retries = 0
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                async with s.put(f"{base}/v1/tenants/chaos/documents/lamp", headers={"Authorization": f"Bearer {ADMIN}"},
                                 json={"title": "Desk lamp L2", "text": "The L2 desk lamp costs 129 yuan."}) as r:
                    assert r.status == 200

                async def until_ok(method: str, path: str, body: dict, headers: dict) -> dict:
                    nonlocal retries
                    deadline = time.monotonic() + 120
                    while True:
                        try:
                            async with s.request(method, base + path, json=body, headers=headers) as r:
                                if r.status in (200, 201):
                                    return await r.json()
                                assert r.status in (409, 503, 504), (r.status, await r.text())
                        except (TimeoutError, aiohttp.ClientError):
                            pass
                        assert time.monotonic() < deadline, "no answer within two minutes"
                        retries += 1
                        await asyncio.sleep(0.2)

                async def visitor(n: int) -> None:
                    conv = await until_ok("POST", "/v1/tenants/chaos/conversations", {}, {})
                    cid, h = conv["conversation_id"], {"Authorization": f"Bearer {conv['visitor_token']}"}
                    acknowledged[cid] = []
                    for m in range(MESSAGES):
                        text = f"How much is the L2 desk lamp? ({n}/{m})"
                        reply = await until_ok("POST", f"/v1/conversations/{cid}/messages",
                                               {"text": text, "client_msg_id": f"{n}-{m}"}, h)
                        acknowledged[cid].append((text, reply["seq"]))

                load = asyncio.gather(*(visitor(n) for n in range(CONVERSATIONS)))
                await asyncio.sleep(1.5)
                assert dialogue.poll() is None and not load.done()  # killed in the middle, not after
                done_before = sum(len(v) for v in acknowledged.values())
                dialogue.send_signal(signal.SIGKILL)
                dialogue.wait()
                await asyncio.sleep(1.0)
                dialogue = start_dialogue(env)
                await asyncio.wait_for(load, 300)

                assert len(acknowledged) == CONVERSATIONS
                assert retries > 0 and done_before < CONVERSATIONS * MESSAGES  # the kill cut requests short
                for cid, sent in acknowledged.items():
                    async with s.get(f"{base}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                        state = await r.json()
                    turns = state["turns"]
                    seqs = [t["seq"] for t in turns]
                    assert seqs == sorted(set(seqs)), f"{cid}: seqs not strictly increasing {seqs}"
                    visitor_turns = [(t["text"], t["seq"]) for t in turns if t["role"] == "visitor"]
                    assert visitor_turns == sent, f"{cid}: {visitor_turns} != {sent}"  # none lost, none twice
                    replies = [t for t in turns if t["role"] == "bot"]
                    assert len(replies) == MESSAGES and all("129" in t["text"] for t in replies)
        finally:
            dialogue.kill()
            dialogue.wait()
            stop.set()
            await asyncio.gather(*tasks)
