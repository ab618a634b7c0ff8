"""BM25 over keyword tokens (jieba words and characters for Chinese, words and codes otherwise).

Postings are dicts, so adding or removing one chunk touches only that chunk's tokens; each token's
postings are also kept as numpy arrays (rebuilt lazily after a change) so a query scores thousands of
postings in a few vector operations instead of a Python loop.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BM25:
    k1: float = 1.2
    b: float = 0.75
    postings: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    lengths: dict[int, int] = field(default_factory=dict)
    total_len: int = 0
    _arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    _length_of: np.ndarray = field(default_factory=lambda: np.zeros(1024, dtype=np.float32), repr=False)

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def restore(cls, postings: dict[str, dict[int, int]], lengths: dict[int, int]) -> BM25:
        """An index from saved postings and chunk lengths (what a snapshot keeps)."""
        bm25 = cls()
        bm25.postings.update(postings)
        bm25.lengths = dict(lengths)
        bm25.total_len = sum(lengths.values())
        bm25._length_of = np.zeros(max(lengths, default=0) + 1024, dtype=np.float32)
        for cid, length in lengths.items():
            bm25._length_of[cid] = length
        return bm25

    def add(self, cid: int, tokens: list[str]) -> None:
        for tok, tf in Counter(tokens).items():
            self.postings[tok][cid] = tf
            self._arrays.pop(tok, None)
        self.lengths[cid] = len(tokens)
        self.total_len += len(tokens)
        if cid >= len(self._length_of):
            grown = np.zeros(max(cid + 1, 2 * len(self._length_of)), dtype=np.float32)
            grown[: len(self._length_of)] = self._length_of
            self._length_of = grown
        self._length_of[cid] = len(tokens)

    def remove(self, cid: int, tokens: list[str]) -> None:
        for tok in set(tokens):
            posting = self.postings.get(tok)
            if posting is not None:
                posting.pop(cid, None)
                self._arrays.pop(tok, None)
                if not posting:
                    del self.postings[tok]
        self.total_len -= self.lengths.pop(cid, 0)

    def _posting_arrays(self, tok: str, posting: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(tok)
        if arrays is None:
            arrays = (np.fromiter(posting.keys(), dtype=np.int64, count=len(posting)),
                      np.fromiter(posting.values(), dtype=np.float32, count=len(posting)))
            self._arrays[tok] = arrays
        return arrays

    def search(self, tokens: list[str], limit: int, max_df: float = 0.3,
               extra: tuple[str, ...] = (), extra_weight: float = 0.3) -> list[tuple[int, float]]:
        """Top ``limit`` chunks for the query ``tokens``.

        Terms are scored rarest first. Once ``limit`` candidates score more than the most the remaining
        (common) terms could add together, no chunk outside the candidates can reach the top, so those
        terms only re-score the candidates (MaxScore pruning): "warranty" with 20k postings costs a
        lookup per candidate instead of a pass over all of them. Tokens in more than ``max_df`` of all
        chunks (and at least 1,000) are skipped. ``extra`` tokens (synonyms, translations) count
        ``extra_weight`` as much as the query's own: they widen the net without outvoting the question.
        """
        n = len(self.lengths)
        if not n:
            return []
        avg = self.total_len / n
        too_common = max(1000, int(max_df * n))
        terms = []
        own = set(tokens)
        weighted = [(tok, 1.0) for tok in own] + [(tok, extra_weight) for tok in set(extra) - own]
        for tok, weight in weighted:
            posting = self.postings.get(tok)
            if not posting or len(posting) > too_common:
                continue
            idf = weight * math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            terms.append((idf, *self._posting_arrays(tok, posting)))
        if not terms:
            return []
        terms.sort(key=lambda term: -term[0])
        k1, b = self.k1, self.b
        # The most a term can add to one chunk's score (tf -> infinity, shortest chunk).
        remaining = [sum(idf * (k1 + 1) for idf, _, _ in terms[i:]) for i in range(len(terms))]

        def weight(idf: float, ids: np.ndarray, tf: np.ndarray) -> np.ndarray:
            return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * self._length_of[ids] / avg))

        idf, ids, tf = terms[0]
        cand, scores = ids, weight(idf, ids, tf)
        for i, (idf, ids, tf) in enumerate(terms[1:], 1):
            if len(cand) >= limit and np.partition(scores, -limit)[-limit] > remaining[i]:
                # Posting ids ascend (chunk ids only grow): find the candidates in this posting by bisection.
                pos = np.searchsorted(ids, cand)
                hit = pos < len(ids)
                hit[hit] = ids[pos[hit]] == cand[hit]
                scores = scores.copy()
                scores[hit] += weight(idf, ids[pos[hit]], tf[pos[hit]])
                continue
            merged = np.concatenate([cand, ids])
            cand, inverse = np.unique(merged, return_inverse=True)
            scores = np.bincount(inverse, weights=np.concatenate([scores, weight(idf, ids, tf)]))
        top = np.argpartition(-scores, limit)[:limit] if len(scores) > limit else np.arange(len(scores))
        order = top[np.lexsort((cand[top], -scores[top]))]
        return [(int(cand[i]), float(scores[i])) for i in order]
