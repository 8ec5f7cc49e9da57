"""Logging set-up that keeps secrets out of every log line.

Tokens leak into logs through exception messages and URLs (Telegram puts the bot token in every
API URL), so a filter scrubs the configured secrets and anything shaped like a bot token from
each record, whoever emitted it.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STDERR = "chinwag-stderr"
_FILE = "chinwag-file"


def setup_logging(
    level: str = "INFO", secrets: Iterable[str] = (), *, log_file: Path | None = None
) -> SecretFilter:
    """Configure the root logger with secret scrubbing on every handler.

    Log lines go to stderr — never stdout, which carries replies when the console chat is
    piped — or to ``log_file`` instead (an interactive chat must not have log lines written
    over its prompt; see :func:`log_to_file`).
    """
    root = logging.getLogger()
    secret_filter = SecretFilter(secrets)
    if log_file is not None:
        log_to_file(log_file)
    elif not root.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.set_name(_STDERR)
        stream.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(stream)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
            handler.removeFilter(old)
        handler.addFilter(secret_filter)
    root.setLevel(level)
    return secret_filter


def log_to_file(path: Path) -> Path:
    """Send the log to ``path`` (rotated at 10 MB, 3 kept) instead of stderr; returns it."""
    root = logging.getLogger()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    filters: list[Any] = []  # Filter objects or callables, as logging allows
    for handler in list(root.handlers):
        if handler.get_name() in (_STDERR, _FILE):
            filters.extend(handler.filters)
            root.removeHandler(handler)
            handler.close()
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=10_000_000, backupCount=3, encoding="utf-8"
    )
    handler.set_name(_FILE)
    handler.setFormatter(logging.Formatter(FORMAT))
    for f in filters:
        handler.addFilter(f)
    root.addHandler(handler)
    quiet_libraries()
    return path


def quiet_libraries() -> None:
    """Libraries that write to the terminal themselves — tqdm bars ("Loading weights …",
    "Converting … GGUF tensors"), transformers' own stderr handler — would write over an
    interactive prompt or through a command's own progress bars; chinwag shows its own.
    Call it before the libraries are imported (tqdm reads its settings at import)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 takes defaults from TQDM_*
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()  # its records reach our file handler instead
    hf_logging.enable_propagation()
