"""The built-in safety reply filter: no abusive output, no leaked secrets or personal data.

Applies to model-generated replies by default (``scope = "generated"``): quoted knowledge and
the bot's own notices are the operator's text, and a company phone number in a FAQ answer is
not a leak. Secrets are redacted whatever wrote them. What was done is recorded in the reply's
metadata (``safety``), so the log shows it and the trainers drop flagged replies.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel

from bot import Context, Message, Reply, hookimpl

REDACTED = "[redacted]"


class SafetyConfig(BaseModel):
    model_config = {"extra": "forbid"}

    enabled: bool = True
    scope: Literal["generated", "all"] = "generated"
    redact_pii: bool = True
    redact_secrets: bool = True
    block_abuse: bool = True
    #: Extra words or phrases that make a reply abusive (case-insensitive, whole words).
    extra_blocked: list[str] = []
    blocked_reply: str = "I'd rather not put it that way. Could you ask me differently?"


# Secrets: provider key formats plus anything that looks like a bearer token or a URL with
# credentials. Kept specific: false positives here rewrite innocent replies.
SECRETS = {
    "url_credentials": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s]+", re.I),
    "telegram_token": re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b"),
    "openai_key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "github_token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "slack_token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "aws_key": re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b"),
    "private_key": re.compile(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
    ),
    "bearer": re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{20,}", re.I),
}
PII = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    "phone": re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"),
}
# A short list of slurs and abuse aimed at people; operators extend it in the config.
ABUSE = [
    "fuck you",
    "fuck off",
    "motherfucker",
    "cunt",
    "retard",
    "retarded",
    "faggot",
    "nigger",
    "kill yourself",
    "kys",
    "go die",
    "piece of shit",
    "stupid bitch",
    "dumb bitch",
    "whore",
    "slut",
    "tranny",
    "spic",
    "kike",
    "chink",
]


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


_DATE_OR_RANGE = re.compile(
    r"\d{4}-\d{2}-\d{2}|\d{1,3}(?:[ ,.]\d{3})+(?:\s*-\s*\d{1,3}(?:[ ,.]\d{3})+)?"
)


def _phone_like(value: str) -> bool:
    """8–15 digits that are not a date or an amount ("2024-10-01", "25,000-50,000")."""
    digits = re.sub(r"\D", "", value)
    return 8 <= len(digits) <= 15 and not _DATE_OR_RANGE.fullmatch(value.strip())


def redact(text: str, *, pii: bool = True, secrets: bool = True) -> tuple[str, list[str]]:
    """Replace secrets and personal data in ``text``; returns the text and what was found."""
    found: list[str] = []

    def sub(kind: str, pattern: re.Pattern[str], value: str, check=None) -> str:
        def repl(m: re.Match[str]) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            found.append(kind)
            return REDACTED

        return pattern.sub(repl, value)

    if secrets:
        for kind, pattern in SECRETS.items():
            text = sub(kind, pattern, text)
    if pii:
        text = sub("email", PII["email"], text)
        text = sub("card", PII["card"], text, lambda v: _luhn(re.sub(r"\D", "", v)))
        text = sub("iban", PII["iban"], text)
        text = sub("phone", PII["phone"], text, _phone_like)
    return text, found


class SafetyFilter:
    name = "safety"

    def __init__(self) -> None:
        self._patterns: dict[tuple[str, ...], re.Pattern[str]] = {}

    def _abuse(self, extra: list[str]) -> re.Pattern[str]:
        key = tuple(extra)
        pattern = self._patterns.get(key)
        if pattern is None:
            words = sorted({*ABUSE, *(w.lower() for w in extra)}, key=len, reverse=True)
            pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.I)
            self._patterns[key] = pattern
        return pattern

    async def filter(self, reply: Reply, message: Message, ctx: Context) -> Reply | None:
        cfg = config_of(ctx.bot)
        if not cfg.enabled:
            return reply
        generated = reply.model is not None
        record: dict[str, Any] = {}
        in_scope = generated or cfg.scope == "all"
        if cfg.block_abuse and in_scope and self._abuse(cfg.extra_blocked).search(reply.text):
            reply.metadata["safety"] = {"blocked": "abuse", "flagged": True}
            reply.metadata["withheld_text"] = reply.text
            reply.text = cfg.blocked_reply
            reply.rateable = False
            return reply
        text, found = redact(
            reply.text, pii=cfg.redact_pii and in_scope, secrets=cfg.redact_secrets
        )
        if found:
            record["redacted"] = sorted(set(found))
            record["flagged"] = True
            reply.text = text
        if record:
            reply.metadata["safety"] = record
        return reply


def config_of(bot: Any) -> SafetyConfig:
    cached = bot.services.get("safety.config")
    if cached is None:
        from pydantic import ValidationError

        from bot.config import ConfigError, format_validation_error

        section = bot.settings.skills.get("safety")
        try:
            options = section.options() if section is not None else {}
            if section is not None:
                options["enabled"] = section.enabled
            cached = SafetyConfig(**options)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, "[skills.safety]", prefix="skills.safety")
            ) from None
        bot.services["safety.config"] = cached
    return cached


@hookimpl
def startup(bot):
    config_of(bot)  # a broken [skills.safety] section stops the start with a clear error


@hookimpl
def register_reply_filters(register):
    register(SafetyFilter())
