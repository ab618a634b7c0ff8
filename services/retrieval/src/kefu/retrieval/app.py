"""The retrieval service: applies stream KB to per-tenant indexes and answers kefu.retrieval.search."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import Field

from kefu.proto.bus.v1 import retrieval_pb2
from kefu.retrieval.chunking import chunk_document
from kefu.retrieval.embedder import Embedder
from kefu.retrieval.index import TenantIndex
from kefu.shared import text
from kefu.shared.bus import Bus, decode, ensure_stream
from kefu.shared.config import KefuSettings
from kefu.shared.errors import BadRequest, KefuError
from kefu.shared.models import DEFAULT_EMBED, resolve
from kefu.shared.service import Service
from kefu.shared.streams import KB_SUBJECTS, STREAM_KB, kb_stream, kb_subject

MAX_K = 50


class RetrievalSettings(KefuSettings):
    embed_model: str = ""
    embed_threads: int = Field(default=2, ge=1)
    catch_up_timeout: float = Field(default=600.0, gt=0)


class RetrievalService(Service):
    name = "retrieval"
    settings_class = RetrievalSettings
    settings: RetrievalSettings

    def __init__(self, settings: RetrievalSettings | None = None) -> None:
        super().__init__(settings)
        self.embedder: Embedder | None = None
        self.indexes: dict[str, TenantIndex] = {}
        self.applied_seq = 0
        self._applied = asyncio.Condition()

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        path = resolve(DEFAULT_EMBED, self.settings.data_dir, self.settings.embed_model)
        self.embedder = await asyncio.to_thread(Embedder, path, self.settings.embed_threads)
        await asyncio.to_thread(text.warm_up)
        self.log.info("embedder loaded", model=str(path), dim=self.embedder.dim)
        await ensure_stream(bus.js, kb_stream())
        last = (await bus.js.stream_info(STREAM_KB)).state.last_seq
        sub = await bus.js.subscribe(KB_SUBJECTS, stream=STREAM_KB, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL, cb=self._on_kb, idle_heartbeat=5.0)
        stack.push_async_callback(sub.unsubscribe)
        # Healthy means caught up with what the KB held at start-up.
        await asyncio.wait_for(self._wait_applied(last), self.settings.catch_up_timeout)
        self.log.info("kb applied", seq=self.applied_seq, chunks=sum(len(i) for i in self.indexes.values()))
        await bus.serve("kefu.retrieval.search", retrieval_pb2.SearchRequest, self._search, queue="retrieval")

    def health_details(self) -> dict[str, str]:
        return {"applied_seq": str(self.applied_seq), "tenants": str(len(self.indexes))}

    async def _wait_applied(self, seq: int) -> None:
        async with self._applied:
            await self._applied.wait_for(lambda: self.applied_seq >= seq)

    async def _on_kb(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            await self.apply(decode(retrieval_pb2.Document, msg.data), seq, msg.subject)
        except KefuError as exc:
            self.log.warning("skipped kb message", seq=seq, error=exc.message)
        except Exception:
            self.log.exception("failed to apply kb message", seq=seq)
        async with self._applied:
            self.applied_seq = max(self.applied_seq, seq)
            self._applied.notify_all()

    async def apply(self, doc: retrieval_pb2.Document, seq: int, subject: str) -> None:
        """Apply one KB message (an upsert or a tombstone) to the tenant's index."""
        if subject != kb_subject(doc.tenant, doc.doc_id):
            raise BadRequest(f"document {doc.doc_id!r} published on the wrong subject {subject}")
        t0 = time.perf_counter()
        index = self.indexes.get(doc.tenant)
        if doc.deleted:
            if index is not None:
                index.delete(doc.doc_id)
            return
        assert self.embedder is not None
        chunks = chunk_document(doc.doc_id, doc.title, doc.text, seq)
        vectors = await self.embedder.encode([c.embed_text for c in chunks])
        if index is None:
            index = self.indexes[doc.tenant] = TenantIndex(self.embedder.dim)
        index.upsert(doc.doc_id, chunks, vectors)
        self.log.debug("indexed", tenant=doc.tenant, doc_id=doc.doc_id, chunks=len(chunks),
                       ms=round((time.perf_counter() - t0) * 1000, 1))

    async def _search(self, req: retrieval_pb2.SearchRequest, _: Msg) -> retrieval_pb2.SearchReply:
        if not req.tenant:
            raise BadRequest("tenant is required", code="missing_field")
        k = req.k or 5
        if k > MAX_K:
            raise BadRequest(f"k must be at most {MAX_K}", code="invalid_field")
        if req.min_kb_seq > self.applied_seq:
            try:
                await asyncio.wait_for(self._wait_applied(req.min_kb_seq), 5.0)
            except TimeoutError:
                self.log.warning("search before kb caught up", want=req.min_kb_seq, have=self.applied_seq)
        reply = retrieval_pb2.SearchReply(applied_seq=self.applied_seq)
        index = self.indexes.get(req.tenant)
        if index is None or not req.query.strip():
            return reply
        assert self.embedder is not None
        vector = (await self.embedder.encode([req.query]))[0]
        for hit in index.search(req.query, vector, k):
            c = hit.chunk
            reply.hits.add(doc_id=c.doc_id, chunk_id=c.chunk_id, title=c.title, text=c.text, score=hit.score,
                           version=c.version)
        return reply
