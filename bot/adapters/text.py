"""Splitting replies under a platform's message limit (Telegram 4,096, Discord 2,000 characters).

Cuts fall at the most natural boundary available — paragraph, line, sentence, word — so a long
answer reads as consecutive messages rather than text chopped mid-word. Markdown code fences
(Discord renders them) are closed at a cut and reopened in the next piece, so a split never
turns the rest of a reply into code.
"""

from __future__ import annotations

import re

from bot.text import SENTENCE_BREAK

# Between paragraphs, lines, sentences (the rule replies and quotes use), words.
_BOUNDARIES = (r"\n\s*\n", r"\n", SENTENCE_BREAK.pattern, r"\s")
_FENCE = re.compile(r"^```(\S*)", re.M)


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at the most natural boundary available."""
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = -1
        for pattern in _BOUNDARIES:
            matches = list(re.finditer(pattern, window))
            if matches and matches[-1].start() > limit // 3:
                cut = matches[-1].start()
                break
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def split_markdown(text: str, limit: int) -> list[str]:
    """:func:`split_text`, keeping ``` fences balanced in every piece."""
    pieces = split_text(text, max(limit - 32, 1))  # room to close and reopen a fence
    out: list[str] = []
    open_lang: str | None = None
    for piece in pieces:
        if open_lang is not None:
            piece = f"```{open_lang}\n{piece}"
        fences = _FENCE.findall(piece)
        # Fences alternate open/close: an odd count leaves the last one open at the cut.
        open_lang = fences[-1][:16] if len(fences) % 2 else None
        out.append(piece + "\n```" if open_lang is not None else piece)
    return out
