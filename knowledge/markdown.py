"""Markdown into clean sections, through markdown-it-py (CommonMark, with tables).

A parser rather than line regexes: setext headings (``Title`` over ``=====``) are headings,
a ``#`` inside a code fence is code, links keep their text and lose their URL, inline HTML is
dropped, code blocks stay fenced as code.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.token import Token

_TAG = re.compile(r"<[^>]+>")


def _inline(token: Token) -> str:
    out = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append(" ")
        elif child.type == "image":
            out.append(child.content)  # its alt text
        elif child.type == "html_inline":
            continue
    return " ".join("".join(out).split())


def slug(title: str) -> str:
    """The anchor GitHub and most Markdown sites give a heading: "Debug Mode!" → ``debug-mode``."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.strip().replace(" ", "-")


def parse(source: str, fallback_title: str) -> list[tuple[list[str], str, str]]:
    """``(heading trail, text, anchor)`` per section, in document order."""
    tokens = MarkdownIt("commonmark").enable("table").parse(source)
    out: list[tuple[list[str], str, str]] = []
    trail: list[str] = []
    anchor = ""
    seen: dict[str, int] = {}
    blocks: list[str] = []
    stack: list[str] = []  # open lists: "-" or the next number
    row: list[str] = []

    def flush() -> None:
        text = "\n\n".join(b for b in blocks if b.strip()).strip()
        if text:
            out.append((list(trail) or [fallback_title], text, anchor))
        blocks.clear()

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.type == "heading_open":
            flush()
            level = int(tok.tag[1])
            title = _inline(tokens[i + 1])
            trail[:] = [*trail[: level - 1], title]
            base = slug(title)
            anchor = base if base not in seen else f"{base}-{seen[base]}"  # GitHub's repeats
            seen[base] = seen.get(base, 0) + 1
            i += 3
            continue
        if tok.type in ("bullet_list_open", "ordered_list_open"):
            stack.append("-" if tok.type == "bullet_list_open" else "1")
        elif tok.type in ("bullet_list_close", "ordered_list_close"):
            stack.pop()
        elif tok.type == "inline" and tokens[i - 1].type == "paragraph_open":
            text = _inline(tok)
            if stack and tokens[i - 2].type == "list_item_open":
                mark = stack[-1]
                if mark != "-":
                    stack[-1] = str(int(mark) + 1)
                    mark += "."
                text = "  " * (len(stack) - 1) + f"{mark} {text}"
            blocks.append(text)
        elif tok.type in ("fence", "code_block"):
            blocks.append("```\n" + tok.content.rstrip() + "\n```")
        elif tok.type == "html_block":
            text = " ".join(_TAG.sub(" ", tok.content).split())
            if text:
                blocks.append(text)
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and tokens[i - 1].type in ("th_open", "td_open"):
            row.append(_inline(tok))
        elif tok.type == "tr_close":
            blocks.append(" | ".join(row))
        i += 1
    flush()
    return out
