"""The built-in safety reply filter: no abusive output, no leaked secrets or personal data.

Applies to model-generated replies by default (``scope = "generated"``): quoted knowledge and
the bot's own notices are the operator's text, and a company phone number in a FAQ answer is
not a leak — nor is it when the model repeats it from the passages it was given
(``Reply.grounded_in``). Secrets are redacted whatever wrote them. What was done is recorded
in the reply's metadata (``safety``), so the log shows it and the trainers drop flagged replies.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel

from bot import Context, Message, Reply, hookimpl
from bot.privacy import PII, REDACTED, SECRETS, redact

__all__ = ["PII", "REDACTED", "SECRETS", "redact"]


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
            reply.text,
            pii=cfg.redact_pii and in_scope,
            secrets=cfg.redact_secrets,
            published=reply.grounded_in,
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
