"""kill -9 of each service in turn, every few seconds, under hundreds of concurrent conversations: no
acknowledged visitor message lost, none stored or answered twice, per-conversation seqs strictly
increasing; every killed replica comes back. Once with extractive answers (the load the 2-core machine
can carry), once with the real model generating."""

from __future__ import annotations

import asyncio
import time

import pytest
from chaos_harness import (  # type: ignore[import-not-found]
    FULL,
    TIMEOUT,
    Audit,
    ChaosStack,
    Tally,
    Visitor,
    client,
    conversation,
    record,
    scaled,
)

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.chaos, pytest.mark.timeout(TIMEOUT)]

EVERY = ["gateway-a", "dialogue", "retrieval-a", "inference", "plugins", "gateway-b", "retrieval-b"]


async def kill_in_turn(stack: ChaosStack, order: list[str], rounds: int, interval: float) -> list[dict]:
    """Every ``interval`` seconds kill -9 the next replica of ``order`` and start it again (what a
    supervisor does); the next kill waits until it is back, so one gateway replica is always there."""
    kills = []
    for _ in range(rounds):
        for name in order:
            await asyncio.sleep(interval)
            proc = stack.procs[name]
            assert proc.alive, f"{name} died on its own:\n{proc.tail()}"
            proc.kill()
            proc.start()
            back = await stack.healthy([name], timeout=180)
            kills.append({"replica": name, "back_s": round(back, 2)})
    return kills


async def chaos_run(stack: ChaosStack, conversations: int, order: list[str], rounds: int, interval: float,
                    think_s: float) -> tuple[Audit, Tally, dict]:
    tally = Tally()
    async with client(75) as s:
        visitors = [Visitor(n, s, stack.gateways, tally) for n in range(conversations)]
        await asyncio.gather(*(v.start() for v in visitors))
        done = asyncio.Event()
        load = asyncio.gather(*(v.chat(done, think_s) for v in visitors))
        t0 = time.monotonic()
        try:
            kills = await kill_in_turn(stack, order, rounds, interval)
        finally:
            done.set()
        chaos_s = time.monotonic() - t0
        await asyncio.wait_for(load, 240)
        audit = Audit()
        for v in visitors:
            audit.check(await conversation(s, stack.gateways[0], v.cid), v.sent)
    figures = {**audit.figures(), "concurrent_conversations": conversations, "chaos_s": round(chaos_s, 1),
               "requests": tally.attempts, "retries": tally.retries, "gateway_failovers": tally.failovers,
               "retried_on": tally.statuses, "longest_wait_for_an_ack_s": round(tally.longest_gap(t0, t0 + chaos_s), 2),
               "kills": kills}
    return audit, tally, figures


async def test_kill_each_service_in_turn_under_load(stack: ChaosStack) -> None:
    conversations = scaled(100, 500)
    # The short run leaves retrieval out (a replica takes longest to come back; its crash is
    # test_retrieval_crash.py's own scenario).
    order = EVERY if scaled(False, True) else [n for n in EVERY if not n.startswith("retrieval")]
    audit, tally, figures = await chaos_run(stack, conversations, order, rounds=scaled(1, 2),
                                            interval=scaled(2.0, 4.0), think_s=scaled(0.5, 1.0))
    record("kill_each_extractive", figures)
    audit.assert_clean()
    assert audit.lost == audit.duplicated == audit.unanswered == 0
    assert audit.conversations == conversations and tally.retries > 0  # the kills did cut requests short
    assert {k["replica"] for k in figures["kills"]} == set(order)
    # Answers stay grounded through it all: every reply is the lamp's price.
    assert all("129" in t["text"] for t in audit.bot_turns), [t["text"] for t in audit.bot_turns if "129" not in t["text"]][:3]


@pytest.mark.skipif(not FULL, reason="full scale only (make test-chaos): test_inference_kill.py kills the model "
                    "mid-generation in the short run")
async def test_kill_each_service_in_turn_with_the_real_model(stack: ChaosStack) -> None:
    dialogue = stack.procs["dialogue"]
    dialogue.env["KEFU_LLM_ENABLED"] = "true"
    try:
        dialogue.stop()
        dialogue.start()
        await stack.healthy(["dialogue"])
        audit, tally, figures = await chaos_run(stack, 40, EVERY, rounds=1, interval=4.0, think_s=1.0)
        generated = [t for t in audit.bot_turns if t.get("provenance", {}).get("model")]
        figures.update(replies_the_model_was_asked_for=len(generated),
                       replies_generated=sum(1 for t in audit.bot_turns if t.get("source") == "llm"),
                       generation_errors={e: sum(1 for t in generated if t["provenance"].get("generation_error") == e)
                                          for e in {t["provenance"].get("generation_error", "") for t in generated}})
        record("kill_each_real_model", figures)
        audit.assert_clean()
        assert audit.lost == audit.duplicated == audit.unanswered == 0
        assert generated, "the model was never asked"
        assert all("129" in t["text"] for t in audit.bot_turns)
    finally:
        dialogue.env["KEFU_LLM_ENABLED"] = "false"
        dialogue.stop()
        dialogue.start()
        await stack.healthy(["dialogue"])
