"""Split documents into chunks that respect headings and sentences (Chinese and English), with overlap."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kefu.shared.text import split_sentences

_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    chunk_id: str
    title: str
    text: str
    position: int
    version: int
    heading: str = ""

    @property
    def embed_text(self) -> str:
        """What gets embedded and keyword-indexed: the title and heading give a short chunk its topic."""
        head = " / ".join(p for p in (self.title, self.heading) if p)
        return f"{head}\n{self.text}" if head else self.text


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs; text before the first heading has an empty heading."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            sections.append((m.group(2), []))
        else:
            sections[-1][1].append(line)
    return [(h, "\n".join(body).strip()) for h, body in sections if "\n".join(body).strip() or h]


def chunk_document(doc_id: str, title: str, text: str, version: int, *, max_chars: int = 500,
                   overlap_sentences: int = 1) -> list[Chunk]:
    """Chunks of at most about ``max_chars`` characters, never cutting a sentence unless it alone is
    longer, never crossing a heading; consecutive chunks of a section share ``overlap_sentences``."""
    chunks: list[Chunk] = []
    for heading, body in _sections(text):
        sentences: list[str] = []
        for s in split_sentences(body) or ([heading] if heading else []):
            # A sentence longer than a chunk is cut at max_chars.
            sentences.extend(s[i:i + max_chars] for i in range(0, len(s), max_chars))
        start = 0
        while start < len(sentences):
            end, size = start, 0
            while end < len(sentences) and (end == start or size + len(sentences[end]) <= max_chars):
                size += len(sentences[end]) + 1
                end += 1
            piece = _join(sentences[start:end])
            pos = len(chunks)
            chunks.append(Chunk(doc_id, f"{doc_id}#{pos}", title, piece, pos, version, heading))
            if end >= len(sentences):
                break
            start = max(end - overlap_sentences, start + 1)
    return chunks


def _join(sentences: list[str]) -> str:
    out = ""
    for s in sentences:
        if not out:
            sep = ""
        elif out[-1] not in _ENDS or _ITEM.match(s):
            sep = "\n"  # a line of its own (a list item, a "key: value" line) stays one
        elif out[-1] in "。！？；" or s[:1] in "。！？；":
            sep = ""  # no space between Chinese sentences
        else:
            sep = " "
        out += sep + s
    return out


_ENDS = "。！？；.!?;"
_ITEM = re.compile(r"[-*•]\s|\d{1,2}[.、)]\s*\D")
