"""Text utilities for Chinese and English: tokens for keyword search, sentences, and the "facts"
(numbers, model codes) an answer must not drop or invent.

jieba loads its dictionary on first use (about a second); services call :func:`warm_up` at start-up.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import jieba

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
_LATIN_TOKEN = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
_CJK_RUN = re.compile(f"[{_CJK}]+")
# A sentence ends at CJK terminal punctuation, or at . ! ? ; followed by whitespace or the end.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?])|(?<=[.;])(?=\s|$)|\n+")
# Numbers (129, 1.7, 1,299) and codes that mix letters and digits (L2, X100, SM-G9910).
_FACT = re.compile(r"(?<![A-Za-z0-9.])(?:[A-Za-z]+[-_]?[A-Za-z]*\d[A-Za-z0-9_-]*|\d+(?:[.,]\d+)*[A-Za-z]*)(?![A-Za-z0-9])")

STOPWORDS = frozenset(
    """a an the is are was were be been am do does did of to in on at for with by from and or not no it its
    this that these those i you he she we they me my your our their what which who whom how much many when
    where why can could should would will shall may might must have has had there here about as if than so
    please tell know want any some""".split()
) | frozenset("的 了 吗 呢 吧 啊 呀 是 在 有 和 与 及 或 我 你 您 他 她 它 我们 你们 请问 请 一下 什么 怎么 怎样 如何 多少 多久 哪 哪里 哪个 几 吗？ 么".split())


def warm_up() -> None:
    """Load jieba's dictionary now rather than on the first request."""
    jieba.setLogLevel(60)
    jieba.initialize()


def normalize(text: str) -> str:
    """NFKC (full-width to half-width) and lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def has_cjk(text: str) -> bool:
    return bool(_HAS_CJK.search(text))


def _latin_tokens(text: str, split_codes: bool) -> list[str]:
    """Words and codes of normalized ``text``; a code like "sm-g9910" also as "sm" and "g9910" when
    ``split_codes``."""
    tokens: list[str] = []
    for m in _LATIN_TOKEN.finditer(text):
        tok = m.group()
        tokens.append(tok)
        if split_codes and ("-" in tok or "_" in tok):
            tokens.extend(p for p in re.split(r"[-_]", tok) if p)
    return tokens


def tokenize(text: str, split_codes: bool = True) -> list[str]:
    """Keyword tokens: lower-case Latin words and codes (also split at '-' unless ``split_codes`` is
    false), jieba search-mode words for Chinese runs plus their single characters, so "上海交通大学"
    matches "上海" and "交通大学"."""
    text = normalize(text)
    tokens = _latin_tokens(text, split_codes)
    for run in _CJK_RUN.findall(text):
        words = [w for w in jieba.cut_for_search(run) if w.strip()]
        tokens.extend(words)
        tokens.extend(ch for ch in run if ch not in words)
    return tokens


def query_tokens(text: str) -> list[str]:
    """Keyword tokens for a query: like :func:`tokenize` without stop words, and a Chinese character
    on its own only where no longer word of the query covers it (they are recall at index time; in a
    query they would match half the corpus)."""
    text = normalize(text)
    tokens = _latin_tokens(text, split_codes=True)
    for run in _CJK_RUN.findall(text):
        words = [w for w in jieba.cut_for_search(run) if w.strip()]
        covered = {ch for w in words if len(w) > 1 for ch in w}
        tokens.extend(w for w in words if len(w) > 1 or w not in covered)
    return [t for t in dict.fromkeys(tokens) if t not in STOPWORDS]


_IDENT = re.compile(r"(?<![A-Za-z0-9.])(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*(?![A-Za-z0-9])")


@functools.lru_cache(maxsize=16384)
def identifiers(text: str) -> frozenset[str]:
    """Identifiers (model numbers, SKUs, order numbers, error codes) in ``text``: tokens that mix letters
    and digits, normalized so "SM-G9910", "sm g9910" style variants and "smg9910" meet: upper case, without
    '-' and '_'. Plain numbers are not identifiers."""
    text = unicodedata.normalize("NFKC", text)
    return frozenset(re.sub(r"[-_]", "", m.group()).upper() for m in _IDENT.finditer(text) if len(m.group()) >= 2)


@functools.lru_cache(maxsize=8192)
def content_tokens(text: str) -> frozenset[str]:
    """The tokens of ``text`` that carry meaning (no stop words), a code counted once ("rv-300", not
    also "rv" and "300")."""
    return frozenset(t for t in tokenize(text, split_codes=False) if t not in STOPWORDS)


_S_STEM = re.compile(r"[a-z]{4,}")


@functools.lru_cache(maxsize=16384)
def stem(token: str) -> str:
    """An English word without its plural or third-person "s" ("needs" -> "need", "batteries" -> "battery",
    "boxes" -> "box"), so that a question and a sentence that put a word differently still meet. Other
    tokens (codes, Chinese, short words, "glass", "status") are returned as they are."""
    if not _S_STEM.fullmatch(token) or token.endswith(("ss", "us", "is")) or not token.endswith("s"):
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith(("ches", "shes", "xes", "zes", "sses")):
        return token[:-2]
    return token[:-1]


def split_sentences(text: str) -> list[str]:
    """Sentences of mixed Chinese and English text; decimals like 1.7 stay whole, and so does a numbered
    step ("1. Hold the button.")."""
    out: list[str] = []
    marker = ""
    for part in _SENTENCE_END.split(text):
        part = part.strip() if part else ""
        if not part:
            continue
        if _LIST_MARKER.fullmatch(part):
            marker = f"{marker}{part} "
            continue
        out.append(marker + part)
        marker = ""
    if marker:
        out.append(marker.strip())
    return out


_LIST_MARKER = re.compile(r"\d{1,2}[.)]")


@functools.lru_cache(maxsize=16384)
def facts(text: str) -> frozenset[str]:
    """Numbers and letter-digit codes in ``text``, normalized (1,299 -> 1299; x100 -> X100)."""
    # Cached (the same knowledge-base sentences are checked turn after turn), so immutable.
    return frozenset(m.group().replace(",", "").upper() for m in _FACT.finditer(unicodedata.normalize("NFKC", text)))
