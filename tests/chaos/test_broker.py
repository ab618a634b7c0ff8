"""The broker itself goes away. Restarted mid-load (same port, same store): every service reconnects, no
consumer is left stuck, WebSocket sessions resume with last_seq. Down for a while: every visitor message
ends either stored or refused with a typed retry error, never shown as sent and lost, and the gateway's
memory stays flat meanwhile."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from chaos_harness import (  # type: ignore[import-not-found]
    QUESTION,
    TIMEOUT,
    Audit,
    ChaosStack,
    Tally,
    Visitor,
    WsVisitor,
    client,
    conversation,
    put_document,
    record,
    scaled,
)

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.chaos, pytest.mark.timeout(TIMEOUT)]

SERVICES = ("gateway", "dialogue", "retrieval", "inference", "plugins")


async def until_drained(stack: ChaosStack, within: float) -> tuple[float, dict]:
    """Seconds until no consumer of any stream has messages pending or unacknowledged (or what is stuck)."""
    t0 = time.monotonic()
    busy: dict = {}
    while time.monotonic() - t0 < within:
        busy = await stack.consumers_busy()
        if not busy:
            return time.monotonic() - t0, {}
        await asyncio.sleep(0.5)
    return time.monotonic() - t0, busy


async def test_restarting_nats_mid_load_every_service_reconnects_and_sessions_resume(stack: ChaosStack) -> None:
    tally = Tally()
    async with client(75) as s:
        visitors = [WsVisitor(n, s, stack.gateways[n % 2], tally) for n in range(scaled(40, 200))]
        await asyncio.gather(*(v.start() for v in visitors))
        for v in visitors:
            await v.connect()
        done = asyncio.Event()
        load = asyncio.gather(*(v.chat(done, scaled(0.3, 0.6)) for v in visitors))
        # Mid-load: every session has had a reply (a busy machine takes a while for the first of them).
        t0 = time.monotonic()
        while not all(v.last_seq for v in visitors):
            assert not load.done() and time.monotonic() - t0 < 120, "sessions without a reply before the restart"
            await asyncio.sleep(0.2)
        await asyncio.sleep(scaled(1, 5))
        assert not load.done()
        before = {v.cid: v.last_seq for v in visitors}  # where each session stood before the broker went
        stack.stop_nats()
        t_down = time.monotonic()
        stack.start_nats()
        downtime = time.monotonic() - t_down
        reconnected = await stack.healthy(list(stack.procs), timeout=120)
        acked_at_restart = tally.acked
        await asyncio.sleep(scaled(3, 8))
        done.set()
        await asyncio.wait_for(load, 180)
        first_ack_after = min((t for t in tally.ack_times if t > t_down), default=float("inf")) - t_down
        assert tally.acked > acked_at_restart, "no message was answered after the restart"

        # No consumer stuck: what is pending drains (the LLM work queue, the KB replicas' consumers).
        drained_s, stuck = await until_drained(stack, 60)
        assert not stuck, f"consumers still busy after 60 s: {stuck}"
        # The retrieval replicas' KB consumers came back: a document stored now is applied by both.
        doc = await put_document(s, stack.gateways, "after-restart", {"title": "Returns", "text":
                                 "Returns are accepted within 30 days of delivery."})
        t0 = time.monotonic()
        while True:
            applied = {i: int(d.get("applied_seq", 0)) for i, d in (await stack.health("retrieval")).items()}
            if len(applied) == 2 and min(applied.values()) >= doc["version"]:
                break
            assert time.monotonic() - t0 < 30, f"retrieval replicas stuck behind the KB: {applied} < {doc['version']}"
            await asyncio.sleep(0.2)

        audit = Audit()
        resumed, replay_wrong = 0, []
        for v in visitors:
            await v.ws.close() if v.ws is not None else None
            state = await conversation(s, stack.gateways[0], v.cid)
            audit.check(state, v.sent)
            # The session as it stood before the restart resumes: every reply after it, in order, once.
            expected = [t["seq"] for t in state["turns"] if t["role"] == "bot" and t["seq"] > before[v.cid]]
            got = await v.replayed_after(before[v.cid], len(expected))
            if got == expected:
                resumed += 1
            else:
                replay_wrong.append(f"{v.cid}: after {before[v.cid]} got {got}, expected {expected}")
    record("nats_restart", {**audit.figures(), "websocket_sessions": len(visitors), "restart_downtime_s":
                            round(downtime, 2), "every_service_healthy_after_s": round(reconnected, 2),
                            "first_ack_after_restart_s": round(first_ack_after, 2),
                            "consumers_drained_after_s": round(drained_s, 2), "sessions_resumed": resumed,
                            "retries": tally.retries, "retried_on": tally.statuses})
    audit.assert_clean()
    assert not replay_wrong, "\n".join(replay_wrong[:5])


async def test_a_broker_outage_refuses_messages_with_a_typed_error_and_loses_none(stack: ChaosStack) -> None:
    outage_s = scaled(10, 30)
    pace_s = scaled(0.5, 1.0)
    tally = Tally()
    gateways = {n: stack.procs[n] for n in ("gateway-a", "gateway-b")}
    outcomes: dict[str, int] = {}
    refusal_s: list[float] = []
    rss: dict[str, list[float]] = {n: [] for n in gateways}
    async with client(120) as s:
        visitors = [Visitor(n, s, stack.gateways, tally) for n in range(scaled(30, 100))]
        await asyncio.gather(*(v.start() for v in visitors))
        await asyncio.gather(*(v.say(f"{QUESTION} ({v.n}/first)", f"o{v.n}-first") for v in visitors))
        rss_before = {n: p.rss_mb() for n, p in gateways.items()}
        refused: dict[int, list[tuple[str, str]]] = {v.n: [] for v in visitors}
        down = asyncio.Event()
        up = asyncio.Event()

        async def flood(v: Visitor) -> None:
            """One attempt per message while the broker is out; a refused one is kept to be sent again."""
            await down.wait()
            m = 0
            while not up.is_set():
                text, cmid = f"{QUESTION} ({v.n}/outage {m})", f"o{v.n}-{m}"
                m += 1
                t0 = time.monotonic()
                base = v.gateways[v.n % 2]
                try:
                    async with s.post(f"{base}/v1/conversations/{v.cid}/messages", json={"text": text,
                                      "client_msg_id": cmid}, headers={"Authorization": f"Bearer {v.token}"}) as r:
                        body = await r.text()
                        code = json.loads(body).get("error", {}).get("code", "") if r.status != 200 else ""
                        outcomes[f"{r.status} {code}".strip()] = outcomes.get(f"{r.status} {code}".strip(), 0) + 1
                        if r.status == 200:
                            v.sent.append((text, json.loads(body)["seq"]))
                            continue
                        refusal_s.append(time.monotonic() - t0)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                refused[v.n].append((text, cmid))
                await asyncio.sleep(pace_s)  # a visitor typing fast: each message its own

        async def sample() -> None:
            while not up.is_set():
                for n, p in gateways.items():
                    rss[n].append(p.rss_mb())
                await asyncio.sleep(0.5)

        flooding = asyncio.gather(*(flood(v) for v in visitors), sample())
        stack.stop_nats()
        t_down = time.monotonic()
        down.set()
        await asyncio.sleep(outage_s)
        stack.start_nats()
        up.set()
        await asyncio.wait_for(flooding, 150)
        back = await stack.healthy(list(stack.procs), timeout=120)
        attempts = sum(outcomes.values())
        # After it: the widget sends each refused message again (same client_msg_id) until it is stored.
        async def resend(v: Visitor) -> None:
            for text, cmid in refused[v.n]:
                await v.say(text, cmid)

        await asyncio.gather(*(resend(v) for v in visitors))
        audit = Audit()
        for v in visitors:
            audit.check(await conversation(s, stack.gateways[0], v.cid), v.sent)
    growth = {n: round(max(rss[n]) - rss_before[n], 1) for n in gateways}
    record("broker_outage", {**audit.figures(), "outage_s": outage_s, "visitors": len(visitors),
                             "attempts_during_outage": attempts, "outcomes_during_outage": outcomes,
                             "slowest_refusal_s": round(max(refusal_s, default=0), 3),
                             "gateway_rss_before_mb": {n: round(v, 1) for n, v in rss_before.items()},
                             "gateway_rss_growth_during_outage_mb": growth,
                             "every_service_healthy_after_s": round(back, 2),
                             "outage_to_all_healthy_s": round(time.monotonic() - t_down, 1)})
    audit.assert_clean()
    # Every attempt while the broker was away was refused with the typed retry error, at once: none
    # hung until a deadline, none was taken (a 200) with nowhere to store it.
    assert set(outcomes) == {"503 service_unavailable"}, outcomes
    assert attempts > len(visitors) and max(refusal_s) < 5.0, (attempts, max(refusal_s))
    assert max(growth.values()) < 40, growth
