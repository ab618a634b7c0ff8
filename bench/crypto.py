"""python -m bench.crypto: what encryption at rest adds per conversation event and per turn.

- primitives: sealing and opening a visitor message event, a bot reply event (with its provenance) and
  a cached 20-turn state, AES-256-GCM and SM4-GCM, against protobuf serialization of the same message
  (the work the store does anyway).
- store: ConversationStore appends to stream CONV on a real nats-server with the keyring on and off,
  alternating batches, and a 200-event conversation folded from the log; the difference is the cost.

Writes bench/results/crypto.json.
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
from kefu.dialogue.codec import event_to_proto, state_to_proto
from kefu.dialogue.state import BotReply, Event, Provenance, Started, State, VisitorMessage, reduce
from kefu.dialogue.store import ConversationStore
from kefu.proto.bus.v1 import events_pb2
from kefu.shared.bus import Bus
from kefu.shared.crypto import Keyring, open_event, seal_event
from kefu.shared.natsserver import NatsServer

QUESTION = "我上周买的 X100 Pro 手机屏幕有一条竖线，还在保修期内吗？能不能直接换新？订单号 20261124001"
ANSWER = ("X100 Pro 自签收之日起享受 1 年保修；屏幕出现竖线属于性能故障，签收 15 天内可换新，超过 15 天可免费维修。"
          "请在“我的订单”中提交售后申请，并附上故障照片。")


def _events(tenant: str, cid: str) -> list[Event]:
    prov = Provenance("answered", "X100 Pro 保修 屏幕 竖线", ("保修", "换新"), ("doc1#0", "doc2#3"), (3, 1),
                      (0.91, 0.72), ANSWER[:60], ("1 年", "15 天"), "SmolLM2-135M-Instruct-Q4_1.gguf",
                      '{"temperature": 0.0}', "ab" * 32, False, 1480, "")
    return [Event(uuid.uuid4().hex, cid, tenant, 1, 1, "dialogue/x", 2,
                  VisitorMessage(QUESTION, "m1", (("product", "X100 Pro"),))),
            Event(uuid.uuid4().hex, cid, tenant, 2, 2, "dialogue/x", 3, BotReply(ANSWER, "kb", ("doc1",), 1, prov))]


def _per_call_us(fn, n: int) -> float:  # noqa: ANN001
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


async def primitives(bus: Bus) -> dict:
    out: dict = {}
    tenant, cid = "bench", uuid.uuid4().hex
    visitor, bot = _events(tenant, cid)
    state = State(cid, tenant)
    for i in range(10):
        for ev in _events(tenant, cid):
            state = reduce(state, Event(ev.id, cid, tenant, state.seq + 1, i, ev.writer, state.lamport + 1, ev.body))
    state_bytes = state_to_proto(state).SerializeToString()
    master = os.urandom(32)
    for suite in ("aes", "sm"):
        tenant = f"bench-{suite}"  # a tenant's first data key takes the suite of the keyring that made it
        visitor, bot = (Event(e.id, cid, tenant, e.seq, e.ts_ms, e.writer, e.lamport, e.body) for e in (visitor, bot))
        ring = Keyring(bus.js, master, suite=suite)
        await ring.seal(tenant, b"warm", "c")  # the tenant's key is created and cached
        row: dict = {}
        for name, ev in (("visitor_event", visitor), ("bot_event", bot)):
            pb = event_to_proto(ev)
            sealed = await seal_event(ring, pb)
            data = sealed.SerializeToString()
            row[name] = {
                "bytes_clear": len(pb.SerializeToString()), "bytes_sealed": len(data),
                "serialize_us": _per_call_us(pb.SerializeToString, 2000),
            }
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                await seal_event(ring, pb)
            row[name]["seal_us"] = (time.perf_counter() - t0) / n * 1e6
            t0 = time.perf_counter()
            for _ in range(n):
                await open_event(ring, events_pb2.Event.FromString(data))
            row[name]["open_us"] = (time.perf_counter() - t0) / n * 1e6
            clear = pb.SerializeToString()
            t0 = time.perf_counter()
            for _ in range(n):
                events_pb2.Event.FromString(clear)
            row[name]["parse_clear_us"] = (time.perf_counter() - t0) / n * 1e6
        n = 1000
        t0 = time.perf_counter()
        for _ in range(n):
            blob = await ring.seal(tenant, state_bytes, f"conv_state/{cid}")
        seal_state = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            await ring.open(blob, f"conv_state/{cid}")
        row["state_20_turns"] = {"bytes": len(state_bytes), "seal_us": seal_state,
                                 "open_us": (time.perf_counter() - t0) / n * 1e6,
                                 "serialize_us": _per_call_us(lambda: state_to_proto(state).SerializeToString(), 200)}
        # A turn seals its visitor message, its reply, the cached state and the model's job once each.
        row["per_turn_added_us"] = (row["visitor_event"]["seal_us"] + row["bot_event"]["seal_us"]
                                    + seal_state + row["visitor_event"]["seal_us"])
        out[suite] = row
    return out


async def store_appends(bus: Bus, rounds: int = 6, batch: int = 150) -> dict:
    """Appends (publish + ack) with encryption off and on, alternating batches; and a 200-event fold."""
    stores = {"off": ConversationStore(bus, "bench/off"),
              "on": ConversationStore(bus, "bench/on", keyring=Keyring(bus.js, os.urandom(32)))}
    for s in stores.values():
        await s.setup()
    per_event: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode, store in stores.items():
            state, _ = await store.append(State(uuid.uuid4().hex, "bench"), Started("v"))
            t0 = time.perf_counter()
            for i in range(batch):
                body = VisitorMessage(QUESTION, f"m{i}") if i % 2 == 0 else BotReply(ANSWER, "kb", ("doc1",), i)
                state, _ = await store.append(state, body, cache=False)
            per_event[mode].append((time.perf_counter() - t0) / batch * 1000)
    fold: dict[str, float] = {}
    for mode, store in stores.items():
        state, _ = await store.append(State(uuid.uuid4().hex, "bench"), Started("v"))
        for i in range(199):
            state, _ = await store.append(state, VisitorMessage(QUESTION, f"f{i}"), cache=False)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            await store.load(state.conversation_id, verify=True)
            times.append((time.perf_counter() - t0) * 1000)
            await store.kv.delete(state.conversation_id)  # type: ignore[union-attr]
        fold[mode] = statistics.median(times)
    off, on = statistics.median(per_event["off"]), statistics.median(per_event["on"])
    return {"append_ms_per_event": {"off": round(off, 4), "on": round(on, 4), "added": round(on - off, 4)},
            "fold_200_events_ms": {k: round(v, 2) for k, v in fold.items()},
            "rounds": rounds, "batch": batch}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as nats:
        bus = await Bus.connect([nats.url], "bench-crypto")
        try:
            report = {"primitives_us": await primitives(bus), "store": await store_appends(bus)}
        finally:
            await bus.close()
    aes = report["primitives_us"]["aes"]
    report["summary"] = {
        "per_turn_added_ms_aes": round(aes["per_turn_added_us"] / 1000, 3),
        "per_turn_added_ms_sm4": round(report["primitives_us"]["sm"]["per_turn_added_us"] / 1000, 3),
        "append_added_ms_per_event": report["store"]["append_ms_per_event"]["added"],
        "target": "dialogue per-turn overhead <= 5 ms in all",
    }
    write("crypto", report)


if __name__ == "__main__":
    asyncio.run(main())
