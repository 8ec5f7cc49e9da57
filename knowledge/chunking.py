"""Splitting sections into chunks the embedding model can see whole.

Sizes are counted in the embedding model's own tokens, because that is what it truncates on.
Splits prefer structure: sections (headings) first, then paragraphs, then sentences, and only
when a single sentence is longer than a chunk, raw token windows. Consecutive chunks of a
section overlap by about ``overlap`` tokens so a fact cut at a boundary is still whole in one
of them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bot.text import sentences
from knowledge.loaders import Section

_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(slots=True)
class Chunk:
    text: str
    headings: list[str]
    position: int
    checksum: str
    meta: dict[str, str] = field(default_factory=dict)


def checksum(text: str, headings: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    h.update("\x1f".join(headings).encode())
    h.update(b"\x1e")
    h.update(text.encode())
    return h.hexdigest()


class Chunker:
    """``count(texts) -> token counts`` and ``windows(text, size, overlap) -> texts`` come from
    the embedding model's tokenizer (see :class:`knowledge.embedder.Embedder`)."""

    def __init__(
        self,
        count: Callable[[list[str]], list[int]],
        windows: Callable[[str, int, int], list[str]],
        chunk_tokens: int = 250,
        overlap: int = 32,
    ) -> None:
        if overlap >= chunk_tokens:
            raise ValueError("overlap must be smaller than the chunk size")
        self.count = count
        self.windows = windows
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def chunk(self, sections: Sequence[Section]) -> list[Chunk]:
        out: list[Chunk] = []
        for section in sections:
            texts = [section.text.strip()] if section.atomic else self._split(section.text)
            for text in texts:
                out.append(
                    Chunk(
                        text,
                        list(section.headings),
                        len(out),
                        checksum(text, section.headings),
                        dict(section.meta),
                    )
                )
        return out

    def _units(self, text: str) -> list[str]:
        units: list[str] = []
        for para in _PARAGRAPH.split(text.strip()):
            para = para.strip()
            if para:
                units.extend(sentences(para, lines=False, numbers=True))
                units.append("\n\n")  # paragraph boundary marker
        return units[:-1] if units else units

    def _split(self, text: str) -> list[str]:
        if not text.strip():
            return []
        units = self._units(text)
        sizes = self.count([u for u in units if u != "\n\n"])
        it = iter(sizes)
        measured = [(u, 0 if u == "\n\n" else next(it)) for u in units]
        # Sentences longer than a chunk become token windows.
        pieces: list[tuple[str, int]] = []
        for unit, size in measured:
            if size > self.chunk_tokens:
                for window in self.windows(unit, self.chunk_tokens, self.overlap):
                    pieces.append((window, self.chunk_tokens))
            else:
                pieces.append((unit, size))
        chunks: list[str] = []
        current: list[tuple[str, int]] = []
        total = 0
        for unit, size in pieces:
            if unit == "\n\n":
                if current:
                    current.append((unit, 0))
                continue
            if current and total + size > self.chunk_tokens:
                chunks.append(_join(current))
                # Carry whole trailing sentences worth at most `overlap` tokens.
                carried: list[tuple[str, int]] = []
                carried_total = 0
                for prev, prev_size in reversed(current):
                    if prev == "\n\n":
                        continue
                    if carried_total + prev_size > self.overlap:
                        break
                    carried.insert(0, (prev, prev_size))
                    carried_total += prev_size
                current, total = carried, carried_total
            current.append((unit, size))
            total += size
        if current and any(u != "\n\n" for u, _ in current):
            chunks.append(_join(current))
        return chunks


def _join(units: list[tuple[str, int]]) -> str:
    out: list[str] = []
    for unit, _ in units:
        if unit == "\n\n":
            if out and out[-1] != "\n\n":
                out.append("\n\n")
        else:
            if out and out[-1] != "\n\n":
                out.append(" ")
            out.append(unit)
    while out and out[-1] in ("\n\n", " "):
        out.pop()
    return "".join(out)
