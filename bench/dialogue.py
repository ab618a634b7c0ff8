"""Dialogue benchmark (part of `make bench`; alone: `python -m bench.dialogue`): the scripted multi-turn
conversations in data/dialogue/ through the real services (gateway HTTP, dialogue, retrieval, inference
with the bundled model) over the KB in data/retrieval/. Reports the share of turns answered with the
right fact, by kind (follow-ups need memory) and language."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.run import write

DATA = Path(__file__).parent / "data"


async def run(data_dir: Path) -> dict:
    from kefu.dialogue.app import DialogueService, DialogueSettings
    from kefu.gateway.app import GatewayService, GatewaySettings
    from kefu.inference.app import InferenceService, InferenceSettings
    from kefu.retrieval.app import RetrievalService, RetrievalSettings
    from kefu.shared.models import models_dir
    from kefu.shared.natsserver import NatsServer
    from kefu.shared.service import start_in_background

    kb = [json.loads(line) for line in (DATA / "retrieval" / "kb.jsonl").read_text().splitlines() if line.strip()]
    conversations = json.loads((DATA / "dialogue" / "conversations.json").read_text())
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "js") as nats:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "models").symlink_to(models_dir(data_dir).resolve())
        os.environ["KEFU_ADMIN_TOKEN"] = admin = "bench-admin-token"
        common = {"nats_url": nats.url, "data_dir": data, "log_level": "warning"}
        gw = GatewayService(GatewaySettings(**common, http_port=0, grpc_port=0, rate_messages_per_second=1e6,
                                            rate_messages_burst=1e6, ready_services="dialogue,retrieval,inference"))
        services = [InferenceService(InferenceSettings(**common)), RetrievalService(RetrievalSettings(**common)),
                    DialogueService(DialogueSettings(**common)), gw]
        stop = asyncio.Event()
        tasks = [await start_in_background(s, stop) for s in services]
        base = f"http://127.0.0.1:{gw.http_port}"
        results = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            for doc in kb:
                async with s.put(f"{base}/v1/tenants/shop/documents/{doc['doc_id']}",
                                 headers={"Authorization": f"Bearer {admin}"},
                                 json={"title": doc["title"], "text": doc["text"]}) as r:
                    assert r.status == 200, await r.text()
            for conv in conversations:
                async with s.post(f"{base}/v1/tenants/shop/conversations", json={}) as r:
                    started = await r.json()
                h = {"Authorization": f"Bearer {started['visitor_token']}"}
                for i, turn in enumerate(conv["turns"]):
                    t0 = time.perf_counter()
                    async with s.post(f"{base}/v1/conversations/{started['conversation_id']}/messages", headers=h,
                                      json={"text": turn["user"]}) as r:
                        reply = (await r.json())["reply"]
                    if turn["kind"] == "handoff":
                        ok = reply["source"] == "handoff"
                    else:
                        ok = any(x in reply["text"] for x in turn["expect_any"])
                    results.append({"conversation": conv["id"], "turn": i + 1, "lang": conv["lang"],
                                    "kind": turn["kind"], "ok": ok, "question": turn["user"],
                                    "answer": reply["text"], "source": reply["source"],
                                    "citations": reply["citations"], "expected_doc": turn["doc_id"],
                                    "latency_s": round(time.perf_counter() - t0, 3)})
        stop.set()
        await asyncio.gather(*tasks)

    def share(rows: list[dict]) -> float:
        return round(sum(r["ok"] for r in rows) / len(rows), 3) if rows else 0.0

    by = {}
    for key in ("kind", "lang"):
        for value in sorted({r[key] for r in results}):
            by[f"{key}={value}"] = share([r for r in results if r[key] == value])
    return {"turns": len(results), "correct": share(results), "follow_up_correct": share(
        [r for r in results if r["kind"] == "follow-up"]), "by": by,
        "target": "follow-ups answered with the right fact >= 0.9", "failures": [r for r in results if not r["ok"]]}


def main() -> None:
    report = asyncio.run(run(Path(os.environ.get("KEFU_DATA_DIR", ".kefu"))))
    write("dialogue", report)


if __name__ == "__main__":
    main()
