"""Retrieval benchmarks (part of `make bench`; alone: `python -m bench.retrieval [--quick]`).

Each figure is measured against its raw baseline in the same run:
- import: chunks/s through stream KB and the retrieval service vs raw sentence-transformers encode;
- freshness: PUT answered 200 → the new text returned by search, through the gateway, with 10k chunks;
- search: p50 latency of one query over 100k chunks, and throughput of 32 concurrent searches vs raw
  batched encode of the same queries; restart time of a replica with 100k chunks (snapshot load);
- dense lane: exact vs HNSW search latency by size (where the HNSW threshold comes from);
- quality: recall@1 and recall@5 of dense-only, BM25-only and hybrid on the labelled set in data/retrieval/.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from bench.corpus import corpus, queries
from bench.run import RESULTS, write
from kefu.shared.text import has_cjk

DATA = Path(__file__).parent / "data" / "retrieval"
CACHE = RESULTS / ".cache"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load_embedder(data_dir: Path):
    from kefu.retrieval.embedder import Embedder
    from kefu.shared.models import DEFAULT_EMBED, resolve

    return Embedder(resolve(DEFAULT_EMBED, data_dir), threads=2)


def chunk_texts(docs: list[tuple[str, str, str]]) -> list[list]:
    from kefu.retrieval.chunking import chunk_document

    return [chunk_document(d, t, x, 1) for d, t, x in docs]


def cached_vectors(embedder, texts: list[str], name: str) -> np.ndarray:
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.npy"
    if path.exists():
        return np.load(path)
    print(f"embedding {len(texts)} chunks once for {name} (cached in {path})", flush=True)
    vectors = embedder.encode_sync(texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


# Quality


def quality(embedder) -> dict:
    from kefu.retrieval.chunking import chunk_document
    from kefu.retrieval.index import TenantIndex

    docs = [json.loads(line) for line in (DATA / "kb.jsonl").read_text().splitlines() if line.strip()]
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]
    index = TenantIndex(embedder.dim)
    for seq, d in enumerate(docs, 1):
        chunks = chunk_document(d["doc_id"], d["title"], d["text"], seq)
        index.upsert(d["doc_id"], chunks, embedder.encode_sync([c.embed_text for c in chunks]))
    vectors = embedder.encode_sync([q["question"] for q in questions])
    from kefu.dialogue.gloss import Gloss
    from kefu.retrieval.index import ALL_LANES, lane_weights
    from kefu.shared.lexicon import expansions

    # The service's settings for the bundled English-only embedder.
    languages = frozenset({"en"})
    lanes = {"dense_only": ("dense",), "bm25_only": ("lexical",), "hybrid": ALL_LANES,
             "hybrid_as_dialogue_searches": ALL_LANES}
    gloss = Gloss.load()
    report: dict = {"documents": len(docs), "questions": len(questions)}
    for name, chosen in lanes.items():
        hits1 = hits5 = 0
        by_group: dict[str, list[int]] = {}
        for q, vec in zip(questions, vectors, strict=True):
            ranked: list[str] = []
            weights = lane_weights(q["question"], languages) if chosen == ALL_LANES else None
            # Dialogue adds the concepts' synonyms and a Chinese-English gloss as weaker keywords.
            keywords = tuple(expansions(q["question"]) + gloss(q["question"])) if name.endswith("searches") else ()
            for h in index.search(q["question"], vec, 30, lanes=chosen, weights=weights, keywords=keywords):
                if h.chunk.doc_id not in ranked:
                    ranked.append(h.chunk.doc_id)
            good = set(q["doc_ids"])
            r1, r5 = bool(good & set(ranked[:1])), bool(good & set(ranked[:5]))
            hits1 += r1
            hits5 += r5
            for group in (q["lang"], q["kind"]):
                by_group.setdefault(group, []).append(r1)
        report[name] = {"recall@1": hits1 / len(questions), "recall@5": hits5 / len(questions),
                        "recall@1_by": {g: sum(v) / len(v) for g, v in sorted(by_group.items())}}
    return report


# The dense lane: where HNSW starts to pay


def dense_sizes(vectors: np.ndarray, probes: np.ndarray) -> dict:
    from kefu.retrieval.dense import DenseIndex

    out = {}
    for n in (5_000, 20_000, 50_000, 100_000):
        if n > len(vectors):
            break
        row = {}
        for mode, threshold in (("exact", 10**9), ("hnsw", 1)):
            index = DenseIndex(vectors.shape[1], hnsw_threshold=threshold)
            index.add(np.arange(n, dtype=np.int64), vectors[:n])
            times = []
            truth = []
            for p in probes:
                t0 = time.perf_counter()
                found = index.search(p, 10)
                times.append(time.perf_counter() - t0)
                truth.append([i for i, _ in found])
            row[mode] = {"p50_ms": statistics.median(times) * 1000, "ids": truth}
        exact_ids, hnsw_ids = row["exact"].pop("ids"), row["hnsw"].pop("ids")
        row["hnsw"]["recall@10_vs_exact"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                           zip(exact_ids, hnsw_ids, strict=True)]))
        out[str(n)] = row
    return out


# The service


class Stack:
    """nats-server plus retrieval (and the gateway) as their own processes, as in production."""

    def __init__(self, tmp: Path, models: Path, with_gateway: bool) -> None:
        from kefu.shared.natsserver import NatsServer, free_port

        self.data = tmp / "data"
        self.data.mkdir(exist_ok=True)
        if not (self.data / "models").exists():
            (self.data / "models").symlink_to(models.resolve())
        self.nats = NatsServer(tmp / "js").start()
        self.http_port = free_port()
        self.env = dict(os.environ, KEFU_NATS_URL=self.nats.url, KEFU_DATA_DIR=str(self.data), KEFU_LOG_LEVEL="warning",
                        KEFU_HTTP_PORT=str(self.http_port), KEFU_GRPC_PORT=str(free_port()),
                        KEFU_ADMIN_TOKEN="bench-admin", KEFU_READY_SERVICES="retrieval", KEFU_SNAPSHOT_INTERVAL="0",
                        KEFU_RATE_MESSAGES_PER_SECOND="1000000")
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("retrieval")
        if with_gateway:
            self.start("gateway")

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen([sys.executable, "-m", f"kefu.{name}"], env=self.env)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(120)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.nats.stop()


async def health(bus, name: str) -> dict:
    from kefu.proto.bus.v1 import common_pb2
    from kefu.shared.errors import KefuError

    try:
        reply = await bus.request(f"kefu.health.{name}", common_pb2.HealthRequest(), common_pb2.HealthReply,
                                  timeout=2)
        return dict(reply.details)
    except KefuError:
        return {}


async def wait_applied(bus, seq: int, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    while int((await health(bus, "retrieval")).get("applied_seq", -1)) < seq:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"retrieval did not reach {seq}")
        await asyncio.sleep(0.02)
    return time.perf_counter()


async def publish_docs(bus, tenant: str, docs: list[tuple[str, str, str]]) -> int:
    from kefu.proto.bus.v1 import retrieval_pb2
    from kefu.shared.streams import kb_subject

    last = 0
    window: list = []
    for doc_id, title, text in docs:
        data = retrieval_pb2.Document(tenant=tenant, doc_id=doc_id, title=title, text=text).SerializeToString()
        window.append(bus.js.publish(kb_subject(tenant, doc_id), data))
        if len(window) >= 500:
            last = max(a.seq for a in await asyncio.gather(*window))
            window = []
    if window:
        last = max(a.seq for a in await asyncio.gather(*window))
    return last


async def search(bus, tenant: str, query: str, k: int = 5):
    from kefu.proto.bus.v1 import retrieval_pb2

    return await bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(tenant=tenant, query=query, k=k),
                             retrieval_pb2.SearchReply, timeout=60)


async def service_benchmarks(embedder, models: Path, n_import: int, n_fresh_total: int, n_big: int,
                             fresh_runs: int) -> dict:
    import aiohttp

    from kefu.shared.bus import Bus

    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), models, with_gateway=True)
        try:
            bus = await Bus.connect([stack.nats.url], "bench")
            while (await health(bus, "retrieval")) == {} or (await health(bus, "gateway")) == {}:
                await asyncio.sleep(0.2)

            # Import: the service against raw encode of the same chunk texts.
            docs = corpus(n_fresh_total)
            imported = docs[:n_import]
            texts = [c.embed_text for chunks in chunk_texts(imported) for c in chunks]
            t0 = time.perf_counter()
            embedder.encode_sync(texts)
            raw_rate = len(texts) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            last = await publish_docs(bus, "shop", imported)
            svc_rate = len(texts) / (await wait_applied(bus, last) - t0)
            report["import"] = {"documents": n_import, "chunks": len(texts),
                                "figure_chunks_per_s": svc_rate, "baseline_raw_encode_chunks_per_s": raw_rate,
                                "ratio": svc_rate / raw_rate}

            # Freshness through the gateway with n_fresh_total chunks indexed.
            await wait_applied(bus, await publish_docs(bus, "shop", docs[n_import:]))
            base = f"http://127.0.0.1:{stack.http_port}"
            h = {"Authorization": "Bearer bench-admin"}
            fresh = []
            async with aiohttp.ClientSession() as s:
                for i in range(fresh_runs):
                    text = f"The FR-{i} kettle now costs {1000 + i} yuan."
                    async with s.put(f"{base}/v1/tenants/shop/documents/fresh{i % 10}", headers=h,
                                     json={"title": f"Kettle FR-{i}", "text": text}) as r:
                        assert r.status == 200, await r.text()
                    t_ack = time.perf_counter()
                    q = urllib.parse.urlencode({"q": f"FR-{i} kettle price", "k": 1})
                    async with s.get(f"{base}/v1/tenants/shop/search?{q}", headers=h) as r:
                        hits = (await r.json())["hits"]
                    assert hits and hits[0]["text"] == text, hits
                    fresh.append(time.perf_counter() - t_ack)
            report["freshness"] = {"chunks_indexed": n_fresh_total, "runs": fresh_runs,
                                   "p50_ms": statistics.median(fresh) * 1000, "p99_ms": pct(fresh, 0.99) * 1000,
                                   "max_ms": max(fresh) * 1000,
                                   "baseline": "the commercial GOFLY edition claims < 500 ms"}
            await bus.close()
        finally:
            stack.close()

    # 100k chunks: index built here from cached vectors, written as the service's snapshot, so the
    # measured service start is the restart of a replica that has them.
    with tempfile.TemporaryDirectory() as tmp:
        from kefu.retrieval import snapshot
        from kefu.retrieval.chunking import chunk_document
        from kefu.retrieval.index import TenantIndex
        from kefu.shared.bus import Bus
        from kefu.shared.models import DEFAULT_EMBED, resolve, sha256_path
        from kefu.shared.natsserver import NatsServer
        from kefu.shared.streams import STREAM_KB, kb_stream

        big = corpus(n_big, seed=3)
        chunk_lists = [chunk_document(d, t, x, 1) for d, t, x in big]
        vectors = cached_vectors(embedder, [c.embed_text for cl in chunk_lists for c in cl], f"corpus{n_big}")
        # Probes in English: the bundled embedder's language (for Chinese it ranks by noise and ties).
        english = [q for q in queries(big, 400) if not has_cjk(q)]
        probes = embedder.encode_sync(english[:100])
        report["dense_lane"] = dense_sizes(vectors, probes)

        data = Path(tmp) / "data"
        data.mkdir()
        (data / "models").symlink_to(models.resolve())
        with NatsServer(Path(tmp) / "js") as nats:
            from kefu.shared.bus import ensure_stream

            bus = await Bus.connect([nats.url], "bench")
            await ensure_stream(bus.js, kb_stream())
            last = await publish_docs(bus, "big", big)
            info = await bus.js.stream_info(STREAM_KB)
            t0 = time.perf_counter()
            index = TenantIndex(embedder.dim)
            row = 0
            for seq_doc, ((doc_id, _, _), chunks) in enumerate(zip(big, chunk_lists, strict=True), 1):
                del seq_doc
                index.upsert(doc_id, chunks, vectors[row:row + len(chunks)])
                row += len(chunks)
            build_s = time.perf_counter() - t0
            emb_id = sha256_path(resolve(DEFAULT_EMBED, data))
            snapshot.save(data / "retrieval" / "snapshot.pkl",
                          snapshot.Snapshot(last, str(info.created or ""), emb_id, {"big": index}))
            del index
            env = dict(os.environ, KEFU_NATS_URL=nats.url, KEFU_DATA_DIR=str(data), KEFU_LOG_LEVEL="warning",
                       KEFU_SNAPSHOT_INTERVAL="0")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "kefu.retrieval"], env=env)
            try:
                while (await health(bus, "retrieval")) == {}:
                    await asyncio.sleep(0.1)
                restart_s = time.perf_counter() - t0
                qs = queries(big, 400, seed=5)
                for q in qs[:10]:
                    await search(bus, "big", q)  # warm-up
                single: dict[str, list[float]] = {"en": [], "zh": []}
                for q in qs:
                    t1 = time.perf_counter()
                    await search(bus, "big", q)
                    single["zh" if has_cjk(q) else "en"].append(time.perf_counter() - t1)
                # 32 concurrent clients over English queries (every one needs a forward pass), against
                # raw batched encode of the same queries.
                conc = [q for q in qs if not has_cjk(q)] * 2
                sem = asyncio.Semaphore(32)

                async def one(q: str) -> None:
                    async with sem:
                        await search(bus, "big", q)

                t1 = time.perf_counter()
                await asyncio.gather(*(one(q) for q in conc))
                svc_qps = len(conc) / (time.perf_counter() - t1)
                t1 = time.perf_counter()
                for i in range(0, len(conc), 32):
                    embedder.encode_sync(conc[i:i + 32])
                raw_qps = len(conc) / (time.perf_counter() - t1)
                details = await health(bus, "retrieval")
            finally:
                proc.terminate()
                proc.wait(60)
                await bus.close()
        report["search"] = {
            "chunks": int(details.get("chunks", 0)),
            "single_query_p50_ms_en": statistics.median(single["en"]) * 1000,
            "single_query_p99_ms_en": pct(single["en"], 0.99) * 1000,
            "single_query_p50_ms_zh": statistics.median(single["zh"]) * 1000,
            "single_query_p99_ms_zh": pct(single["zh"], 0.99) * 1000,
            "note": "English queries take the dense lane (a MiniLM forward pass); Chinese ones skip it with the "
                    "English-only bundled embedder (KEFU_EMBED_LANGUAGES)",
            "concurrent32_figure_qps": svc_qps, "concurrent32_baseline_raw_encode_qps": raw_qps,
            "concurrent32_ratio": svc_qps / raw_qps,
            "restart_with_snapshot_s": restart_s, "index_build_s_for_reference": build_s,
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for trying the benchmark itself")
    args = ap.parse_args()
    data_dir = Path(os.environ.get("KEFU_DATA_DIR", ".kefu"))
    from kefu.shared.models import models_dir

    embedder = load_embedder(data_dir)
    sizes = dict(n_import=500, n_fresh_total=1000, n_big=5000, fresh_runs=30) if args.quick else \
        dict(n_import=5000, n_fresh_total=10_000, n_big=100_000, fresh_runs=200)
    report = {"quality": quality(embedder)}
    report.update(asyncio.run(service_benchmarks(embedder, models_dir(data_dir), **sizes)))
    write("retrieval", report)


if __name__ == "__main__":
    main()
