"""The hybrid index with the real embedder: lanes, fusion, incremental updates, HNSW, snapshots."""

import numpy as np
import pytest

from kefu.retrieval import snapshot
from kefu.retrieval.chunking import chunk_document
from kefu.retrieval.embedder import Embedder
from kefu.retrieval.index import TenantIndex, rrf
from kefu.shared.models import DEFAULT_EMBED, resolve

pytestmark = pytest.mark.model

DOCS = {
    "x100": ("Phone X100", "The X100 phone has a 6.1 inch screen and a 4500 mAh battery. It costs 3999 yuan."),
    "x100-pro": ("Phone X100 Pro", "The X100 Pro phone has a 6.7 inch screen and a 5000 mAh battery. It costs 5999 yuan."),
    "x200": ("Phone X200", "The X200 phone has a 6.8 inch screen and a 5200 mAh battery. It costs 6999 yuan."),
    "galaxy": ("Galaxy SM-G9910", "SM-G9910 is the model number of the Galaxy S21 sold in mainland China."),
    "sjtu": ("门店地址", "我们在上海交通大学徐汇校区附近有一家门店，营业时间为每天十点到晚上九点。"),
    "returns": ("Returns", "Unopened items can be sent back within seven days for a full refund of the purchase price."),
    "e05": ("扫地机器人故障代码", "RV-300 出现 E05 错误表示尘盒未安装，请重新安装尘盒后重启。"),
}


@pytest.fixture(scope="module")
def embedder(models_data_dir):
    return Embedder(resolve(DEFAULT_EMBED, models_data_dir), threads=2)


def build(embedder, threshold=20_000, docs=DOCS):
    index = TenantIndex(embedder.dim, hnsw_threshold=threshold)
    for seq, (doc_id, (title, text)) in enumerate(docs.items(), 1):
        chunks = chunk_document(doc_id, title, text, seq)
        index.upsert(doc_id, chunks, embedder.encode_sync([c.embed_text for c in chunks]))
    return index


def top(index, embedder, query, k=3, **kw):
    return [h.chunk.doc_id for h in index.search(query, embedder.encode_sync([query])[0], k, **kw)]


def test_identifier_lane_tells_neighbours_apart(embedder):
    index = build(embedder)
    assert top(index, embedder, "x100 pro battery")[0] == "x100-pro"
    assert top(index, embedder, "How big is the X200 screen?")[0] == "x200"
    assert top(index, embedder, "what phone is smg9910")[0] == "galaxy"  # normalized identifier
    assert top(index, embedder, "E05 是什么问题")[0] == "e05"
    hit = index.search("SM-G9910", embedder.encode_sync(["SM-G9910"])[0], 1)[0]
    assert hit.exact and 0 < hit.score <= 1


def test_chinese_keywords_and_english_meaning(embedder):
    index = build(embedder)
    assert top(index, embedder, "上海交通大学附近的店几点开门")[0] == "sjtu"
    assert top(index, embedder, "can I get my money back if I return a product")[0] == "returns"


def test_fusion_gets_what_each_lane_alone_misses(embedder):
    index = build(embedder)
    # Keywords alone miss a normalized model number; the English embedder alone misses Chinese.
    assert top(index, embedder, "what phone is smg9910", lanes=("lexical",))[0] != "galaxy"
    assert top(index, embedder, "扫地机器人报错", lanes=("dense",))[0] != "e05"
    assert top(index, embedder, "what phone is smg9910")[0] == "galaxy"
    assert top(index, embedder, "扫地机器人报错")[0] == "e05"


def test_rrf_is_normalized():
    fused = rrf({"dense": [1, 2], "lexical": [1, 3]}, {"dense": 1.0, "lexical": 1.0})
    assert fused[1] == pytest.approx(1.0) and fused[2] < fused[1] and fused[3] == pytest.approx(fused[2])
    assert rrf({"dense": []}, {"dense": 1.0}) == {}


def test_upsert_replaces_and_delete_removes_from_every_lane(embedder):
    index = build(embedder)
    chunks = chunk_document("x100", "Phone X100", "The X100 phone now costs 3499 yuan.", 99)
    index.upsert("x100", chunks, embedder.encode_sync([c.embed_text for c in chunks]))
    hits = index.search("X100 price", embedder.encode_sync(["X100 price"])[0], 5)
    assert [h.chunk.text for h in hits if h.chunk.doc_id == "x100"] == ["The X100 phone now costs 3499 yuan."]
    index.delete("galaxy")
    assert "galaxy" not in top(index, embedder, "SM-G9910", k=10)
    assert "SMG9910" not in index.exact and len(index.dense) == len(index) == len(index.lexical)


def test_hnsw_past_the_threshold_with_tombstones_and_rebuild(embedder):
    index = build(embedder, threshold=4)
    assert index.dense.hnsw
    assert top(index, embedder, "X200 screen size")[0] == "x200"
    for doc in ("x100", "x200", "galaxy"):
        index.delete(doc)
    # Tombstoned vectors never come back, and the graph is rebuilt once they pile up.
    assert not {"x100", "x200", "galaxy"} & set(top(index, embedder, "phone screen", k=10))
    assert len(index.dense.tombstones) * 4 <= index.dense.index.ntotal or not index.dense.hnsw
    assert len(index.dense) == len(index)


def test_snapshot_round_trip(embedder, tmp_path):
    index = build(embedder, threshold=4)
    index.delete("returns")
    path = tmp_path / "snap.pkl"
    snapshot.save(path, snapshot.Snapshot(42, "created-1", "emb-1", {"acme": index}))
    assert snapshot.load(path, stream_created="created-2", embedder="emb-1") is None  # another stream
    assert snapshot.load(path, stream_created="created-1", embedder="emb-2") is None  # another model
    snap = snapshot.load(path, stream_created="created-1", embedder="emb-1")
    restored = snap.indexes["acme"]
    assert snap.seq == 42 and restored.by_doc == index.by_doc and restored.dense.hnsw
    q = "X100 Pro battery"
    vec = embedder.encode_sync([q])[0]
    assert [h.chunk.chunk_id for h in restored.search(q, vec, 5)] == [h.chunk.chunk_id for h in index.search(q, vec, 5)]
    path.write_bytes(b"not a snapshot")
    assert snapshot.load(path, stream_created="created-1", embedder="emb-1") is None


def test_embedder_batches_concurrent_queries(embedder):
    import asyncio

    async def run():
        vectors = await asyncio.gather(*(embedder.encode_query(f"question {i}") for i in range(32)))
        await embedder.close()
        return vectors

    before = embedder.query_batches
    vectors = asyncio.run(run())
    assert len(vectors) == 32 and all(v.shape == (embedder.dim,) for v in vectors)
    assert embedder.query_batches - before < 8  # 32 queries, a handful of forward passes
    single = embedder.encode_sync(["question 7"])[0]
    assert np.allclose(vectors[7], single, atol=1e-5)
