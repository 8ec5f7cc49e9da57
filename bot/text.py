"""Lexical text measures shared by skills and evaluation: words, sentences, and groundedness.

Lexical on purpose: they run in microseconds on every reply, and for "did the model invent
this?" content-word overlap with the sources is a strong, explainable signal. The QA skill's
support check and ``chinwag eval``'s groundedness are this one function, so the number an
operator reads is the number the skill acted on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"[^\W_]+(?:[.,'’-][^\W_]+)*", re.UNICODE)
# The one sentence rule (replies, quotes, chunking, message splitting, training data): a
# sentence ends at . ! ? … followed by a capital, perhaps after a quote or bracket — so
# "e.g. a" and "ch. 8:2" stay whole; a digit may start one only where asked ("6 kap. 7 §" in
# a reply stays whole, "Step 1. 2. Unpack" in a document splits).
_BREAK = r"(?<=[.!?…])\s+(?=[\"'“‘(\[]?[A-ZÀ-ÖØ-Þ{digits}])"
SENTENCE_BREAK = re.compile(_BREAK.format(digits=""))
_BREAKS = {
    (False, False): SENTENCE_BREAK,
    (True, False): re.compile(SENTENCE_BREAK.pattern + r"|\n+"),
    (False, True): re.compile(_BREAK.format(digits="0-9")),
    (True, True): re.compile(_BREAK.format(digits="0-9") + r"|\n+"),
}
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    also may might must shall yes ok okay one get got like well really""".split()
)


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 rating``, ``2 ratings``: counts users read."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> list[str]:
    """Words that carry meaning: no stop words, and numbers always count."""
    return [w for w in words(text) if w not in STOPWORDS and (len(w) > 2 or w[0].isdigit())]


#: In a model's reply ``!``, ``?`` and ``…`` end a sentence whatever follows: a small model
#: answering a user who types in lower case writes in lower case too ("hello there! hello
#: there! you can talk to me anytime!"), and its repeats went unseen. (A ``.`` still needs a
#: capital after it: "e.g. a".)
_REPLY_BREAK = re.compile(r"(?<=[!?…])\s+(?=\S)|" + _BREAKS[True, False].pattern)


def sentences(
    text: str, *, lines: bool = True, numbers: bool = False, reply: bool = False
) -> list[str]:
    """``text``'s sentences, stripped. ``lines``: a line break ends one too (replies and
    quotes; not running prose a loader has already joined); ``numbers``: one may start with a
    digit (documents' numbered steps); ``reply``: a model's reply, where ``!``, ``?`` and
    ``…`` end one before any letter (with ``lines``, not ``numbers``)."""
    pattern = _REPLY_BREAK if reply else _BREAKS[lines, numbers]
    return [s.strip() for s in pattern.split(text) if s and s.strip()]


def support(answer: str, passages: Iterable[str]) -> float:
    """Share of the answer's content words found in the passages (1.0 = fully grounded).

    An answer with no content words (empty, "Yes.") is unsupported: it says nothing checkable.
    """
    said = content_words(answer)
    if not said:
        return 0.0
    known: set[str] = set()
    for p in passages:
        known.update(content_words(p))
    # Light stemming so "permits" is supported by "permit".
    stems = {w.rstrip("s") for w in known}
    hits = sum(1 for w in said if w in known or w.rstrip("s") in stems)
    return hits / len(said)
