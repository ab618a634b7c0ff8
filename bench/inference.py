"""Inference benchmark (part of `make bench`; alone: `python -m bench.inference`): what the inference
service adds around the engine, measured through the real service on a real nats-server.

- prefix: time to first token with a repeated 600-token prompt prefix (system prompt and knowledge
  passages, a different question each time), prefix cache on against off, same service otherwise.
- concurrency: 16 jobs sent at once to one replica: none may fail; latency spread (max/min) and the
  engine time per job; then the same load on two replicas against one (throughput ratio; this machine
  has 2 cores, so two replicas share them).
- ocr: a generated 1080p Chinese/English screenshot read by the real RapidOCR models: character accuracy
  and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.run import write

PREFIX_TOKENS = 600


@dataclass
class Timing:
    ttft_s: float
    total_s: float
    tokens: int
    error: str = ""


async def timed_job(bus, messages: list[dict[str, str]], max_tokens: int, sent: float | None = None) -> Timing:
    """Send one generation job over the LLM work queue and time its chunks at the requester's inbox."""
    from kefu.proto.bus.v1 import llm_pb2
    from kefu.shared.streams import LLM_GENERATE

    async with bus.inbox() as (inbox, sub):
        job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=max_tokens, temperature=0, seed=1,
                                      reply_inbox=inbox, deadline_ms=int((time.time() + 600) * 1000),
                                      messages=[llm_pb2.ChatMessage(**m) for m in messages])
        t0 = sent if sent is not None else time.perf_counter()
        await bus.js.publish(LLM_GENERATE, job.SerializeToString())
        first, n = None, 0
        while True:
            chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=600)).data)
            if chunk.text:
                n += 1
                first = first or time.perf_counter()
            if chunk.done:
                end = time.perf_counter()
                return Timing((first or end) - t0, end - t0, chunk.completion_tokens or n, chunk.error_code)


def prefix_messages(question: str, tokens: int = PREFIX_TOKENS) -> list[dict[str, str]]:
    """A system prompt with knowledge passages of about ``tokens`` tokens, then ``question``."""
    passages = " ".join(f"The K{i} kettle costs {100 + i} yuan, holds 1.{i % 10} litres and has a {1 + i % 3}-year "
                        "warranty." for i in range(tokens // 22))
    return [{"role": "system", "content": "You are a customer service assistant. Answer from the reference.\n"
                                          f"Reference: {passages}"},
            {"role": "user", "content": question}]


class Stack:
    """A nats-server and inference replicas in this process."""

    def __init__(self, tmp: Path, data_dir: Path) -> None:
        self.tmp, self.data_dir = tmp, data_dir

    async def __aenter__(self) -> Stack:
        from kefu.shared.bus import Bus
        from kefu.shared.natsserver import NatsServer

        self.nats = NatsServer(self.tmp / "js")
        self.nats.__enter__()
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.bus = await Bus.connect([self.nats.url], "bench")
        return self

    async def replica(self, **settings: object) -> object:
        from kefu.inference.app import InferenceService, InferenceSettings
        from kefu.shared.service import start_in_background

        service = InferenceService(InferenceSettings(nats_url=self.nats.url, data_dir=self.data_dir,
                                                     log_level="warning", ocr_enabled=False, **settings))
        self.tasks.append(await start_in_background(service, self.stop))
        return service

    async def __aexit__(self, *exc: object) -> None:
        await self.bus.close()
        self.stop.set()
        await asyncio.gather(*self.tasks)
        self.nats.__exit__(None, None, None)


async def prefix(data_dir: Path, runs: int) -> dict:
    results = {}
    for cache in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            async with Stack(Path(tmp), data_dir) as stack:
                await stack.replica(llm_prefix_cache=cache)
                await timed_job(stack.bus, prefix_messages("How much is the K3?"), 8)  # warm-up
                ttft = [(await timed_job(stack.bus, prefix_messages(f"How much is the K{i}?"), 8)).ttft_s
                        for i in range(runs)]
                results["on" if cache else "off"] = statistics.median(ttft)
    return {"what": f"time to first token, {PREFIX_TOKENS}-token prefix repeated, a new question each job",
            "figure_ttft_s_cache_on": round(results["on"], 4), "baseline_ttft_s_cache_off": round(results["off"], 4),
            "speedup": round(results["off"] / results["on"], 1), "target_speedup": 5}


async def concurrency(data_dir: Path, jobs: int = 16, max_tokens: int = 32) -> dict:
    questions = [[{"role": "user", "content": f"Tell the customer about the K{i} kettle in two sentences."}]
                 for i in range(jobs)]

    async def burst(replicas: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            async with Stack(Path(tmp), data_dir) as stack:
                # Two replicas share the 2 cores: one thread each; one replica gets both.
                for _ in range(replicas):
                    await stack.replica(llm_threads=max(1, (os.cpu_count() or 2) // replicas))
                await timed_job(stack.bus, questions[0], 4)
                t0 = time.perf_counter()
                timings = await asyncio.gather(*(timed_job(stack.bus, q, max_tokens, sent=t0) for q in questions))
                wall = time.perf_counter() - t0
        latency = [t.total_s for t in timings]
        return {"replicas": replicas, "jobs": jobs, "failed": sum(bool(t.error) for t in timings),
                "wall_s": round(wall, 3), "jobs_per_s": round(jobs / wall, 3),
                "tokens_per_s": round(sum(t.tokens for t in timings) / wall, 1),
                "latency_p50_s": round(statistics.median(latency), 3), "latency_max_s": round(max(latency), 3),
                "latency_min_s": round(min(latency), 3), "latency_max_over_min": round(max(latency) / min(latency), 1)}

    one = await burst(1)
    two = await burst(2)
    return {"one_replica": one, "two_replicas": two,
            "throughput_ratio_two_to_one": round(two["tokens_per_s"] / one["tokens_per_s"], 2),
            "note": f"{os.cpu_count()} cores: two replicas split them (1 thread each), one replica gets both "
                    "threads; the queue hands a job only to a replica with a free slot, so jobs are served in "
                    "order (FIFO) and the spread of end-to-end latency is the wait in the queue"}


def ocr(runs: int) -> dict:
    from kefu.inference.ocr import OcrEngine
    from kefu.shared.testing import SCREENSHOT_LINES, char_accuracy, screenshot

    engine = OcrEngine()
    png = screenshot()
    engine.recognize(png)  # warm-up (the first call initializes the ONNX sessions)
    latency, accuracy = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        found = engine.recognize(png)
        latency.append(time.perf_counter() - t0)
        accuracy.append(char_accuracy("\n".join(SCREENSHOT_LINES), found.text))
    return {"what": "1920x1080 screenshot, 10 lines of Chinese and English (WenQuanYi Micro Hei), RapidOCR PP-OCRv4",
            "char_accuracy": round(min(accuracy), 4), "target_accuracy": 0.95,
            "latency_p50_s": round(statistics.median(latency), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    data_dir = Path(os.environ.get("KEFU_DATA_DIR", ".kefu"))
    write("inference-extra", {
        "prefix_cache": asyncio.run(prefix(data_dir, args.runs)),
        "concurrency": asyncio.run(concurrency(data_dir)),
        "ocr": ocr(args.runs),
    })


if __name__ == "__main__":
    main()
