"""``kefu kb import``: documents from files, through the gateway's document route."""

from __future__ import annotations

import csv
import html.parser
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kefu.cli.client import Client

SUFFIXES = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".csv", ".json", ".jsonl"}
_SLUG = re.compile(r"[^\w\-]+", re.UNICODE)


def slug(text: str) -> str:
    return _SLUG.sub("-", text).strip("-")[:120] or "doc"


class _Text(html.parser.HTMLParser):
    _SKIP = {"script", "style", "noscript", "template"}
    _BLOCK = {"p", "div", "br", "li", "tr", "section", "article", "table", "ul", "ol"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in {"h1", "h2", "h3", "h4", "h5", "h6"}:
            self.parts.append("\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in {"h1", "h2", "h3", "h4", "h5", "h6"} or tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data.strip()
        elif not self._skip:
            self.parts.append(data)


def _first_heading(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def documents(path: Path) -> Iterator[dict[str, Any]]:
    """The documents in one file: {"doc_id", "title", "text", "metadata"}."""
    suffix = path.suffix.lower()
    base = slug(path.stem)
    meta = {"source": path.name}
    if suffix in {".md", ".markdown", ".txt"}:
        text = path.read_text(encoding="utf-8")
        yield {"doc_id": base, "title": _first_heading(text) or path.stem, "text": text, "metadata": meta}
    elif suffix in {".html", ".htm"}:
        parser = _Text()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()
        yield {"doc_id": base, "title": parser.title or _first_heading(text) or path.stem, "text": text,
               "metadata": meta}
    elif suffix == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        text = "\n\n".join((page.extract_text() or "") for page in reader.pages).strip()
        title = (reader.metadata.title if reader.metadata else None) or path.stem
        yield {"doc_id": base, "title": str(title), "text": text, "metadata": meta}
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        yield from _records(rows, base, meta)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from _records(data if isinstance(data, list) else [data], base, meta)
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        yield from _records(rows, base, meta)
    else:
        raise ValueError(f"unsupported file type {suffix}")


def _records(rows: list[Any], base: str, meta: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Records become documents: {doc_id,title,text}, or a FAQ pair {question, answer}, or any row."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"record {i} is not an object")
        low = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        question = low.get("question") or low.get("q") or low.get("问题")
        answer = low.get("answer") or low.get("a") or low.get("答案")
        if question and answer:
            yield {"doc_id": str(low.get("doc_id") or f"{base}-{i}"), "title": str(question),
                   "text": f"{question}\n{answer}", "metadata": {**meta, "kind": "faq"}}
        elif low.get("text"):
            yield {"doc_id": str(low.get("doc_id") or f"{base}-{i}"), "title": str(low.get("title") or ""),
                   "text": str(low["text"]), "metadata": meta}
        else:
            text = "\n".join(f"{k}: {v}" for k, v in row.items() if v not in (None, ""))
            yield {"doc_id": f"{base}-{i}", "title": base, "text": text, "metadata": meta}


def import_paths(client: Client, tenant: str, paths: list[Path]) -> int:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES))
        else:
            files.append(p)
    ok = failed = 0
    for f in files:
        try:
            docs = list(documents(f))
        except (OSError, ValueError, UnicodeDecodeError, ImportError) as exc:
            print(f"skip {f}: {exc}", file=sys.stderr)
            failed += 1
            continue
        for doc in docs:
            status, body = client.call("PUT", f"/v1/tenants/{tenant}/documents/{doc['doc_id']}",
                                       {"title": doc["title"], "text": doc["text"], "metadata": doc["metadata"]})
            if status == 200:
                ok += 1
                print(f"imported {f.name} -> {doc['doc_id']} (version {body.get('version')})")
            else:
                failed += 1
                err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                print(f"failed {f.name} -> {doc['doc_id']}: {status} {err.get('code')} {err.get('message')}",
                      file=sys.stderr)
    print(f"{ok} documents imported, {failed} failed")
    return 0 if failed == 0 and ok > 0 else 1
