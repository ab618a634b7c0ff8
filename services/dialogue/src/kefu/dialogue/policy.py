"""The answer policy's pure parts: handoff intent, choosing the evidence sentence, building the
grounded prompt, and checking that a generated sentence keeps the facts and invents none."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from kefu.dialogue.slots import products, ruled_out
from kefu.shared.lexicon import ENTITY_NAMES, PRODUCT_ATTRIBUTES, concepts, entities, expansions
from kefu.shared.text import (
    STOPWORDS,
    content_tokens,
    facts,
    has_cjk,
    identifiers,
    query_tokens,
    split_sentences,
    stem,
)

_HANDOFF_ZH = re.compile(r"转人工|人工客服|人工服务|找人工|要人工|接人工|真人客服|人工坐席|转接客服|转客服|帮我接客服|"
                         r"找你们(?:经理|主管|负责人)|^\s*人工\s*[。！!]?\s*$")
_HANDOFF_EN = re.compile(
    r"\b(talk|speak|chat|connect|transfer|put)\b.{0,20}\b(human|person|agent|representative|operator|someone|"
    r"customer service|customer support|support team|staff|manager|supervisor)\b"
    r"|^\s*(human|agent|operator|representative)( please)?\s*[.!]?\s*$|\breal (person|human)\b|\blive agent\b",
    re.I,
)
# Clauses end at Chinese commas and at commas that are not inside a number ("4,299"); a colon
# introduces its value ("Price: 4,299 yuan") and stays inside the clause.
_CLAUSE = re.compile(r"[，、；;]|(?<!\d),|,(?!\d)")
# Share of a generated sentence's meaningful words that must appear in the passages or the question.
MIN_SUPPORT = 0.8
# Weight of a query word that also names the document (title): it picks the document, not the fact.
_TITLE_WEIGHT = 0.2
_NO_QUANTITY_PENALTY = 3.0
_CONCEPT_WEIGHT = 3.0
_EARLIER_WEIGHT = 0.3
# A word the question does not have but one of its concepts does ("售价" for "多少钱"): the concept itself
# is already counted, the word only says the sentence puts it the same way.
_SYNONYM_WEIGHT = 0.5
_CODE_WEIGHT = 2.0
_TITLE_MATCH = 1.5
_CITY_IDENTITY = 3.0
_TITLE_SHARE = 0.5
# A sentence with what the question asks for: a number of the unit it counts in ("几台" -> "4 台", "how many
# days" -> "14 天"), a phone number, an email address.
_SHAPE_WEIGHT = 1.5
# A spec line whose label is what the question asks about ("容量：1.7 升" for "how many litres").
_LABEL_WEIGHT = 1.0
_LABEL = re.compile(r"^\s*(?:[-*•]\s*)?([^:：\d]{1,20})[:：]")
# A sentence of this few words is shown with its section's heading.
_TERSE = 3
# A question whose answer is a number, a time or a date.
_QUANTITY = re.compile(r"多少|几|多大|多久|多长|多重|多高|多远|多快|什么时候|何时|哪天|"
                       r"\bhow (much|many|long|big|large|fast|far|heavy|old|often|soon)\b|\bwhat time\b|\bwhen\b|"
                       r"\bwhich (temperatures?|sizes?|days?)\b|\bwhat('s| is| does| do| did)?\b[^?]{0,30}\b(cost|price)|价格|售价|价钱", re.I)


def asks_quantity(query: str) -> bool:
    """Whether the question's answer is a number, a time or a date ("保修几年", "how long", "几点")."""
    return bool(_QUANTITY.search(query))


# Units a count question names, with their words in both languages (regular expressions).
_UNITS = {
    "day": ("天", "日", r"days?"), "year": ("年", r"years?"), "month": ("个月", "月", r"months?"),
    "hour": ("个小时", "小时", r"hours?"), "minute": ("分钟", r"minutes?", r"mins?"), "week": ("周", "星期", r"weeks?"),
    "unit": ("台", r"units?", r"devices?"), "times": ("次", "倍", r"times", "x"), "yuan": ("元", "块", "yuan"),
    "litre": ("升", r"litres?", r"liters?", "l"), "watt": ("瓦", "w", r"watts?"), "people": ("人", "people", r"persons?"),
    "clock": ("点",),
}
_ASKED_ZH = {w: unit for unit, words in _UNITS.items() for w in words if has_cjk(w)}
_ASKED_EN = {"day": "day", "days": "day", "year": "year", "years": "year", "month": "month", "months": "month",
             "hour": "hour", "hours": "hour", "minute": "minute", "minutes": "minute", "week": "week", "weeks": "week",
             "units": "unit", "devices": "unit", "times": "times", "yuan": "yuan", "litres": "litre", "liters": "litre",
             "watts": "watt", "people": "people", "persons": "people"}
_COUNT_ZH = re.compile(r"(?:几|多少)\s*(" + "|".join(sorted(_ASKED_ZH, key=len, reverse=True)) + ")")
_COUNT_EN = re.compile(r"\bhow many\s+(" + "|".join(_ASKED_EN) + r")\b", re.I)


_ASKS_PHONE = re.compile(r"(?:电话|热线|号码)[^。？?，,]{0,4}(?:多少|是什么|是几)|号码|电话号|\b(?:phone|hotline|contact|"
                         r"telephone) number\b|\bnumber (?:to|should i|do i) call\b|\bwhat number\b", re.I)
_PHONE_NUMBER = re.compile(r"(?<![\d-])(?:\d{3,4}-\d{3,4}-\d{4}|400-?\d{3}-?\d{4}|1[3-9]\d{9})(?![\d-])")
_ASKS_EMAIL = re.compile(r"邮箱|电子邮件|\be-?mail\b", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@functools.lru_cache(maxsize=4096)
def answer_shape(question: str) -> re.Pattern[str] | None:
    """What the answer to ``question`` looks like, where its wording says: a phone number ("热线电话是多少"), an
    email address, a number in the unit it counts in ("保修几年": "2 年" or "2 years"; "最多能连几台": "4 台").
    None for other questions."""
    if _ASKS_PHONE.search(question):
        return _PHONE_NUMBER
    if _ASKS_EMAIL.search(question):
        return _EMAIL
    if m := _COUNT_ZH.search(question):
        unit = _ASKED_ZH[m.group(1)]
    elif m := _COUNT_EN.search(question):
        unit = _ASKED_EN[m.group(1).lower()]
    else:
        return None
    if unit == "clock":
        return re.compile(r"\d{1,2}:\d{2}|\d{1,2}\s*点")
    words = "|".join(_UNITS[unit])
    # A year count is not a year ("2 年", not "2026 年"); prices and points can be long.
    number = r"\d[\d,]*(?:\.\d+)?" if unit == "yuan" else r"(?<![\d.])\d{1,3}(?:\.\d+)?"
    return re.compile(rf"{number}\s*(?:{words})(?![a-z])", re.I)


HANDOFF_TEXT = {"zh": "好的，正在为您转接人工客服，请稍候。", "en": "Sure, I'm connecting you to a human agent. Please wait a moment."}
HUMAN_MODE_TEXT = {"zh": "已为您转接人工客服，客服会在这里回复您。",
                   "en": "You are connected to a human agent, who will reply here."}
NO_ANSWER_TEXT = {
    "zh": "抱歉，我在知识库中没有找到相关信息。您可以换个说法提问，或输入“转人工”联系人工客服。",
    "en": "Sorry, I couldn't find that in our knowledge base. Try rephrasing, or type \"human\" to talk to an agent.",
}


_UPSET_ZH = re.compile(r"投诉|太差|垃圾|骗子|骗人|生气|气死|差评|什么破|坑人|无语|搞什么|退钱")
_UPSET_EN = re.compile(r"\b(terrible|ridiculous|useless|scam|worst|awful|angry|furious|complaint|complain|"
                       r"rip-?off|unacceptable)\b|!{3,}", re.I)
HANDOFF_UPSET_TEXT = {"zh": "非常抱歉给您带来不好的体验，正在为您转接人工客服，请稍候。",
                      "en": "I'm sorry about this. I'm connecting you to a human agent right away."}
HANDOFF_FAILED_TEXT = {"zh": "抱歉我没能回答您的问题，正在为您转接人工客服，请稍候。",
                       "en": "Sorry I couldn't answer that. I'm connecting you to a human agent."}


def lang(text: str) -> str:
    return "zh" if has_cjk(text) else "en"


def wants_human(text: str) -> bool:
    """True when the visitor asks for a person (转人工, "talk to a human", ...)."""
    return bool(_HANDOFF_ZH.search(text) or _HANDOFF_EN.search(text))


def upset(text: str) -> bool:
    """True when the visitor sounds angry or wants to complain: a person should take over."""
    return bool(_UPSET_ZH.search(text) or _UPSET_EN.search(text))


def handoff_summary(reason: str, questions: list[str], slots: dict[str, str], last_evidence: str,
                    last_decision: str) -> str:
    """What the agent taking over reads first: why, what the visitor asked, what is known."""
    lines = [f"reason: {reason}"]
    lines += [f"asked: {q}" for q in questions[-3:]]
    if slots:
        lines.append("known: " + ", ".join(f"{k}={v}" for k, v in sorted(slots.items())))
    if last_evidence:
        lines.append(f"bot's last evidence ({last_decision}): {last_evidence}")
    elif last_decision:
        lines.append(f"bot's last outcome: {last_decision}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Passage:
    doc_id: str
    title: str
    text: str
    # Retrieval's fused score in [0, 1]; sentences of weaker passages need more words in common to win.
    score: float = 1.0
    # The document section's heading: what a terse sentence ("2 years.") under "Warranty" is about.
    heading: str = ""


@dataclass(frozen=True)
class Evidence:
    """The sentence that answers the question, where it comes from, and the facts an answer must keep."""

    sentence: str
    doc_id: str
    required: frozenset[str]
    score: float


def _weighted_overlap(query: set[str], text: str, title_tokens: set[str], earlier: frozenset[str] = frozenset(),
                      chinese: tuple[str, ...] | None = None, synonyms: frozenset[str] = frozenset()) -> float:
    # Chinese words also count where the text has them but jieba cut it differently ("最多" in "网络最多支持");
    # ``chinese``: the query's Chinese words of two characters or more, when the caller has them already.
    if chinese is None:
        chinese = _chinese_words(query)
    hit = (query & _terms(text)) | {w for w in chinese if w in text}
    if len(hit) > 1:
        # A Chinese word counts once, not again for each shorter word jieba also found in it ("空气净化器",
        # "净化器", "空气").
        hit = {t for t in hit if not (has_cjk(t) and any(t != u and t in u for u in hit))}
    return sum(_TITLE_WEIGHT if t in title_tokens else _EARLIER_WEIGHT if t in earlier
               else _SYNONYM_WEIGHT if t in synonyms else 1.0 for t in hit)


@functools.lru_cache(maxsize=16384)
def _terms(text: str) -> frozenset[str]:
    """The words of ``text`` that evidence is matched on: its meaningful tokens, English ones without their
    plural "s" ("needs" meets "need"), and the parts of a hyphenated word ("under-sink" meets "sink").
    Cached: the same knowledge-base sentences and titles come back turn after turn."""
    return _stemmed(content_tokens(text))


def _question_terms(question: str) -> frozenset[str]:
    """``_terms`` of a question, not cached: a (rewritten) question is matched once, in its own turn, and
    caching every one held ~1 KB per question until the caches were full (bench.soak's dialogue slope)."""
    return _stemmed(content_tokens.__wrapped__(question))


def _stemmed(tokens: frozenset[str]) -> frozenset[str]:
    out = set()
    for t in tokens:
        out.add(stem(t))
        if "-" in t and all(part.isalpha() for part in t.split("-")):
            out.update(stem(part) for part in t.split("-") if part not in STOPWORDS)
    return frozenset(out)


def _chinese_words(tokens: set[str]) -> tuple[str, ...]:
    return tuple(w for w in tokens if len(w) > 1 and has_cjk(w))


# "It can no longer be cancelled online." is followed by what can be done instead.
_RESTRICTION = re.compile(r"\b(?:no longer|cannot|can't|can not|unable to|not possible)\b|不能|无法|不再|不可以", re.I)
# A list item ("- ...") of more sentences or characters than this is shown sentence by sentence (a chunk
# keeps a paragraph that follows an item on the item's line).
_MAX_ITEM_SENTENCES = 3
_MAX_ITEM_CHARS = 300
_ITEM = re.compile(r"^\s*[-*•]\s+")


@functools.lru_cache(maxsize=8192)
def _sentences(text: str) -> tuple[tuple[str, str], ...]:
    """A passage's sentences, each with what is shown when it is the answer: a list item whole ("- L2: use
    the 5 V / 2 A adapter. Laptop USB ports cause flickering."), a sentence that says what is not possible
    with the one after it, which says what is ("...can no longer be cancelled online. You can refuse the
    parcel."), any other sentence alone. Cached: the same passages come back turn after turn."""
    out = []
    for line in text.splitlines():
        parts = split_sentences(line)
        item = 1 < len(parts) <= _MAX_ITEM_SENTENCES and bool(_ITEM.match(line)) and len(line) <= _MAX_ITEM_CHARS
        for i, sentence in enumerate(parts):
            if item:
                shown = _join([_BULLET.sub("", x) for x in parts])
            elif i + 1 < len(parts) and _RESTRICTION.search(sentence):
                shown = _join([_BULLET.sub("", sentence), parts[i + 1]])
            else:
                shown = _BULLET.sub("", sentence)
            out.append((sentence, shown))
    return tuple(out)


def _join(sentences: list[str]) -> str:
    return ("" if has_cjk(sentences[0]) else " ").join(sentences)


@functools.lru_cache(maxsize=16384)
def _sentence_facts(sentence: str) -> frozenset[str]:
    """The facts of a sentence without its list marker: the 4 of "4. 组网成功后…" numbers a step."""
    return facts(_BULLET.sub("", sentence))


# Passages of other documents that the question put in the other language's words finds, after the
# question's own, and how much less their retrieval score counts.
BRIDGE_PASSAGES = 4
_BRIDGE_SCORE = 0.5


def bridge_query(query: str, glossed: list[str]) -> str:
    """``query`` in the other language's words: the words its concepts have there and its gloss, with
    its codes. Searched beside the question, it finds the page in the other language that shares no word
    with the question (and that an English-only embedder cannot place). "" when there is nothing to say
    that way."""
    chinese = has_cjk(query)
    words = [w for w in dict.fromkeys(expansions(query) + glossed) if has_cjk(w) != chinese]
    return " ".join([*sorted(identifiers(query)), *words]) if words else ""


def with_bridge(passages: list[Passage], bridged: list[Passage]) -> list[Passage]:
    """``passages`` and after them the first BRIDGE_PASSAGES of ``bridged`` from other documents, their
    scores discounted: they support the question's own search, never outrank it."""
    seen = {p.doc_id for p in passages}
    extra = [replace(p, score=p.score * _BRIDGE_SCORE) for p in bridged if p.doc_id not in seen][:BRIDGE_PASSAGES]
    out = list(passages)
    for i, p in enumerate(extra):
        out.insert(min(2 * i + 1, len(out)), p)
    return out


def _question_tokens(query: str) -> set[str]:
    """The question's meaningful words plus the other words of the concepts it asks about, so "how much"
    meets "Price:" and "电池" meets "battery"."""
    return _words(query) | _concept_words(query)


def _concept_words(query: str) -> set[str]:
    """The other words of the concepts ``query`` asks about."""
    return {stem(t) for t in query_tokens(" ".join(expansions(query)))}


def _words(text: str) -> set[str]:
    """The meaningful tokens of ``text`` without the single Chinese characters of its longer words: a
    question's "路由器" should meet "路由" in a sentence, not count again for "路" and "由"."""
    tokens = _question_terms(text)
    covered = {ch for t in tokens if len(t) > 1 and has_cjk(t) for ch in t}
    return {t for t in tokens if not (len(t) == 1 and t in covered)}


def best_evidence(query: str, passages: list[Passage], extra: tuple[str, ...] = (), focus: str = "") -> Evidence | None:
    """The passage sentence that answers ``query`` best (None when none says anything it asks about).

    A sentence is scored by the question's words it shares (expanded with the concepts' other words,
    so "多少钱" meets "Price:"), the concepts it covers (price, warranty, battery, ...), whether its
    document is about the product the question names ("X100" is not the "X100 Pro"), and retrieval's
    rank; ``extra`` words (the question glossed into the other language) count half, and so do words
    the rewriting brought in from earlier turns when ``focus`` (what the visitor just said) is given:
    "What about the case?" after a question about a lost earbud is about the case. The facts an
    answer must keep come from the sentence's best clause, where words that merely
    name the document weigh less: for "K5 保修多久" in "K5 电水壶容量 1.7 升，售价 199 元，保修 18 个月"
    that is "保修 18 个月", so 18 is required and 1.7 and 199 are not.
    """
    own = _words(query)  # not cached (see _question_terms): computed once here
    q = own | _concept_words(query)
    if not q:
        return None
    # Words only of earlier turns weigh half of the visitor's own words of this turn.
    earlier = frozenset(q - _question_tokens(focus)) if focus and focus != query else frozenset()
    # Words of the other language (a gloss) help a little, never as much as the question's own.
    glossed = frozenset(stem(t) for t in query_tokens(" ".join(extra))) - q if extra else frozenset()
    # Concepts of this turn count fully, those only of the earlier turns it was rewritten with, less.
    asked = concepts(query)
    now = concepts(focus) if focus else asked
    named = products(query)
    # The product's name identifies the document (``identity``); it is not what the question asks.
    name_tokens = frozenset(t for name in named for t in _terms(name))
    quantity = asks_quantity(query)
    shape = answer_shape(focus or query)
    cities = entities(query, "city")
    # A question about the shop's rules for a product ("K5 保修期内坏了要发票吗？", "my K7 stopped heating, can I get
    # a new one?") is answered by the rule's page as much as by the product's.
    product_say = 0.5 if now - PRODUCT_ATTRIBUTES - ENTITY_NAMES else 1.0
    # A product the question rules out ("not the X200") is another product, not a code it asks about.
    codes = identifiers(query) - {c for name in ruled_out(query) for c in identifiers(name)}
    # Codes that are not the product: error codes, order numbers, SKUs. A sentence with one answers.
    asked_codes = codes - {c for name in named for c in identifiers(name)}
    best: tuple[tuple[float, float, int], Evidence] | None = None
    top = max((p.score for p in passages), default=0.0) or 1.0
    chinese = _chinese_words(q)
    synonyms = frozenset(q - own)
    for rank, p in enumerate(passages):
        title_tokens = _terms(p.title) | name_tokens
        about = products(p.title)
        # +2 when the document is about the named product, -2 when it is about another one; otherwise,
        # a document whose title the question names (in either language: "北京中关村店" and "Beijing
        # Zhongguancun Store") is the one asked about.
        identity = 0.0 if not named or not about else (2.0 if named & about else -2.0) * product_say
        # The same, and more, for the city a store's page is about ("深圳华强北店" for "你们深圳门店"): a
        # question that names the city is about that city's store, never another's.
        if cities and (at := entities(p.title, "city")):
            identity += _CITY_IDENTITY if cities & at else -_CITY_IDENTITY
        if not identity and (raw_title := _terms(p.title)):
            # Named by the question's own words (or their gloss), not by the synonyms it was widened with.
            share = len(raw_title & ((q - synonyms) | glossed)) / len(raw_title)
            identity = _TITLE_MATCH * share if share >= _TITLE_SHARE else 0.0
        prior = p.score / top + 1.0 / (1 + rank)
        for sentence, answer in _sentences(p.text):
            if sentence.rstrip().endswith(("?", "？")):
                continue  # a question (an FAQ's own, say) is not an answer
            own = (_weighted_overlap(q, sentence, title_tokens, earlier, chinese, synonyms)
                   + 0.5 * len(glossed & _terms(sentence)))
            said = concepts(sentence) | concepts(p.heading) | concepts(p.title)
            covered = len(now & said) + _EARLIER_WEIGHT * len((asked - now) & said)
            mentioned = products(sentence)
            # A page about no product in particular (a policy) whose title the question names, naming the
            # product asked about, says how the policy applies to it: "Not valid for clearance items such as
            # the SM-G9910".
            exception = bool(named & mentioned) and not about and identity > 0 and bool(covered or not now)
            if own <= _TITLE_WEIGHT and not covered and not exception:
                continue  # the sentence itself says nothing the question asks about
            if exception:
                mention = 2.0
            elif named & mentioned:
                mention = 1.0
            elif named and mentioned and not identifiers(sentence) & codes:
                mention = -1.0  # about another product (a code the question also has, E05 say, is not one)
            else:
                mention = 0.0
            score = own + _CONCEPT_WEIGHT * covered + identity + mention + prior
            score += _CODE_WEIGHT * len(asked_codes & identifiers(sentence))
            if shape is not None and shape.search(sentence):
                score += _SHAPE_WEIGHT
            if (label := _LABEL.match(sentence)) and concepts(label.group(1)) & now:
                score += _LABEL_WEIGHT
            if quantity and not any(f[0].isdigit() for f in _sentence_facts(sentence)):
                score -= _NO_QUANTITY_PENALTY  # "多大", "how long": the answer has a number in it
            # Ties go to the better-ranked passage.
            key = (round(score, 3), -rank, own)
            if best is None or key > best[0]:
                shown = answer
                own_text = _BULLET.sub("", sentence)
                clauses = [c for c in _CLAUSE.split(own_text) if c.strip()] or [own_text]
                clause = max(clauses, key=lambda c: (len(asked & concepts(c)),
                                                     _weighted_overlap(q, c, title_tokens, chinese=chinese),
                                                     bool(facts(c))))
                required = frozenset(facts(clause) - facts(query))
                if p.heading and len(content_tokens(shown)) <= _TERSE and not content_tokens(p.heading) & content_tokens(shown):
                    shown = f"{p.heading}: {shown}"  # "2 years." alone does not say of what
                best = (key, Evidence(shown, p.doc_id, required, score))
    if best is not None and asks_how(focus or query):
        # "怎么恢复出厂？" / "how do I reset it?": the document's numbered steps are the answer.
        steps = _steps([p for p in passages if p.doc_id == best[1].doc_id])
        if steps:
            return Evidence("\n".join(steps), best[1].doc_id, frozenset(), best[1].score)
    return best[1] if best else None


# "怎么办" / "what should I do" ask what to do about a problem, not for a procedure's steps.
_HOW = re.compile(r"怎么(?!办|回事)|怎样|如何|步骤|\bhow (do|can|to|should|would)\b|\bsteps?\b", re.I)
_STEP = re.compile(r"^\s*(\d{1,2})[.、)]\s*\S")
MAX_STEPS = 8


def asks_how(text: str) -> bool:
    """Whether ``text`` asks how to do something ("怎么恢复出厂", "how do I reset it")."""
    return bool(_HOW.search(text))


def _steps(passages: list[Passage]) -> list[str]:
    """The numbered steps (1., 2., 3. ...) in a document's passages, in order, each once; [] unless
    there are at least two that follow each other."""
    found: dict[int, str] = {}
    for p in passages:
        for line in p.text.splitlines():
            if (m := _STEP.match(line)) and int(m.group(1)) not in found:
                found[int(m.group(1))] = line.strip()
    steps = []
    for n in range(1, MAX_STEPS + 1):
        if n not in found:
            break
        steps.append(found[n])
    return steps if len(steps) >= 2 else []


MAX_CONTEXT_CHARS = 400
_TURN_CHARS = 90


def context_note(recent: list[tuple[str, str]], slots: dict[str, str], summary: str = "") -> str:
    """What the model needs of the conversation so far, bounded however long it is: the running summary
    of the older turns, the last exchanges (question, answer) verbatim but clipped, and what is known.
    Older turns also live on in the slots and the memory vectors, which the rewriting already used."""
    parts = [summary] if summary else []
    for question, answer in recent:
        parts.append(f"Q: {question[:_TURN_CHARS]}" + (f" A: {answer[:_TURN_CHARS]}" if answer else ""))
    known = {k: v for k, v in slots.items() if k != "phone"}  # the model never needs the phone number
    if known:
        parts.append("Known: " + ", ".join(f"{k}={v}" for k, v in sorted(known.items())))
    return " | ".join(parts)[:MAX_CONTEXT_CHARS]


def build_messages(query: str, passages: list[Passage], evidence: Evidence, context: str = "") -> list[dict[str, str]]:
    """The grounded prompt: the conversation note, the evidence first, then the other passages (each a
    chunk of bounded size), then the question. Its size does not grow with the conversation."""
    others = [p.text for p in passages[:2] if evidence.sentence not in p.text]
    reference = " ".join([evidence.sentence, *others])
    system = ("You are a customer service assistant. Answer the question in one short sentence using only "
              "the reference. Keep the exact numbers and names from the reference. "
              + ("Answer in Chinese." if lang(query) == "zh" else "Answer in English."))
    note = f"Conversation: {context}\n\n" if context else ""
    user = f"{note}Reference: {reference}\n\nQuestion: {query}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def sentence_ok(sentence: str, *, query: str, passages: list[Passage], evidence: Evidence, first: bool) -> bool:
    """Whether a generated sentence may be shown. It must invent no number or code (facts come from the
    question or the evidence's own document, not from any passage retrieved), say little that is not in
    the passages, be in the question's language, not loop or echo the prompt, and — the first sentence —
    carry the facts that answer the question. When the evidence has no such facts (a yes/no or how-to
    answer) a small model's paraphrase cannot be checked, so the cited sentence is the answer instead."""
    if not sentence.strip() or _ECHO.search(sentence) or _LOOP.search(sentence.replace(" ", "")):
        return False
    clauses = [c.strip(" 。.！!？?") for c in _CLAUSE.split(sentence) if c.strip(" 。.！!？?")]
    if len(clauses) != len(set(clauses)):
        return False  # the same clause twice: a loop
    if content_tokens(sentence) <= content_tokens(query):
        return False  # the question said back, not an answer
    source = [p for p in passages if p.doc_id == evidence.doc_id] or passages
    known = facts(query) | {f for p in source for f in facts(p.title + " " + p.text)}
    said = facts(sentence)
    if said - known:
        return False
    # Most of what it says must be in the passages: a tiny model likes to embellish ("a luxury item").
    words = content_tokens(sentence)
    grounded = content_tokens(query + " " + " ".join(p.title + " " + p.text for p in passages))
    if words and len(words & grounded) < MIN_SUPPORT * len(words):
        return False
    if lang(query) == "zh" and not has_cjk(sentence):
        return False
    if first:
        return bool(evidence.required) and evidence.required <= said
    return bool(content_tokens(sentence) & (content_tokens(query) | content_tokens(evidence.sentence)))


# A tiny model stuck in a loop: the same 1-4 characters four times in a row ("福制福制福制福制").
_LOOP = re.compile(r"([^\d\s]{1,4}?)\1{3,}")
# The model repeating the prompt's scaffolding instead of answering.
_ECHO = re.compile(r"^\s*[-*•]|\b(reference|question|answer)\s*(is)?\s*:|the answer to|参考|问题：|答案：", re.I)

# A list item's marker: "- ", "• ", "1. ", "2、".
_BULLET = re.compile(r"^\s*(?:[-*•]\s+|\d{1,2}[.、)]\s*(?=\D))")

_COMPLETE = re.compile(r"[。！？!?]|[.;](?=\s)")


def cited(sentences: list[str], passages: list[Passage], evidence: Evidence) -> list[str]:
    """The documents an answer draws on: the evidence's, then the best match of each other sentence."""
    docs = [evidence.doc_id]
    for s in sentences:
        words = content_tokens(s)
        best = max(passages, key=lambda p: len(words & content_tokens(p.title + " " + p.text)), default=None)
        if best is not None and best.doc_id not in docs and words & content_tokens(best.text):
            docs.append(best.doc_id)
    return docs


def split_complete(buffer: str) -> tuple[list[str], str]:
    """Complete sentences in a growing buffer of generated text, and the unfinished rest."""
    end = 0
    for m in _COMPLETE.finditer(buffer):
        end = m.end()
    if not end:
        return [], buffer
    return split_sentences(buffer[:end]), buffer[end:]
