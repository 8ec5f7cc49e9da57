"""Logging set-up that keeps secrets out of every log line.

Tokens leak into logs through exception messages and URLs (Telegram puts the bot token in every
API URL), so a filter scrubs the configured secrets and anything shaped like a bot token from
each record, whoever emitted it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

# Telegram bot tokens ("123456:AA…") and Discord bot tokens (three base64url parts).
_TOKEN_PATTERNS = [
    re.compile(r"(?<![0-9])\d{6,12}:[A-Za-z0-9_-]{30,}"),
    re.compile(r"\b[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,}\b"),
]
MASK = "**********"


class SecretFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _TOKEN_PATTERNS:
            text = pattern.sub(MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self.scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> SecretFilter:
    """Configure the root logger (stderr) with secret scrubbing on every handler."""
    root = logging.getLogger()
    secret_filter = SecretFilter(secrets)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
            handler.removeFilter(old)
        handler.addFilter(secret_filter)
    root.setLevel(level)
    return secret_filter
