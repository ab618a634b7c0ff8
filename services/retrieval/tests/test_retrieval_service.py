import asyncio
import time

import pytest

from kefu.proto.bus.v1 import retrieval_pb2
from kefu.retrieval.app import RetrievalService, RetrievalSettings
from kefu.retrieval.index import lane_weights
from kefu.shared import errors
from kefu.shared.service import start_in_background
from kefu.shared.streams import kb_subject

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def put(bus, tenant, doc_id, title, text, deleted=False) -> int:
    doc = retrieval_pb2.Document(tenant=tenant, doc_id=doc_id, title=title, text=text, deleted=deleted)
    ack = await bus.js.publish(kb_subject(tenant, doc_id), doc.SerializeToString())
    return ack.seq


async def search(bus, tenant, query, k=5, min_seq=0):
    return await bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(
        tenant=tenant, query=query, k=k, min_kb_seq=min_seq), retrieval_pb2.SearchReply, timeout=20)


async def test_hybrid_search_tenants_updates_and_deletes(stack, bus, unique):
    tenant, other = unique("t"), unique("o")
    await put(bus, tenant, "phone", "Galaxy SM-G9910", "The SM-G9910 phone has a 6.2 inch screen.")
    await put(bus, tenant, "uni", "学校介绍", "上海交通大学位于上海市闵行区。")
    await put(bus, tenant, "kettle", "Kettle", "The kettle boils water in three minutes.")
    seq = await put(bus, other, "secret", "Other tenant", "The SM-G9910 price for partners is secret.")

    hits = (await search(bus, tenant, "SM-G9910 screen", min_seq=seq)).hits
    assert hits[0].doc_id == "phone" and hits[0].chunk_id == "phone#0" and hits[0].score > 0
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.doc_id != "secret" for h in hits)
    assert (await search(bus, tenant, "交通大学在哪里")).hits[0].doc_id == "uni"
    assert (await search(bus, tenant, "how fast does it boil water")).hits[0].doc_id == "kettle"

    # An update replaces the old chunks; a delete removes them.
    seq = await put(bus, tenant, "kettle", "Kettle", "The kettle now boils water in ninety seconds.")
    hits = (await search(bus, tenant, "kettle boils water", min_seq=seq)).hits
    assert [h.text for h in hits if h.doc_id == "kettle"] == ["The kettle now boils water in ninety seconds."]
    assert hits[0].version == seq
    seq = await put(bus, tenant, "kettle", "", "", deleted=True)
    assert all(h.doc_id != "kettle" for h in (await search(bus, tenant, "kettle", min_seq=seq)).hits)


async def test_a_keywords_only_search_skips_the_embedding(stack, bus, unique):
    tenant = unique("kw")
    seq = await put(bus, tenant, "kettle", "Kettle", "The kettle boils water in three minutes.")
    both = (await search(bus, tenant, "kettle boils water", min_seq=seq)).hits
    assert both[0].doc_id == "kettle" and both[0].dense > 0
    keywords = (await bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(
        tenant=tenant, query="kettle boils water", k=5, keywords_only=True), retrieval_pb2.SearchReply, timeout=20)).hits
    assert keywords[0].doc_id == "kettle" and keywords[0].lexical > 0 and all(h.dense == 0 for h in keywords)


async def test_a_new_document_is_searchable_right_after_its_ack(stack, bus, unique):
    tenant = unique("fresh")
    t0 = time.perf_counter()
    seq = await put(bus, tenant, "faq", "Opening hours", "We are open from 9 to 18 on weekdays.")
    hits = (await search(bus, tenant, "opening hours", min_seq=seq)).hits
    assert hits and hits[0].doc_id == "faq"
    assert time.perf_counter() - t0 < 10


async def test_bad_search_requests_are_typed_errors(stack, bus):
    with pytest.raises(errors.BadRequest):
        await search(bus, "", "q")
    with pytest.raises(errors.BadRequest):
        await search(bus, "t", "q", k=500)
    assert list((await search(bus, "nobody-here", "anything")).hits) == []


async def test_a_new_replica_rebuilds_the_index_from_the_stream(stack, bus, unique, nats_url, models_data_dir):
    tenant = unique("replay")
    await put(bus, tenant, "a", "Warranty", "Every product has a two year warranty.")
    await put(bus, tenant, "b", "Gone", "This document will be deleted.")
    await put(bus, tenant, "b", "", "", deleted=True)
    replica = RetrievalService(RetrievalSettings(nats_url=nats_url, data_dir=models_data_dir))
    stop = asyncio.Event()
    task = await start_in_background(replica, stop)
    try:
        index = replica.indexes[tenant]
        assert set(index.by_doc) == {"a"}
        # Same stream, same results: the replica answers exactly like the running service.
        await put(bus, tenant, "c", "Shipping", "Orders ship within two days.")
        seq = await put(bus, tenant, "d", "保修", "所有产品保修两年。")
        running = stack.services["retrieval"]
        await running._wait_applied(seq)
        await replica._wait_applied(seq)
        for query in ("warranty years", "保修多久", "shipping time"):
            found = []
            for service in (running, replica):
                vector = await service.embedder.encode_query(query)
                weights = lane_weights(query, service.dense_languages)
                found.append([h.chunk.chunk_id for h in service.indexes[tenant].search(query, vector, 5, weights=weights)])
            assert found[0] == found[1] and found[0]
    finally:
        stop.set()
        await task


async def test_restart_loads_the_snapshot_and_replays_only_what_is_newer(bus, unique, nats_url, models_data_dir,
                                                                        tmp_path, stack):
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_data_dir / "models")
    tenant = unique("snap")
    settings = dict(nats_url=nats_url, data_dir=data, snapshot_interval=0.2)
    first = RetrievalService(RetrievalSettings(**settings))
    stop = asyncio.Event()
    task = await start_in_background(first, stop)
    seq = await put(bus, tenant, "price", "K5 kettle", "The K5 kettle costs 199 yuan.")
    await first._wait_applied(seq)
    stop.set()
    await task  # writes a last snapshot on the way out
    assert first.snapshot_seq >= seq and (data / "retrieval" / "snapshot.pkl").exists()

    newer = await put(bus, tenant, "price", "K5 kettle", "The K5 kettle now costs 179 yuan.")
    second = RetrievalService(RetrievalSettings(**settings))
    stop2 = asyncio.Event()
    task2 = await start_in_background(second, stop2)
    try:
        assert second.snapshot_seq == first.snapshot_seq  # loaded, not rebuilt
        assert second.applied_seq >= newer
        hits = second.indexes[tenant].search("K5 kettle price", None, 3, lanes=("lexical",))
        assert [h.chunk.text for h in hits] == ["The K5 kettle now costs 179 yuan."]
    finally:
        stop2.set()
        await task2
