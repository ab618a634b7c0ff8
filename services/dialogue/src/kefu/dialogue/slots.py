"""Slot extraction and follow-up rewriting by rules, so memory works with a 135M model (or none).

Slots: ``product`` (a model number with its suffix: "X100 Pro", "RV-300"), ``order_id``, ``phone``,
``date`` (absolute, or relative like "上个月" / "last month", resolved against the message's time).
A follow-up that names no product but asks about a product attribute, or points back at one ("它",
"that one", "its"), is searched with the remembered product: "它保修多久" after "我上个月买了X100"
becomes "X100 它保修多久".
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import unicodedata

from kefu.shared.lexicon import ENTITY_GROUPS, PRODUCT_ATTRIBUTES, concepts, entity, entity_words
from kefu.shared.text import has_cjk, split_sentences

_SUFFIX = r"(?:\s?(?:Pro\+?|Max|Plus|Ultra|Mini|Lite|SE|Air))?"
_PRODUCT = re.compile(
    r"(?<![A-Za-z0-9])(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z]+[A-Za-z0-9]*(?:-[A-Za-z0-9]+)*" + _SUFFIX
    + r"(?![A-Za-z0-9])", re.I)
# Letters may touch the order number on the left: OCR often drops spaces ("OrderKF2026...").
_ORDER = re.compile(r"(?<![0-9])(?:[A-Za-z]{2}\d{10,18}|(?<![A-Za-z])\d{12,20})(?![0-9])")
# Shorter order numbers count when the message says they are one ("订单 20261124001", "order #A12345678"),
# or when the message is nothing but the number (the answer to "what is your order number?").
_ORDER_CUED = re.compile(r"(?:订单号?|单号|\border(?:\s*(?:number|no\.?|id))?|#)\s*(?:是|为|:|：|#|is)?\s*"
                         r"([A-Za-z]{0,4}\d{6,20})(?![0-9A-Za-z])", re.I)
_ORDER_ALONE = re.compile(r"^\s*(?:#\s*)?([A-Za-z]{0,4}\d{8,20})\s*[。.!！]?\s*$")
_PHONE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?(1[3-9]\d{9})(?!\d)")
_ISO_DATE = re.compile(r"(?<!\d)(20\d{2})[-/.年](\d{1,2})[-/.月](\d{1,2})日?(?!\d)")
_MD_DATE = re.compile(r"(?<!\d)(\d{1,2})月(\d{1,2})[日号]")
# An identifier right after these words is an error or status code, not a product.
_CODE_CUE = re.compile(r"(error|code|shows?|showing|says|display(?:s|ing)?|显示|报错|故障|错误|提示|出现|代码)\s*[:：]?\s*$", re.I)
_NEGATED = re.compile(r"(\bnot|n't|\binstead of|\brather than|不是|而不是|不是说)\s*(the|a|my|an)?\s*$", re.I)
_BACK_REFERENCE = re.compile(r"它|这个|这款|那个|那款|[这那](?:台|盏|部|只|把|件|块|副|套|条|双|个)|该产品|\b(it|its|this one|that one|that|this)\b", re.I)
_RELATIVE = {
    "今天": 0, "today": 0, "昨天": -1, "yesterday": -1, "前天": -2,
}


def _relative_date(text: str, now: dt.date) -> dt.date | None:
    low = text.lower()
    for word, days in _RELATIVE.items():
        if word in low:
            return now + dt.timedelta(days=days)
    if "上周" in text or "上星期" in text or "last week" in low:
        return now - dt.timedelta(days=7)
    if "上个月" in text or "上月" in text or "last month" in low:
        month = now.month - 1 or 12
        year = now.year - (1 if now.month == 1 else 0)
        return dt.date(year, month, 1)
    if "去年" in text or "last year" in low:
        return dt.date(now.year - 1, 1, 1)
    return None


@functools.lru_cache(maxsize=16384)
def products(text: str) -> frozenset[str]:
    """The products ``text`` names, normalized ("X100 Pro" -> "x100 pro"; error codes excluded). Cached:
    the same knowledge-base sentences are read turn after turn."""
    return frozenset(" ".join(name.lower().split()) for name in product_names(text))


def product_names(text: str) -> list[str]:
    """The products ``text`` names, as written ("X100 Pro"), in order (error codes excluded)."""
    text = unicodedata.normalize("NFKC", text)
    named = [m for m in _PRODUCT.finditer(text) if not _CODE_CUE.search(text[:m.start()])]
    # "I meant the X100 Pro, not the X200" / "是 X100 Pro，不是 X200": the one ruled out is not the subject.
    kept = [m.group().strip() for m in named if not _NEGATED.search(text[:m.start()])]
    return kept or [m.group().strip() for m in named]


def ruled_out(text: str) -> set[str]:
    """The products ``text`` rules out ("not the X200"), normalized."""
    text = unicodedata.normalize("NFKC", text)
    return {" ".join(m.group().lower().split()) for m in _PRODUCT.finditer(text)
            if _NEGATED.search(text[:m.start()]) and not _CODE_CUE.search(text[:m.start()])}


def extract(text: str, now: dt.datetime) -> dict[str, str]:
    """The slots ``text`` mentions (only those it mentions)."""
    text = unicodedata.normalize("NFKC", text)
    slots: dict[str, str] = {}
    phones = _PHONE.findall(text)
    orders = _ORDER.findall(text) or [o for o in _ORDER_CUED.findall(text) if o not in phones]
    if not orders and not phones and (alone := _ORDER_ALONE.match(text)):
        orders = [alone.group(1)]
    if orders:
        slots["order_id"] = orders[-1].upper()
    if phones:
        slots["phone"] = phones[-1]
    taken = set(orders) | set(phones)
    named = [p for p in product_names(text) if not any(p in t or t in p for t in taken)]
    if named:
        slots["product"] = named[-1]
    date = None
    if m := _ISO_DATE.search(text):
        date = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    elif m := _MD_DATE.search(text):
        date = dt.date(now.year, int(m.group(1)), int(m.group(2)))
    else:
        date = _relative_date(text, now.date())
    if date:
        slots["date"] = date.isoformat()
    for group in ENTITY_GROUPS:
        if name := entity(text, group):
            slots[group] = name.split("_", 1)[1]  # "gold"
    return slots


def needs_product(text: str) -> bool:
    """Whether ``text`` asks about a product without naming one (a follow-up)."""
    if _PRODUCT.search(unicodedata.normalize("NFKC", text)):
        return False
    if _BACK_REFERENCE.search(text):
        return True
    short = len(text) <= 12 if has_cjk(text) else len(text.split()) <= 6
    return short and bool(concepts(text) & PRODUCT_ATTRIBUTES)


_ELLIPSIS = re.compile(r"^\s*(那|那么|还有)?[^。！？!?]{0,12}呢\s*[？?]?\s*$|^\s*(and|what about|how about)\b", re.I)


def elliptical(text: str) -> bool:
    """A question that leans on the previous one: "那工作日呢？", "and on weekends?", or one that points
    back ("它", "that") without naming what it points at."""
    normalized = unicodedata.normalize("NFKC", text)
    return bool(_ELLIPSIS.search(normalized)) or (bool(_BACK_REFERENCE.search(text)) and
                                                    not _PRODUCT.search(normalized))


_QUESTION = re.compile(r"[?？]\s*$|吗|呢|怎么|多少|几|哪|什么|是否|能不能|可不可以|有没有|"
                       r"^\s*(?:is|are|can|could|do|does|will|would|how|what|when|where|which|why)\b", re.I)


def leans_on(text: str) -> bool:
    """A question that names nothing of its own (no product, code or concept): "Is there a limit on how many
    I can add?", "只有一边有声音怎么办？". In a conversation it is about what was just asked about — unless
    it is small talk with the bot itself ("Are you a robot?", "你是谁？"), which is about no product."""
    normalized = unicodedata.normalize("NFKC", text)
    return (bool(_QUESTION.search(normalized)) and not _PRODUCT.search(normalized) and not concepts(text)
            and not _SMALL_TALK.search(normalized))


_SMALL_TALK = re.compile(
    r"\b(are|r) (you|u)\b|\bwho (are|r) (you|u)\b|\byour name\b|\b(robot|bot|chatbot|ai|human|real person)\b|"
    r"\b(hello|hi|hey|thanks|thank you)\b|你是|你叫|你们是谁|机器人|人工智能|真人|你好|谢谢|在吗", re.I)


# "换个问题，", "另外问一下，", "Different question:", "By the way,": what follows is a new topic.
_TOPIC_CHANGE = re.compile(
    r"^\s*(?:换个问题|换个话题|另外(?:问一下|想问|再问)?|还有个问题|还有一个问题|对了|顺便问一下|顺便问下|"
    r"different question|another question|something else|one more thing|by the way|btw|unrelated"
    r")\s*[,，:：、.\-—]*\s*", re.I)
# "啊不对，", "Sorry, I meant": a correction; the words themselves are not what to search for.
_CORRECTION = re.compile(
    r"^\s*(?:(?:啊|哦|噢)?(?:不对|不是|我看错了|看错了|说错了|搞错了)|(?:oh )?(?:sorry|wait|oops)\b)\s*[,，:：、.!！\-—]*\s*",
    re.I)
# How much of the previous question a follow-up carries (its last sentences): follow-ups of follow-ups
# must not grow the query without bound.
MAX_PREVIOUS_CHARS = 120


def topic_change(text: str) -> bool:
    """Whether ``text`` opens a new topic ("换个问题，…", "Different question: …")."""
    return bool(_TOPIC_CHANGE.match(text))


def strip_discourse(text: str) -> str:
    """``text`` without its opening "换个问题，" / "Sorry, I meant" words."""
    rest = text
    for pattern in (_TOPIC_CHANGE, _CORRECTION, _TOPIC_CHANGE):
        if m := pattern.match(rest):  # the patterns have the full-width punctuation too
            rest = rest[m.end():]
    return rest.strip() or text


def _tail(text: str) -> str:
    """The last sentences of ``text``, at most MAX_PREVIOUS_CHARS (at least one sentence)."""
    out: list[str] = []
    for sentence in reversed(split_sentences(text)):
        if out and len(" ".join([sentence, *out])) > MAX_PREVIOUS_CHARS:
            break
        out.insert(0, sentence)
    return " ".join(out)


def rewrite(text: str, slots: dict[str, str], previous: str = "") -> str:
    """The query to search for ``text``, given the conversation's remembered ``slots`` and the
    ``previous`` question (as it was searched). A question that opens a new topic is searched as it
    is; the words that open it or correct the last one are not searched for."""
    changed = topic_change(text)
    text = strip_discourse(text)
    if changed and not _BACK_REFERENCE.search(text):
        return text  # "对了，它保修多久" still points back
    product = slots.get("product")
    if product and needs_product(text):
        return f"{product} {text}"
    if previous and elliptical(text):
        return f"{_tail(previous)} {text}"
    # A question of nothing of its own is about the product talked about, else about the last question's.
    if leans_on(text) and (product or previous):
        return f"{product or _tail(previous)} {text}"
    # "生日券有多少？" from a visitor who said they are 金卡: the remembered tier goes with it.
    for group, (names, topics) in ENTITY_GROUPS.items():
        value = slots.get(group)
        if value and f"{group}_{value}" in names and not entity(text, group) and concepts(text) & topics:
            return f"{entity_words(f'{group}_{value}')} {text}"
    return text


MODEL_SLOTS = ("product", "order_id", "phone", "date")


def verify_model_slots(proposed: dict[str, str], text: str, found: dict[str, str], now: dt.datetime) -> dict[str, str]:
    """The model's slot proposals that ``text`` itself bears out, for slots the rules did not ``found``:
    a product, order number or phone number must appear in the message as written (a small model
    invents them), a date must be a real ISO date within two years of ``now``."""
    normalized = unicodedata.normalize("NFKC", text).casefold()
    compact = re.sub(r"[\s-]", "", normalized)
    taken = {re.sub(r"[\s-]", "", v.casefold()) for v in found.values()}
    out: dict[str, str] = {}
    for name, value in proposed.items():
        value = unicodedata.normalize("NFKC", value).strip()
        if name not in MODEL_SLOTS or name in found or not value or len(value) > 40:
            continue
        if re.sub(r"[\s-]", "", value.casefold()) in taken:
            continue  # the phone number the rules found, offered again as an order number
        if name == "order_id" and _looks_like_date(value):
            continue
        if name == "date":
            try:
                day = dt.date.fromisoformat(value)
            except ValueError:
                continue
            numbers = {int(n) for n in re.findall(r"\d+", normalized)}
            month_named = day.strftime("%b").casefold() in normalized
            if abs((day - now.date()).days) <= 730 and day.day in numbers and (day.month in numbers or month_named):
                out[name] = day.isoformat()
        elif name == "product":
            if value.casefold() in normalized:
                out[name] = value
        elif re.sub(r"[\s-]", "", value.casefold()) in compact and any(ch.isdigit() for ch in value):
            out[name] = value.upper() if name == "order_id" else value
    return out


def _looks_like_date(value: str) -> bool:
    try:
        dt.date.fromisoformat(value)
        return True
    except ValueError:
        return bool(_ISO_DATE.fullmatch(value))
