"""Reading documents into titled sections.

Every loader returns :class:`Section` objects — text with its heading trail — so the chunker can
split at headings first. A FAQ file (JSON, JSONL or CSV with question/answer fields) becomes one
section per pair, marked ``atomic`` so it is never split or merged: a question belongs with its
answer. Files that are binary or of an unknown type raise :class:`SkipFile` with the reason, so
an ingest can list them instead of crashing.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class SkipFile(Exception):
    """This file is not ingested; the message says why."""


@dataclass(slots=True)
class Section:
    text: str
    headings: list[str] = field(default_factory=list)
    atomic: bool = False
    meta: dict[str, str] = field(default_factory=dict)


QUESTION_KEYS = ("q", "question", "prompt", "instruction", "title")
ANSWER_KEYS = ("a", "answer", "response", "output", "completion")
MAX_FILE_BYTES = 200 * 1024 * 1024


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise SkipFile("binary file")
    for encoding in (
        ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",)
    ):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    # Not UTF-8: Latin-1 never fails; most legacy text files are close enough to it.
    text = data.decode("latin-1")
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text[:8192])
    if printable < 0.95 * min(len(text), 8192):
        raise SkipFile("binary file (not text in any supported encoding)")
    return text


def load_plain(path: Path) -> list[Section]:
    return [Section(read_text(path), [path.stem])]


def load_markdown(path: Path) -> list[Section]:
    from knowledge.markdown import parse

    name = path.name.removesuffix(".txt").rsplit(".", 1)[0]
    return [_anchored(text, trail, a) for trail, text, a in parse(read_text(path), name)]


def load_rst(path: Path) -> list[Section]:
    from knowledge.rst import parse

    name = path.name.removesuffix(".txt").removesuffix(".rst")
    return [_anchored(text, trail, a) for trail, text, a in parse(read_text(path), name)]


def _anchored(text: str, trail: list[str], anchor: str | None) -> Section:
    """A section that knows its id in the published page (for deep links in citations)."""
    return Section(text, trail, meta={"anchor": anchor} if anchor else {})


_CHROME = [
    "script",
    "style",
    "noscript",
    "nav",
    "header",
    "footer",
    "aside",
    "form",
    "svg",
    "iframe",
    "template",
]


_HEADING = ["h1", "h2", "h3", "h4", "h5", "h6"]


def load_html(path: Path) -> list[Section]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(read_text(path), "html.parser")
    for tag in soup(_CHROME):
        tag.decompose()
    for tag in soup.select('[role="navigation"], [aria-hidden="true"]'):
        tag.decompose()
    body = soup.find("main") or soup.find("article") or soup.body or soup
    title = soup.title.get_text(strip=True) if soup.title else path.stem
    sections: list[Section] = []
    trail: list[str] = [title]
    buf: list[str] = []

    anchor: str | None = None

    def flush() -> None:
        text = "\n\n".join(b for b in buf if b).strip()
        if text:
            sections.append(_anchored(text, list(trail), anchor))
        buf.clear()

    for el in body.find_all(
        ["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "blockquote", "dd", "dt"]
    ):
        if el.name and el.name[0] == "h" and el.name[1:].isdigit():
            flush()
            level = int(el.name[1])
            trail[:] = [*trail[:level], el.get_text(" ", strip=True)]
            # Its own id, or that of the section element it opens (Sphinx's layout); an id
            # around more than this section ("content") is no anchor for it.
            holder = el if el.get("id") else el.find_parent(["section", "div"], id=True)
            if holder is not None and holder is not el and holder.find(_HEADING) is not el:
                holder = None
            anchor = str(holder["id"]) if holder is not None else None
        elif not el.find_parent(["li", "td", "blockquote"]) or el.name in ("p", "pre"):
            buf.append(el.get_text(" ", strip=True))
    flush()
    return sections


def load_pdf(path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [(i + 1, page.extract_text() or "") for i, page in enumerate(reader.pages)]
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise SkipFile(f"unreadable PDF: {exc}") from None
    title = path.stem
    if reader.metadata and reader.metadata.title:
        title = str(reader.metadata.title)
    return [Section(text, [title, f"page {n}"]) for n, text in pages if text.strip()]


def _pick(record: dict, keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).lower(): v for k, v in record.items()}
    for key in keys:
        value = lowered.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _qa_sections(records: list[dict], path: Path) -> list[Section]:
    sections = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            continue
        q, a = _pick(record, QUESTION_KEYS), _pick(record, ANSWER_KEYS)
        if not q or not a:
            continue
        trail = [path.stem]
        category = record.get("category")
        if isinstance(category, str) and category:
            trail.append(category)
        trail.append(q)
        meta = {"question": q, "answer": a, "record": str(record.get("id", i))}
        if isinstance(record.get("taught_at"), str):  # an operator's answer (knowledge/taught.py)
            meta["taught_at"] = record["taught_at"]
        sections.append(Section(f"Q: {q}\nA: {a}", trail, atomic=True, meta=meta))
    return sections


def load_json(path: Path) -> list[Section]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise SkipFile(f"invalid JSON: {exc}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = max(lists, key=len) if lists else [data]
    sections = _qa_sections(data if isinstance(data, list) else [], path)
    if not sections:
        raise SkipFile("JSON without question/answer records")
    return sections


def load_jsonl(path: Path) -> list[Section]:
    records = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SkipFile(f"invalid JSON on line {n}: {exc}") from None
    sections = _qa_sections(records, path)
    if not sections:
        raise SkipFile("JSONL without question/answer records")
    return sections


def load_csv(path: Path) -> list[Section]:
    text = read_text(path)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    sections = _qa_sections(list(csv.DictReader(io.StringIO(text), dialect=dialect)), path)
    if not sections:
        raise SkipFile("CSV without question/answer columns")
    return sections


LOADERS: dict[str, Callable[[Path], list[Section]]] = {
    ".txt": load_plain,
    ".text": load_plain,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".rst": load_rst,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".json": load_json,
    ".jsonl": load_jsonl,
    ".csv": load_csv,
}


#: Sources published as text (Sphinx's ``_sources/*.rst.txt``, ``README.md.txt``…) are read
#: in their real format.
COMPOUND = {".rst.txt": load_rst, ".md.txt": None, ".markdown.txt": None}


def loader_for(path: Path) -> Callable[[Path], list[Section]] | None:
    name = path.name.lower()
    for suffix, loader in COMPOUND.items():
        if name.endswith(suffix):
            return loader or LOADERS[".md"]
    return LOADERS.get(path.suffix.lower())


def load(path: Path, max_bytes: int = MAX_FILE_BYTES) -> list[Section]:
    loader = loader_for(path)
    if loader is None:
        raise SkipFile(f"unsupported file type {path.suffix or '(none)'}")
    size = path.stat().st_size
    if size == 0:
        raise SkipFile("empty file")
    if size > max_bytes:
        raise SkipFile(f"larger than the {max_bytes / (1024 * 1024):g} MB limit ({size:,} bytes)")
    sections = [s for s in loader(path) if s.text.strip()]
    if not sections:
        raise SkipFile("no text found")
    return sections
