"""Per-tenant hybrid index: three lanes fused with reciprocal rank fusion.

- dense: sentence embeddings in faiss (meaning, paraphrases);
- lexical: BM25 over jieba/word tokens (Chinese names, rare words);
- exact: identifiers (model numbers, SKUs, order numbers, error codes) that embeddings blur.

The index itself is pure in-memory state: the service feeds it from stream KB and snapshots it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from kefu.retrieval.chunking import Chunk
from kefu.retrieval.dense import DenseIndex
from kefu.retrieval.lexical import BM25
from kefu.shared.text import has_cjk, identifiers, query_tokens, tokenize

RRF_K = 60
LANE_WEIGHTS = {"dense": 1.0, "lexical": 1.0, "exact": 2.0}
ALL_LANES = ("dense", "lexical", "exact")


def query_language(query: str) -> str:
    return "zh" if has_cjk(query) else "en"


def lane_weights(query: str, embed_languages: frozenset[str] | None) -> dict[str, float]:
    """Lane weights for ``query``. The dense lane counts only when the embedder knows the query's
    language (``None``: it knows them all): an English-only model ranks Chinese text by noise."""
    weights = dict(LANE_WEIGHTS)
    if embed_languages is not None and query_language(query) not in embed_languages:
        weights["dense"] = 0.0
    return weights


@dataclass
class Hit:
    chunk: Chunk
    # Fused score in [0, 1]: 1 means ranked first by every lane that had something to say.
    score: float
    dense: float = 0.0
    lexical: float = 0.0
    exact: bool = False


def rrf(rankings: dict[str, list[int]], weights: dict[str, float], k: int = RRF_K,
        tied: frozenset[str] | set[str] = frozenset()) -> dict[int, float]:
    """Reciprocal rank fusion of ranked id lists, normalized by the best score the lanes could give.
    The ids of a lane in ``tied`` all share its first rank (a set, not a ranking)."""
    fused: dict[int, float] = defaultdict(float)
    for lane, ids in rankings.items():
        for rank, cid in enumerate(ids):
            fused[cid] += weights[lane] / (k + (0 if lane in tied else rank) + 1)
    best = sum(weights[lane] for lane, ids in rankings.items() if ids) / (k + 1)
    return {cid: s / best for cid, s in fused.items()} if best else {}


@dataclass
class TenantIndex:
    """The chunks of one tenant, searchable by meaning, by keywords and by identifier."""

    dim: int
    hnsw_threshold: int = 20_000
    dense: DenseIndex = field(init=False)
    lexical: BM25 = field(default_factory=BM25)
    exact: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    chunks: dict[int, Chunk] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    by_doc: dict[str, list[int]] = field(default_factory=dict)
    next_id: int = 0

    def __post_init__(self) -> None:
        self.dense = DenseIndex(self.dim, self.hnsw_threshold)

    def __len__(self) -> int:
        return len(self.chunks)

    def upsert(self, doc_id: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Replace every chunk of ``doc_id`` with ``chunks`` (``vectors`` row-aligned, L2-normalized)."""
        self.delete(doc_id)
        ids = np.arange(self.next_id, self.next_id + len(chunks), dtype=np.int64)
        self.next_id += len(chunks)
        self.dense.add(ids, vectors)
        for cid, chunk in zip(ids.tolist(), chunks, strict=True):
            toks = tokenize(chunk.embed_text)
            self.chunks[cid] = chunk
            self.tokens[cid] = toks
            self.lexical.add(cid, toks)
            for ident in identifiers(chunk.embed_text):
                self.exact[ident].add(cid)
        self.by_doc[doc_id] = ids.tolist()

    def delete(self, doc_id: str) -> None:
        ids = self.by_doc.pop(doc_id, [])
        if not ids:
            return
        self.dense.remove(ids)
        for cid in ids:
            chunk = self.chunks.pop(cid)
            self.lexical.remove(cid, self.tokens.pop(cid))
            for ident in identifiers(chunk.embed_text):
                holders = self.exact.get(ident)
                if holders is not None:
                    holders.discard(cid)
                    if not holders:
                        del self.exact[ident]

    def neighbours(self, hits: list[Hit], docs: int) -> list[tuple[str, float, Chunk]]:
        """The chunks of the first ``docs`` documents among ``hits`` that ``hits`` does not include, in
        document order, with their document's best score."""
        seen = {h.chunk.chunk_id for h in hits}
        best: dict[str, float] = {}
        for h in hits:
            best.setdefault(h.chunk.doc_id, h.score)
        out = []
        for doc_id in list(best)[:docs]:
            for cid in self.by_doc.get(doc_id, []):
                chunk = self.chunks[cid]
                if chunk.chunk_id not in seen:
                    out.append((doc_id, best[doc_id], chunk))
        return out

    def search(self, query: str, vector: np.ndarray | None, k: int, candidates: int = 30,
               lanes: tuple[str, ...] = ALL_LANES, weights: dict[str, float] | None = None,
               keywords: tuple[str, ...] = ()) -> list[Hit]:
        """Top ``k`` chunks for ``query``; ``lanes`` selects lanes (the quality benchmark compares them),
        ``weights`` their say in the fusion (see :func:`lane_weights`), ``keywords`` extra words for the
        keyword lane only."""
        if not self.chunks:
            return []
        weights = weights or LANE_WEIGHTS
        lanes = tuple(lane for lane in lanes if weights.get(lane, 0.0) > 0) or lanes
        rankings: dict[str, list[int]] = {}
        dense_scores: dict[int, float] = {}
        lexical_scores: dict[int, float] = {}
        if "dense" in lanes and vector is not None:
            found = self.dense.search(vector, candidates)
            rankings["dense"] = [cid for cid, _ in found]
            dense_scores = dict(found)
        if "lexical" in lanes:
            extra = tuple(query_tokens(" ".join(keywords))) if keywords else ()
            found = self.lexical.search(query_tokens(query), candidates, extra=extra)
            rankings["lexical"] = [cid for cid, _ in found]
            lexical_scores = dict(found)
        wanted = identifiers(query)
        exact_ids: set[int] = set()
        if "exact" in lanes and wanted:
            matches: dict[int, int] = defaultdict(int)
            for ident in wanted:
                for cid in self.exact.get(ident, ()):
                    matches[cid] += 1
            most = max(matches.values(), default=0)
            # Every chunk naming all the identifiers found ranks first here: the lane says "this is about
            # that product", and the other lanes decide which of its chunks answers.
            exact_ids = {cid for cid, n in matches.items() if n == most}
            rankings["exact"] = sorted(exact_ids)
        fused = rrf(rankings, weights, tied={"exact"})
        # Ties (lanes that disagree completely) go to the closer meaning, then to the stronger keywords.
        best = sorted(fused.items(), key=lambda kv: (-kv[1], -dense_scores.get(kv[0], 0.0),
                                                     -lexical_scores.get(kv[0], 0.0), kv[0]))[:k]
        return [Hit(self.chunks[cid], round(score, 6), dense_scores.get(cid, 0.0), lexical_scores.get(cid, 0.0),
                    cid in exact_ids) for cid, score in best]
