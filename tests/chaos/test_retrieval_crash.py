"""A document upsert acknowledged just before a retrieval replica is killed -9 is searchable once the replica
is back: the acknowledgement came from the KB stream, and a restarted replica (its snapshot, then the stream
after it) catches up before it answers. Killed at several moments after the ack, around its one-second
snapshots, so some kills land mid-apply and some mid-snapshot."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest
from chaos_harness import TENANT, TIMEOUT, ChaosStack, put_document, record, scaled  # type: ignore[import-not-found]

from kefu.proto.bus.v1 import retrieval_pb2

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.chaos, pytest.mark.timeout(TIMEOUT)]

# Seconds between the PUT's 200 and the kill -9: at once, mid-embedding, around a snapshot (every 1 s).
DELAYS = [0.0, 1.1, 0.3, 0.05, 0.6, 1.5, 0.15, 0.9]


async def search(stack: ChaosStack, query: str) -> retrieval_pb2.SearchReply:
    """Search as dialogue does, but demanding no KB sequence: what the answering replica's index holds now."""
    assert stack.bus is not None
    return await stack.bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(tenant=TENANT, query=query,
                                                                                      k=5), retrieval_pb2.SearchReply)


def found(reply: retrieval_pb2.SearchReply, doc_id: str, code: str) -> list[int]:
    """Versions of ``doc_id``'s hits that carry ``code``."""
    return [h.version for h in reply.hits if h.doc_id == doc_id and code in h.text]


async def test_an_upsert_acknowledged_just_before_a_retrieval_crash_is_searchable_after_restart(
        stack: ChaosStack) -> None:
    victim, other = stack.procs["retrieval-a"], stack.procs["retrieval-b"]
    other.kill()  # one replica answers every search: the one that crashed
    rounds = scaled(2, len(DELAYS))
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        codes: list[str] = []
        for i in range(rounds):
            code = f"QX{uuid.uuid4().hex[:8].upper()}"
            codes.append(code)
            # The same document each round: an update must replace the version before it, not sit beside it.
            doc = await put_document(s, stack.gateways, "crash-part", {
                "title": "Spare part", "text": f"Spare part {code} fits the L2 desk lamp's arm."})
            await asyncio.sleep(DELAYS[i])
            victim.kill()
            victim.start()
            back = await stack.healthy([victim.name], timeout=180)
            t0 = time.monotonic()
            reply = await search(stack, f"spare part {code}")
            search_ms = (time.monotonic() - t0) * 1000
            versions = found(reply, "crash-part", code)
            stale = [c for c in codes[:-1] if found(await search(stack, f"spare part {c}"), "crash-part", c)]
            results.append({"killed_after_ack_s": DELAYS[i], "version": doc["version"], "found": versions,
                            "stale_versions_found": len(stale), "back_s": round(back, 2),
                            "search_ms": round(search_ms, 1), "applied_seq": reply.applied_seq})
            assert versions and set(versions) == {doc["version"]}, (code, doc, list(reply.hits))
            assert not stale, f"earlier versions still searchable after the restart: {stale}"
            assert reply.applied_seq >= doc["version"]
    # The replica that was down all along comes back with the last version too.
    other.start()
    await stack.healthy([victim.name, other.name], timeout=180)
    for _ in range(6):  # the queue group spreads these over both replicas
        assert found(await search(stack, f"spare part {codes[-1]}"), "crash-part", codes[-1])
    record("retrieval_crash", {"rounds": rounds, "searchable_after_restart": sum(1 for r in results if r["found"]),
                               "stale_versions_found": sum(r["stale_versions_found"] for r in results),
                               "restart_to_healthy_s": sorted(r["back_s"] for r in results), "kills": results})
