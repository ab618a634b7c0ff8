"""A conversation's bounded memory: the last exchanges verbatim, the older ones folded into a running
summary and at most three memory vectors.

Nothing here is stored: it is derived from the state's turns (which the event log holds), so it is the
same on every replica, after a restart and at any ``at_seq`` of time travel. Each older exchange becomes
a topic — the product it was about, else the main concept it asked about — and the topics' questions,
evidence and cited documents become sparse word vectors. The summary names the recent topics; the
vectors let a visitor go back to one ("之前那个手机保修多久?") after the product slot has moved on.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kefu.dialogue.slots import product_names, products
from kefu.dialogue.state import State, Turn
from kefu.shared.lexicon import ENTITY_NAMES, concepts
from kefu.shared.text import content_tokens, has_cjk

RECENT_EXCHANGES = 2
# The memory is made from this many latest turns, so its cost does not grow with the conversation
# (the three most recent topics are almost always among them; the slots remember the rest).
WINDOW_TURNS = 240
MAX_MEMORIES = 3
MAX_SUMMARY_CHARS = 160
# How much of what a question names a memory must hold for the question to be about it.
MIN_RECALL = 0.5
# "之前那个手机", "the phone I asked about earlier": the visitor points at an older topic.
_EARLIER = re.compile(r"之前|刚才|前面|上次|一开始|最开始|先前|earlier|before|previous|the first|at first|originally",
                      re.I)
# The pointing words themselves are not what is pointed at.
_BACK = re.compile(_EARLIER.pattern + r"|那个|这个|那款|这款|那台|说的|问的|提到的|\b(that|this|one|asked|about|mentioned)\b",
                   re.I)


@dataclass(frozen=True)
class Exchange:
    seq: int
    question: str
    answer: str
    evidence: str = ""
    citations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Memory:
    """One older topic: its label, the product it was about ("" for a question about the shop), its
    normalized word vector and the sequence of its latest question."""

    label: str
    product: str
    vector: dict[str, float]
    last_seq: int
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    recent: tuple[Exchange, ...]
    summary: str
    memories: tuple[Memory, ...]


def exchanges(state: State, before_seq: int | None = None) -> list[Exchange]:
    """The visitor's questions (not OCR text) before ``before_seq`` with the bot's replies to them."""
    turns = state.turns[-WINDOW_TURNS:]
    replies = {t.in_reply_to: t for t in turns if t.role == "bot" and t.in_reply_to}
    out = []
    for t in turns:
        if t.role != "visitor" or t.source == "ocr" or (before_seq is not None and t.seq >= before_seq):
            continue
        reply: Turn | None = replies.get(t.seq)
        prov = reply.provenance if reply else None
        out.append(Exchange(t.seq, t.text, reply.text if reply else "", prov.evidence if prov else "",
                            reply.citations if reply else ()))
    return out


def fold(state: State, before_seq: int | None = None, recent: int = RECENT_EXCHANGES) -> Context:
    """The memory of the conversation as it stood before ``before_seq``."""
    past = exchanges(state, before_seq)
    older, latest = past[:-recent] if recent else past, past[-recent:] if recent else []
    topics: dict[str, list[Exchange]] = {}
    labels: dict[str, str] = {}
    for ex in older:
        label = _topic_of(ex.question)
        key = " ".join(label.lower().split())  # "X100" and "x100" are one topic
        labels[key] = label
        topics.setdefault(key, []).append(ex)
    # The most recent topics win the three places.
    ordered = sorted(((labels[key], exs) for key, exs in topics.items() if key), key=lambda kv: kv[1][-1].seq,
                     reverse=True)
    memories = tuple(_memory(label, exs) for label, exs in ordered[:MAX_MEMORIES])
    return Context(tuple(latest), _summary(memories), memories)


def points_back(text: str) -> bool:
    """Whether ``text`` points at an earlier part of the conversation ("之前", "earlier")."""
    return bool(_EARLIER.search(text))


def recall(memories: Iterable[Memory], text: str) -> Memory | None:
    """The memory ``text`` points back at, if it points back ("之前那个手机…") and one is alike enough."""
    if not points_back(text):
        return None
    # What it points at is the thing ("那个手机"), not what it now asks about it ("保修"): the words of the
    # concepts asked about are left out.
    q = {w: v for w, v in _vector([_BACK.sub(" ", text)]).items() if not w.startswith("concept:") and not concepts(w)}
    if not q:
        return None
    total = sum(q.values())
    # How much of what it names the memory holds; the cosine breaks ties.
    scored = [(sum(v for w, v in q.items() if w in m.vector) / total, _cosine(q, m.vector), m) for m in memories]
    best = max(scored, key=lambda s: s[:2], default=None)
    return best[2] if best is not None and best[0] >= MIN_RECALL else None


@functools.lru_cache(maxsize=4096)
def _topic_of(question: str) -> str:
    named = product_names(question)
    if named:
        return named[-1]
    # What it asks about ("hours"), not whose ("city_shenzhen", "tier_gold"), unless that is all it names.
    asked = sorted(concepts(question) - ENTITY_NAMES) or sorted(concepts(question))
    return asked[0] if asked else ""


def _memory(label: str, exs: list[Exchange]) -> Memory:
    texts = [t for ex in exs for t in (ex.question, ex.evidence, " ".join(c.replace("-", " ") for c in ex.citations))]
    is_product = bool(products(label))
    asked = sorted({c for ex in exs for c in concepts(ex.question)} - {label})
    return Memory(label, label if is_product else "", _vector(texts), exs[-1].seq, tuple(asked))


@functools.lru_cache(maxsize=4096)
def _words(text: str) -> frozenset[str]:
    # Chinese words, not their single characters (多, 个 would make everything alike).
    tokens = {t for t in content_tokens(text) if not (len(t) == 1 and has_cjk(t))}
    return frozenset(tokens | {f"concept:{c}" for c in concepts(text)})


def _vector(texts: Iterable[str]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for text in texts:
        for w in _words(text):
            counts[w] = counts.get(w, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {w: v / norm for w, v in counts.items()}


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(w, 0.0) for w, v in a.items())


def _summary(memories: tuple[Memory, ...]) -> str:
    """ "Earlier: X100 (price, battery); returns" — the recent topics first, bounded."""
    if not memories:
        return ""
    parts = [f"{m.label} ({', '.join(m.concepts[:3])})" if m.concepts else m.label for m in memories]
    text = "Earlier: " + "; ".join(parts)
    return text if len(text) <= MAX_SUMMARY_CHARS else text[:MAX_SUMMARY_CHARS - 1] + "…"
