"""The retrieval service: applies stream KB to per-tenant indexes and answers kefu.retrieval.search.

KB messages are applied in arrival order, in batches: the chunks of every document in a batch are
embedded together (in slices, so searches interleave), then the indexes are updated. The service is
healthy once it has applied everything the stream held when it started; snapshots on disk make that
a load plus a short replay.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import Field

from kefu.proto.bus.v1 import retrieval_pb2
from kefu.retrieval import snapshot
from kefu.retrieval.chunking import Chunk, chunk_document
from kefu.retrieval.embedder import Embedder
from kefu.retrieval.index import TenantIndex, lane_weights
from kefu.shared import metrics, text
from kefu.shared.bus import Bus, decode, ensure_stream
from kefu.shared.config import KefuSettings
from kefu.shared.errors import BadRequest, KefuError, Unavailable
from kefu.shared.models import DEFAULT_EMBED, resolve, sha256_path
from kefu.shared.service import Service
from kefu.shared.streams import KB_SUBJECTS, STREAM_KB, kb_stream, kb_subject

MAX_K = 50
APPLY_BATCH = 256


class RetrievalSettings(KefuSettings):
    embed_model: str = ""
    embed_threads: int = Field(default=2, ge=1)
    catch_up_timeout: float = Field(default=1800.0, gt=0)
    # Chunks per tenant past which the dense lane switches from exact search to HNSW (see bench/retrieval.py).
    hnsw_threshold: int = Field(default=20_000, ge=1)
    # Seconds between snapshots (when something changed); 0 turns snapshots off.
    snapshot_interval: float = Field(default=60.0, ge=0)
    chunk_chars: int = Field(default=500, ge=100)
    # How long a search waits for the KB changes it must see (read-your-writes) before answering 503.
    search_wait: float = Field(default=30.0, gt=0)
    # Languages the embedder understands (comma-separated, "*" for all). "auto": English for the bundled
    # all-MiniLM-L6-v2, all for a model of your own. Queries in other languages skip the dense lane.
    embed_languages: str = "auto"

    def dense_languages(self) -> frozenset[str] | None:
        value = self.embed_languages.strip()
        if value == "auto":
            return None if self.embed_model else frozenset({"en"})
        if value == "*":
            return None
        return frozenset(x.strip() for x in value.split(",") if x.strip())


@dataclass
class _Change:
    seq: int
    doc: retrieval_pb2.Document
    chunks: list[Chunk]


class RetrievalService(Service):
    name = "retrieval"
    settings_class = RetrievalSettings
    settings: RetrievalSettings

    def __init__(self, settings: RetrievalSettings | None = None) -> None:
        super().__init__(settings)
        self.embedder: Embedder | None = None
        self.embedder_id = ""
        self.indexes: dict[str, TenantIndex] = {}
        self.applied_seq = 0
        self.snapshot_seq = 0
        self._applied = asyncio.Condition()
        # Bounded: a replay of a large KB waits here instead of piling up in memory.
        self._inbox: asyncio.Queue[Msg] = asyncio.Queue(maxsize=4 * APPLY_BATCH)
        self.failed_docs = 0
        self._apply_lock = asyncio.Lock()
        # Changes after this sequence arrived while the service ran: their freshness lag is measured
        # (a replay of older ones at start-up would count the downtime).
        self._live_from = 0
        self.dense_languages = self.settings.dense_languages()

    @property
    def snapshot_path(self) -> Path:
        return self.settings.data_dir / "retrieval" / "snapshot.pkl"

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        t_load = time.monotonic()
        path = resolve(DEFAULT_EMBED, self.settings.data_dir, self.settings.embed_model)
        self.embedder = await asyncio.to_thread(Embedder, path, self.settings.embed_threads)
        stack.push_async_callback(self.embedder.close)
        self.embedder_id = await asyncio.to_thread(sha256_path, path)
        await asyncio.to_thread(text.warm_up)
        self.log.info("embedder loaded", model=str(path), dim=self.embedder.dim, s=round(time.monotonic() - t_load, 2))
        await ensure_stream(bus.js, kb_stream())
        info = await bus.js.stream_info(STREAM_KB)
        created = str(info.created or "")
        await self._load_snapshot(created, info.state.last_seq)
        self._live_from = info.state.last_seq

        applier = asyncio.create_task(self._apply_forever())
        stack.push_async_callback(self._stop_task, applier)
        start = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if self.applied_seq:  # from the snapshot on
            start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.applied_seq + 1)
        sub = await bus.js.subscribe(KB_SUBJECTS, stream=STREAM_KB, ordered_consumer=True, cb=self._on_kb,
                                     idle_heartbeat=5.0, config=start)
        stack.push_async_callback(sub.unsubscribe)
        # Healthy means caught up with what the KB held at start-up.
        t0 = time.monotonic()
        await asyncio.wait_for(self._wait_applied(info.state.last_seq), self.settings.catch_up_timeout)
        self.log.info("kb applied", seq=self.applied_seq, chunks=sum(len(i) for i in self.indexes.values()),
                      s=round(time.monotonic() - t0, 2))
        if self.settings.snapshot_interval:
            snapshots = asyncio.create_task(self._snapshot_forever(created))
            stack.push_async_callback(self._stop_task, snapshots)
            stack.push_async_callback(self._save_snapshot, created)  # a last one at shutdown
        await bus.serve("kefu.retrieval.search", retrieval_pb2.SearchRequest, self._search, queue="retrieval")

    def health_details(self) -> dict[str, str]:
        return {"applied_seq": str(self.applied_seq), "tenants": str(len(self.indexes)),
                "chunks": str(sum(len(i) for i in self.indexes.values())), "failed_docs": str(self.failed_docs)}

    @staticmethod
    async def _stop_task(task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Snapshots

    async def _load_snapshot(self, created: str, last_seq: int) -> None:
        t0 = time.monotonic()
        snap = await asyncio.to_thread(snapshot.load, self.snapshot_path, stream_created=created,
                                       embedder=self.embedder_id)
        if snap is None or snap.seq > last_seq:
            return
        self.indexes, self.applied_seq, self.snapshot_seq = snap.indexes, snap.seq, snap.seq
        self.log.info("snapshot loaded", seq=snap.seq, chunks=sum(len(i) for i in snap.indexes.values()),
                      s=round(time.monotonic() - t0, 2))

    async def _snapshot_forever(self, created: str) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            await self._save_snapshot(created)

    async def _save_snapshot(self, created: str) -> None:
        if self.applied_seq == self.snapshot_seq:
            return
        # Changes wait while the snapshot is written; searches go on (they only read).
        async with self._apply_lock:
            snap = snapshot.Snapshot(self.applied_seq, created, self.embedder_id, dict(self.indexes))
            t0 = time.monotonic()
            try:
                size = await asyncio.to_thread(snapshot.save, self.snapshot_path, snap)
            except OSError as exc:
                self.log.warning("snapshot not written", error=str(exc))
                return
            self.snapshot_seq = snap.seq
        self.log.info("snapshot written", seq=snap.seq, bytes=size, s=round(time.monotonic() - t0, 2))

    # Applying the KB stream

    async def _on_kb(self, msg: Msg) -> None:
        await self._inbox.put(msg)

    async def _wait_applied(self, seq: int) -> None:
        async with self._applied:
            await self._applied.wait_for(lambda: self.applied_seq >= seq)

    async def _apply_forever(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty() and len(batch) < APPLY_BATCH:
                batch.append(self._inbox.get_nowait())
            async with self._apply_lock:
                try:
                    await self.apply_batch(batch)
                except Exception:
                    # One bad document must not cost the others: apply them one by one.
                    self.log.exception("kb batch failed, applying its messages one by one",
                                       first=batch[0].metadata.sequence.stream)
                    for msg in batch:
                        try:
                            await self.apply_batch([msg])
                        except Exception:
                            self.failed_docs += 1
                            self.log.exception("kb message not applied", seq=msg.metadata.sequence.stream)
            async with self._applied:
                self.applied_seq = max(self.applied_seq, batch[-1].metadata.sequence.stream)
                self._applied.notify_all()
            self._observe_freshness(batch)

    def _observe_freshness(self, batch: list[Msg]) -> None:
        """Time from each change's acknowledgement (its stream timestamp) to it being searchable."""
        now = time.time()
        lag = metrics.kb_freshness_lag()
        for msg in batch:
            meta = msg.metadata
            if meta.sequence.stream > self._live_from:
                lag.observe(max(0.0, now - meta.timestamp.timestamp()))

    async def apply_batch(self, msgs: list[Msg]) -> None:
        """Apply KB messages (upserts and tombstones) in order; the batch's chunks are embedded together."""
        assert self.embedder is not None
        t0 = time.perf_counter()
        changes: list[_Change] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                doc = decode(retrieval_pb2.Document, msg.data)
                if msg.subject != kb_subject(doc.tenant, doc.doc_id):
                    raise BadRequest(f"document {doc.doc_id!r} published on the wrong subject {msg.subject}")
            except KefuError as exc:
                self.log.warning("skipped kb message", seq=seq, error=exc.message)
                continue
            chunks = [] if doc.deleted else chunk_document(doc.doc_id, doc.title, doc.text, seq,
                                                           max_chars=self.settings.chunk_chars)
            changes.append(_Change(seq, doc, chunks))
        vectors = await self.embedder.encode_documents([c.embed_text for ch in changes for c in ch.chunks])
        row = 0
        for ch in changes:
            index = self.indexes.get(ch.doc.tenant)
            if ch.doc.deleted or not ch.chunks:
                if index is not None:
                    index.delete(ch.doc.doc_id)
                continue
            if index is None:
                index = self.indexes[ch.doc.tenant] = TenantIndex(self.embedder.dim, self.settings.hnsw_threshold)
            index.upsert(ch.doc.doc_id, ch.chunks, vectors[row:row + len(ch.chunks)])
            row += len(ch.chunks)
        self.log.debug("kb batch applied", messages=len(msgs), chunks=row, ms=round((time.perf_counter() - t0) * 1000, 1))

    # Search

    async def _search(self, req: retrieval_pb2.SearchRequest, _: Msg) -> retrieval_pb2.SearchReply:
        if not req.tenant:
            raise BadRequest("tenant is required", code="missing_field")
        k = req.k or 5
        if k > MAX_K:
            raise BadRequest(f"k must be at most {MAX_K}", code="invalid_field")
        if req.min_kb_seq > self.applied_seq:
            try:
                await asyncio.wait_for(self._wait_applied(req.min_kb_seq), self.settings.search_wait)
            except TimeoutError:
                # Never answer from an index that lacks a change the caller has already been told is stored.
                raise Unavailable(f"the knowledge base is still indexing ({self.applied_seq} of {req.min_kb_seq})",
                                  code="indexing") from None
        reply = retrieval_pb2.SearchReply(applied_seq=self.applied_seq)
        index = self.indexes.get(req.tenant)
        if index is None or not req.query.strip():
            return reply
        assert self.embedder is not None
        weights = lane_weights(req.query, self.dense_languages)
        if req.keywords_only:
            weights["dense"] = 0.0
        t0 = time.perf_counter()
        # No forward pass when the embedder does not read the query's language.
        vector = await self.embedder.encode_query(req.query) if weights["dense"] > 0 else None
        t1 = time.perf_counter()
        hits = index.search(req.query, vector, k, weights=weights, keywords=tuple(req.keywords[:32]))
        self.log.debug("searched", encode_ms=round((t1 - t0) * 1000, 2),
                       search_ms=round((time.perf_counter() - t1) * 1000, 2), hits=len(hits))
        for hit in hits:
            c = hit.chunk
            reply.hits.add(doc_id=c.doc_id, chunk_id=c.chunk_id, title=c.title, text=c.text, score=hit.score,
                           version=c.version, dense=hit.dense, lexical=hit.lexical, exact=hit.exact, heading=c.heading)
        for doc_id, score, chunk in index.neighbours(hits, min(req.expand_docs, 5)):
            reply.hits.add(doc_id=doc_id, chunk_id=chunk.chunk_id, title=chunk.title, text=chunk.text,
                           score=0.9 * score, version=chunk.version, heading=chunk.heading)
        return reply
