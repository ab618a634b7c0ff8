"""Per-tenant hybrid index: faiss inner product over normalized embeddings plus BM25 over jieba/Latin
tokens, fused with reciprocal rank fusion. Pure in-memory structure; the service feeds it from stream KB."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import faiss
import numpy as np

from kefu.retrieval.chunking import Chunk
from kefu.shared.text import tokenize

RRF_K = 60


@dataclass
class Hit:
    chunk: Chunk
    score: float


@dataclass
class _BM25:
    k1: float = 1.2
    b: float = 0.75
    postings: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    lengths: dict[int, int] = field(default_factory=dict)
    total_len: int = 0

    def add(self, cid: int, tokens: list[str]) -> None:
        for tok, tf in Counter(tokens).items():
            self.postings[tok][cid] = tf
        self.lengths[cid] = len(tokens)
        self.total_len += len(tokens)

    def remove(self, cid: int, tokens: list[str]) -> None:
        for tok in set(tokens):
            posting = self.postings.get(tok)
            if posting is not None:
                posting.pop(cid, None)
                if not posting:
                    del self.postings[tok]
        self.total_len -= self.lengths.pop(cid, 0)

    def search(self, tokens: list[str], limit: int) -> list[tuple[int, float]]:
        n = len(self.lengths)
        if not n:
            return []
        avg = self.total_len / n
        scores: dict[int, float] = defaultdict(float)
        for tok in set(tokens):
            posting = self.postings.get(tok)
            if not posting:
                continue
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            for cid, tf in posting.items():
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[cid] / avg)
                scores[cid] += idf * tf * (self.k1 + 1) / norm
        return sorted(scores.items(), key=lambda kv: -kv[1])[:limit]


class TenantIndex:
    """The chunks of one tenant, searchable by meaning (faiss) and by keywords (BM25)."""

    def __init__(self, dim: int) -> None:
        self.dense = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.bm25 = _BM25()
        self.chunks: dict[int, Chunk] = {}
        self.tokens: dict[int, list[str]] = {}
        self.by_doc: dict[str, list[int]] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.chunks)

    def upsert(self, doc_id: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Replace every chunk of ``doc_id`` with ``chunks`` (``vectors`` row-aligned, L2-normalized)."""
        self.delete(doc_id)
        ids = np.arange(self._next_id, self._next_id + len(chunks), dtype=np.int64)
        self._next_id += len(chunks)
        if len(chunks):
            self.dense.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        for cid, chunk in zip(ids.tolist(), chunks, strict=True):
            toks = tokenize(chunk.embed_text)
            self.chunks[cid] = chunk
            self.tokens[cid] = toks
            self.bm25.add(cid, toks)
        self.by_doc[doc_id] = ids.tolist()

    def delete(self, doc_id: str) -> None:
        ids = self.by_doc.pop(doc_id, [])
        if not ids:
            return
        self.dense.remove_ids(np.asarray(ids, dtype=np.int64))
        for cid in ids:
            self.bm25.remove(cid, self.tokens.pop(cid))
            del self.chunks[cid]

    def search(self, query: str, vector: np.ndarray, k: int, candidates: int = 50) -> list[Hit]:
        """Top ``k`` chunks by reciprocal rank fusion of the dense and the keyword ranking."""
        if not self.chunks:
            return []
        fused: dict[int, float] = defaultdict(float)
        n = min(candidates, len(self.chunks))
        _, ids = self.dense.search(np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32), n)
        for rank, cid in enumerate(i for i in ids[0].tolist() if i >= 0):
            fused[cid] += 1.0 / (RRF_K + rank + 1)
        for rank, (cid, _) in enumerate(self.bm25.search(tokenize(query), n)):
            # Exact keywords (SKUs, Chinese names) weigh as much as meaning does.
            fused[cid] += 1.0 / (RRF_K + rank + 1)
        best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
        return [Hit(self.chunks[cid], score) for cid, score in best]
