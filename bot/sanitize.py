"""Making arbitrary inbound text safe to store, route and echo.

Platforms deliver whatever users type: NULs and other control characters, lone UTF-16
surrogates (which cannot even be encoded as UTF-8 and would fail the database write), megabytes
of pasted text. The core cleans text once, here, so no skill has to.
"""

from __future__ import annotations

import re

# C0 and C1 controls except tab, newline and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def to_text(value: object) -> str:
    """Platform payloads should be ``str``; bytes are decoded leniently instead of crashing."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def clean_text(text: str, max_chars: int) -> tuple[str, int]:
    """Return ``(cleaned, original_length)``; cleaned text is at most ``max_chars`` long."""
    original = len(text)
    if original > max_chars:
        text = text[:max_chars]
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return text, original
