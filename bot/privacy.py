"""Finding secrets and personal data in text, for every place that must not keep them.

The safety reply filter redacts them from what the bot says; the trainers redact them from
every example before a dataset touches disk. One implementation, so "redacted" means the same
thing in the log, in replies and in training data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REDACTED = "[redacted]"

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
    # An opening parenthesis belongs to the number only around an area code: "(555) 123-4567".
    "phone": re.compile(r"(?<![\w+])(?:\+|\((?=\d{1,4}\)))?\d[\d ().-]{7,}\d\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"),
}


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
    r"|(?:19|20)\d{2}\s*[-–]\s*(?:19|20)\d{2}"
)


def _phone_like(value: str) -> bool:
    """8–15 digits that are not a date, a span of years or an amount ("2024-10-01",
    "2011-2024", "25,000-50,000"), nor a number with an aside after it ("BBR 29 (2024-2026)":
    a parenthesis that opens inside the match and does not close there)."""
    digits = re.sub(r"\D", "", value)
    if value.rfind("(") > value.rfind(")"):
        return False
    return 8 <= len(digits) <= 15 and not _DATE_OR_RANGE.fullmatch(value.strip())


def redact(
    text: str, *, pii: bool = True, secrets: bool = True, published: Sequence[str] = ()
) -> tuple[str, list[str]]:
    """Replace secrets and personal data in ``text``; returns the text and what was found.

    Personal data that appears word for word in ``published`` (the operator's own text the
    reply quotes) is kept; secrets never are.
    """
    found: list[str] = []

    def sub(kind: str, pattern: re.Pattern[str], value: str, check=None) -> str:
        def repl(m: re.Match[str]) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            if kind in PII and any(m.group(0) in source for source in published):
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
