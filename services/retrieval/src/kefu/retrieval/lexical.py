"""BM25 over keyword tokens (jieba words and characters for Chinese, words and codes otherwise), updated
in place: adding or removing one chunk touches only that chunk's postings."""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class BM25:
    k1: float = 1.2
    b: float = 0.75
    postings: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    lengths: dict[int, int] = field(default_factory=dict)
    total_len: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

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

    def search(self, tokens: list[str], limit: int, max_df: float = 0.3) -> list[tuple[int, float]]:
        """Top ``limit`` chunks for the query ``tokens``. Tokens in more than ``max_df`` of all chunks
        (and at least 1,000) are skipped: their weight is near zero and their postings are long."""
        n = len(self.lengths)
        if not n:
            return []
        avg = self.total_len / n
        too_common = max(1000, int(max_df * n))
        scores: dict[int, float] = defaultdict(float)
        k1, b = self.k1, self.b
        lengths = self.lengths
        for tok in set(tokens):
            posting = self.postings.get(tok)
            if not posting or len(posting) > too_common:
                continue
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            for cid, tf in posting.items():
                scores[cid] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[cid] / avg))
        return heapq.nlargest(limit, scores.items(), key=lambda kv: kv[1])
