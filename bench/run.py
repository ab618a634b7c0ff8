"""make bench: measure kefu against the raw engines it wraps, in the same run, and write JSON reports.

- inference: tokens/s and time to first token through the inference service (NATS work queue, chunks
  to an inbox) against raw llama-cpp-python on the same model, prompt and settings.
- answer: end-to-end latency of a visitor message through the gateway (HTTP → dialogue → retrieval →
  inference → reply), and knowledge freshness (PUT acknowledged → searchable).

Medians over several runs; absolute numbers drift on a shared machine, ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "system", "content": "You are a helpful customer service assistant."},
          {"role": "user", "content": "Explain in detail how to return a product that arrived damaged."}]
MAX_TOKENS = 128


def write(name: str, report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    report = {"benchmark": name, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False))


def _raw_once(llm, messages: list[dict[str, str]] = PROMPT, max_tokens: int = MAX_TOKENS) -> tuple[float, float, int]:
    """One streamed generation on the raw engine: (time to first token, decode tokens/s, tokens)."""
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0, seed=1, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 else 0.0, n


async def engine_vs_service(data_dir: Path, model: Path, runs: int, threads: int) -> tuple[dict, dict]:
    """Raw llama-cpp-python and the inference service (its own process, jobs over the NATS work queue)
    on the same model, prompt and settings, run by turns (raw, service, raw, ...) so that the machine's
    drift falls on both alike."""
    import subprocess
    import sys

    from bench.inference import timed_job
    from kefu.inference.backend import open_llama
    from kefu.proto.bus.v1 import common_pb2
    from kefu.shared.bus import Bus
    from kefu.shared.errors import KefuError
    from kefu.shared.natsserver import NatsServer

    # Like the service, the engine keeps its context between calls, so the prompt prefix is reused.
    llm = open_llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    raw: dict[str, list[float]] = {"ttft": [], "tps": []}
    svc: dict[str, list[float]] = {"ttft": [], "tps": []}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as nats:
        env = dict(os.environ, KEFU_NATS_URL=nats.url, KEFU_DATA_DIR=str(data_dir), KEFU_LLM_THREADS=str(threads),
                   KEFU_LOG_LEVEL="warning", KEFU_OCR_ENABLED="false")
        proc = subprocess.Popen([sys.executable, "-m", "kefu.inference"], env=env)  # noqa: ASYNC220 - started once
        bus = await Bus.connect([nats.url], "bench")
        try:
            while True:
                try:
                    await bus.request("kefu.health.inference", common_pb2.HealthRequest(), common_pb2.HealthReply,
                                      timeout=1)
                    break
                except KefuError:
                    assert proc.poll() is None, "inference exited"
                    await asyncio.sleep(0.2)
            _raw_once(llm)  # warm both: the first run of each evaluates the whole prompt
            await timed_job(bus, PROMPT, MAX_TOKENS)
            for _ in range(runs):
                ttft, tps, n = _raw_once(llm)
                raw["ttft"].append(ttft)
                raw["tps"].append(tps)
                t = await timed_job(bus, PROMPT, MAX_TOKENS)
                svc["ttft"].append(t.ttft_s)
                svc["tps"].append((t.tokens - 1) / (t.total_s - t.ttft_s))
        finally:
            await bus.close()
            proc.terminate()
            proc.wait(30)
    del llm

    def summary(d: dict[str, list[float]]) -> dict:
        return {"decode_tokens_per_s": statistics.median(d["tps"]), "ttft_s": statistics.median(d["ttft"]),
                "tokens": n}

    return summary(raw), summary(svc)


async def answer_path(runs: int) -> dict:
    """Visitor message latency through the in-process stack, and KB freshness."""
    import aiohttp

    from kefu.shared.models import models_dir, pull
    from kefu.shared.natsserver import NatsServer
    from kefu.shared.service import start_in_background

    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "js") as nats:
        data = Path(tmp) / "data"
        pull(models_dir(data))
        os.environ["KEFU_ADMIN_TOKEN"] = admin = "bench-admin-token"
        from kefu.dialogue.app import DialogueService, DialogueSettings
        from kefu.gateway.app import GatewayService, GatewaySettings
        from kefu.inference.app import InferenceService, InferenceSettings
        from kefu.retrieval.app import RetrievalService, RetrievalSettings

        common = {"nats_url": nats.url, "data_dir": data, "log_level": "warning"}
        gw = GatewayService(GatewaySettings(**common, http_port=0, grpc_port=0, ready_services="dialogue,retrieval,inference",
                                            rate_messages_per_second=1e6, rate_messages_burst=1e6))
        services = [InferenceService(InferenceSettings(**common)), RetrievalService(RetrievalSettings(**common)),
                    DialogueService(DialogueSettings(**common)), gw]
        stop = asyncio.Event()
        tasks = [await start_in_background(s, stop) for s in services]
        base = f"http://127.0.0.1:{gw.http_port}"
        h = {"Authorization": f"Bearer {admin}"}
        fresh, latency, first_delta = [], [], []
        async with aiohttp.ClientSession() as s:
            for i in range(runs):
                t0 = time.perf_counter()
                async with s.put(f"{base}/v1/tenants/bench/documents/doc{i}", headers=h,
                                 json={"title": f"Product P{i}", "text": f"The P{i} kettle costs {100 + i} yuan."}) as r:
                    assert r.status == 200
                t_ack = time.perf_counter()
                async with s.get(f"{base}/v1/tenants/bench/search", params={"q": f"P{i} kettle", "k": "1"},
                                 headers=h) as r:
                    hits = (await r.json())["hits"]
                    assert hits and hits[0]["doc_id"] == f"doc{i}"
                fresh.append(time.perf_counter() - t_ack)
                del t0
            async with s.post(f"{base}/v1/tenants/bench/conversations", json={}) as r:
                conv = await r.json()
            vh = {"Authorization": f"Bearer {conv['visitor_token']}", "Accept": "text/event-stream"}
            for i in range(runs):
                t0 = time.perf_counter()
                first = None
                async with s.post(f"{base}/v1/conversations/{conv['conversation_id']}/messages", headers=vh,
                                  json={"text": f"How much is the P{i} kettle?"}) as r:
                    async for line in r.content:
                        if line.startswith(b"event: delta") and first is None:
                            first = time.perf_counter()
                latency.append(time.perf_counter() - t0)
                first_delta.append((first or time.perf_counter()) - t0)
        stop.set()
        await asyncio.gather(*tasks)
    return {"freshness_s": statistics.median(fresh), "answer_latency_s": statistics.median(latency),
            "answer_latency_p90_s": sorted(latency)[int(0.9 * (len(latency) - 1))],
            "first_delta_s": statistics.median(first_delta)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from kefu.shared.models import DEFAULT_LLM, resolve

    data_dir = Path(os.environ.get("KEFU_DATA_DIR", ".kefu"))
    model = resolve(DEFAULT_LLM, data_dir)
    raw, svc = asyncio.run(engine_vs_service(data_dir, model, args.runs, args.threads))
    write("inference", {
        "figure": {"what": "kefu inference service, streamed to an inbox over NATS", **svc},
        "baseline": {"what": "raw llama-cpp-python create_chat_completion(stream=True), same model/prompt", **raw},
        "ratio_decode": svc["decode_tokens_per_s"] / raw["decode_tokens_per_s"],
        "ratio_ttft": svc["ttft_s"] / raw["ttft_s"],
        "model": model.name, "max_tokens": MAX_TOKENS, "threads": args.threads, "runs": args.runs,
        "method": "raw and service runs alternate, medians of each",
    })
    path = asyncio.run(answer_path(args.runs * 2))
    write("answer", {
        "figure": {"what": "visitor message through gateway, dialogue, retrieval and inference (SSE)", **path},
        "baseline": {"what": "raw llama-cpp-python decode of the same model, for scale",
                     "ttft_s": raw["ttft_s"], "decode_tokens_per_s": raw["decode_tokens_per_s"]},
        "runs": args.runs * 2,
    })


if __name__ == "__main__":
    main()
