"""The load generator of bench/load.py on the real stack, with small numbers: every turn it sends is
answered and cited, read back from the store once, on two gateway and dialogue replicas; the turns and
errors it counts are the ones the services count in their own metrics. Correctness only: the timings are
bench/load.py's to report, never asserted here."""

from __future__ import annotations

import os

import pytest

from bench.load import ADMIN, TENANT, Usage, check_stored, import_kb, kb_documents, questions, run_load, summarize

pytestmark = [pytest.mark.integration, pytest.mark.model]

DOCS = 16  # of bench/data/retrieval's 64: enough questions, a quick import


def turns_answered(metrics: dict[str, float]) -> float:
    return metrics.get("kefu_turn_duration_seconds_count", 0.0)


def rate_limited(metrics: dict[str, float]) -> float:
    return metrics.get('kefu_errors_total{code="rate_limited",service="gateway"}', 0.0)


async def test_every_turn_is_answered_cited_and_stored_once(load_stack):
    stack = load_stack
    await stack.phase("faq", 2, os.cpu_count() or 2)
    docs = kb_documents(DOCS)
    await import_kb(stack.base, TENANT, docs)
    texts = questions({d["doc_id"] for d in docs})
    before = await stack.scrape("dialogue")
    with Usage(stack.pids(), every_s=0.5) as usage:
        run = await run_load(stack.bases, TENANT, texts, sessions=8, seconds=4.0, think_s=0.3, ramp_s=0.5,
                             timeout_s=30.0)
    after = await stack.scrape("dialogue")
    s = summarize(run)

    assert s["turns"]["errors_by_code"] == {}, s["turns"]
    assert s["turns"]["ok"] == s["turns"]["sent"] >= 16
    assert s["turns"]["ok_without_citation"] == 0 and set(s["turns"]["sources"]) == {"kb"}, s["turns"]
    assert s["sessions"]["ws_held_and_answered"] == 6 and s["sessions"]["held_at_end"] == 8  # 75 % on sockets
    assert s["by_transport"]["ws"]["turns"] and s["by_transport"]["http"]["turns"]
    assert {sess.base for sess in run.sessions} == set(stack.bases)  # both gateways served visitors
    # What the generator counted is what dialogue answered.
    assert turns_answered(after) - turns_answered(before) == s["turns"]["ok"]
    stored = await check_stored(ADMIN, run)
    assert stored == {"acknowledged": s["turns"]["ok"], "lost": 0, "duplicated": 0,
                      "acknowledged_without_stored_reply": 0, "stored_beyond_sent": 0,
                      "conversations_out_of_order": 0, "stored_visitor_messages": s["turns"]["ok"]}
    procs = usage.result
    assert {"gateway", "dialogue", "retrieval", "plugins", "nats-server"} <= set(procs)
    assert procs["gateway"]["replicas"] == procs["dialogue"]["replicas"] == 2
    assert all(p["rss_mb"] > 0 and p["cpu_s"] >= 0 for p in procs.values())
    assert procs["dialogue"]["cpu_s"] > 0 and usage.series


async def test_errors_are_counted_by_code(load_stack):
    """Visitors without think time against a gateway that allows 0.5 messages/s per conversation: the
    refusals are counted under their code, exactly as many as the gateway counted, and none became a turn."""
    stack = load_stack
    if "dialogue" not in stack.procs:
        await stack.phase("faq", 1, os.cpu_count() or 2)
        await import_kb(stack.base, TENANT, kb_documents(DOCS))
    proc = stack.start("gateway", KEFU_RATE_MESSAGES_PER_SECOND="0.5", KEFU_RATE_MESSAGES_BURST="2")
    await stack.ready(["gateway"])
    base = f"http://127.0.0.1:{stack.http_ports[proc.pid]}"
    texts = questions({d["doc_id"] for d in kb_documents(DOCS)})
    gw0, dl0 = await stack.scrape("gateway"), await stack.scrape("dialogue")
    run = await run_load([base], TENANT, texts, sessions=4, seconds=2.0, think_s=0.05, ramp_s=0, timeout_s=30.0)
    gw1, dl1 = await stack.scrape("gateway"), await stack.scrape("dialogue")
    s = summarize(run)

    assert set(s["turns"]["errors_by_code"]) == {"rate_limited"}, s["turns"]
    refused = s["turns"]["errors_by_code"]["rate_limited"]
    assert refused > s["turns"]["ok"] >= 4 * 2  # each conversation's burst of 2, then mostly refusals
    assert rate_limited(gw1) - rate_limited(gw0) == refused
    assert turns_answered(dl1) - turns_answered(dl0) == s["turns"]["ok"]
    stored = await check_stored(ADMIN, run)
    assert stored["lost"] == stored["duplicated"] == 0
    assert stored["stored_visitor_messages"] == s["turns"]["ok"]  # no refused message became a turn
