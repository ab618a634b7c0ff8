"""python -m bench.durability: what JetStream's ``sync_interval: always`` (fsync before every ack) costs
against the server's default (fsync every 2 minutes), on one nats-server (replicas 1) and on a 3-node
cluster (replicas 3), all in the same run.

Each setup gets a stream configured as CONV (kefu.shared.streams.conv_stream) and CONV-sized events
(~600 bytes, one subject per conversation, a Nats-Msg-Id each):

- sequential: one publish, wait for its ack, the next (what one dialogue turn does): p50/p99 latency;
- concurrent: 64 publishes in flight at a time (many turns at once): acknowledged messages per second.

The baseline is the default sync interval of the same setup; ``ratio`` is always / default.
Writes bench/results/durability.json.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.run import write
from kefu.shared.bus import Bus, ensure_stream
from kefu.shared.natsserver import NatsServer, wait_for_cluster
from kefu.shared.streams import conv_stream

SEQUENTIAL = 600
CONCURRENT = 3000
IN_FLIGHT = 64
CONVERSATIONS = 50
PAYLOAD = os.urandom(600)  # a sealed event is random-looking bytes of about this size


async def _measure(urls: list[str], replicas: int) -> dict:
    bus = await Bus.connect(urls, "bench-durability", stream_replicas=replicas)
    try:
        await ensure_stream(bus.js, conv_stream())
        subjects = [f"kefu.conv.bench.{uuid.uuid4().hex}" for _ in range(CONVERSATIONS)]
        for i in range(50):  # warm-up: leader settled, files open
            await bus.js.publish(subjects[i % CONVERSATIONS], PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
        lat = []
        for i in range(SEQUENTIAL):
            t0 = time.perf_counter()
            await bus.js.publish(subjects[i % CONVERSATIONS], PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with slots:
                await bus.js.publish(subjects[i % CONVERSATIONS], PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        rate = CONCURRENT / (time.perf_counter() - t0)
        return {"sequential_ack_ms": {"p50": round(statistics.median(lat), 3),
                                      "p99": round(lat[int(len(lat) * 0.99)], 3),
                                      "mean": round(statistics.fmean(lat), 3)},
                "concurrent_acks_per_s": round(rate)}
    finally:
        await bus.close()


async def single(root: Path, sync: str | None) -> dict:
    with NatsServer(root, sync_interval=sync) as server:
        return await _measure([server.url], 1)


async def cluster(root: Path, sync: str | None) -> dict:
    nodes = NatsServer.cluster(root, 3, sync_interval=sync)
    try:
        for n in nodes:
            n.start()
        wait_for_cluster(nodes)
        return await _measure([n.url for n in nodes], 3)
    finally:
        for n in nodes:
            n.stop()


def _compare(default: dict, always: dict) -> dict:
    return {"default": default, "always": always,
            "ratio_always_over_default": {
                "sequential_p50": round(always["sequential_ack_ms"]["p50"] / default["sequential_ack_ms"]["p50"], 2),
                "sequential_p99": round(always["sequential_ack_ms"]["p99"] / default["sequential_ack_ms"]["p99"], 2),
                "concurrent_acks_per_s": round(always["concurrent_acks_per_s"] / default["concurrent_acks_per_s"], 2)}}


async def main() -> None:
    # The store on the disk the data would be on (not a tmpfs): fsync is what is measured.
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", str(Path(__file__).parent))) as tmp:
        root = Path(tmp)
        out = {"single_replicas_1": _compare(await single(root / "s-default", None),
                                             await single(root / "s-always", "always")),
               "cluster_3_replicas_3": _compare(await cluster(root / "c-default", None),
                                                await cluster(root / "c-always", "always"))}
    s, c = out["single_replicas_1"], out["cluster_3_replicas_3"]
    out["summary"] = {
        "baseline": "the same setup with the default sync_interval (2 min), same run",
        "single_always_p50_ms": s["always"]["sequential_ack_ms"]["p50"],
        "single_default_p50_ms": s["default"]["sequential_ack_ms"]["p50"],
        "single_always_acks_per_s": s["always"]["concurrent_acks_per_s"],
        "single_default_acks_per_s": s["default"]["concurrent_acks_per_s"],
        "cluster_default_p50_ms": c["default"]["sequential_ack_ms"]["p50"],
        "cluster_always_p50_ms": c["always"]["sequential_ack_ms"]["p50"],
        "cluster_default_acks_per_s": c["default"]["concurrent_acks_per_s"],
        "cluster_always_acks_per_s": c["always"]["concurrent_acks_per_s"],
    }
    write("durability", {"setup": {"sequential": SEQUENTIAL, "concurrent": CONCURRENT, "in_flight": IN_FLIGHT,
                                   "payload_bytes": len(PAYLOAD), "stream": "CONV (conv_stream())"}, **out})


if __name__ == "__main__":
    asyncio.run(main())
