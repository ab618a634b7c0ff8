import math
import random
from collections import defaultdict

import pytest

from kefu.retrieval.lexical import BM25


def brute_force(bm: BM25, tokens: list[str], limit: int) -> list[float]:
    n = len(bm.lengths)
    avg = bm.total_len / n
    scores: dict[int, float] = defaultdict(float)
    for tok in set(tokens):
        posting = bm.postings.get(tok)
        if not posting or len(posting) > max(1000, int(0.3 * n)):
            continue
        idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
        for cid, tf in posting.items():
            scores[cid] += idf * tf * (bm.k1 + 1) / (tf + bm.k1 * (1 - bm.b + bm.b * bm.lengths[cid] / avg))
    return sorted(scores.values(), reverse=True)[:limit]


def test_pruned_search_finds_the_same_top_scores_as_scoring_everything():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(400)]
    weights = [1 / (i + 1) for i in range(400)]  # Zipf-like: a few very common words, many rare ones
    bm = BM25()
    for cid in range(6000):
        bm.add(cid, rng.choices(vocab, weights, k=rng.randint(5, 40)))
    for cid in range(0, 6000, 7):  # updates and deletes keep the index consistent
        bm.remove(cid, [t for t, p in bm.postings.items() if cid in p])
    for _ in range(200):
        query = rng.sample(vocab[:50], 2) + rng.sample(vocab[50:], 2)
        got = [s for _, s in bm.search(query, 10)]
        assert got == pytest.approx(brute_force(bm, query, 10), rel=1e-5)


def test_restore_gives_the_same_answers():
    bm = BM25()
    for cid, words in enumerate([["kettle", "price"], ["kettle", "warranty"], ["lamp", "price", "price"]]):
        bm.add(cid, words)
    again = BM25.restore(bm.postings, bm.lengths)
    assert again.search(["price", "kettle"], 3) == bm.search(["price", "kettle"], 3)
    assert bm.search(["nothing"], 3) == [] and BM25().search(["x"], 3) == []
