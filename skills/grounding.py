"""Text helpers the model-backed skills share: is a generated answer supported by the passages
it was given, which passage sentences best answer a question, and how to keep instructions
hidden in documents from steering the model.

Lexical on purpose: it must run in microseconds on every reply, and for "did the model invent
this?" content-word overlap with the sources is a strong, explainable signal (the same measure
``chinwag eval`` reports as groundedness).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from bot.text import STOPWORDS, content_words, sentences, support, words

__all__ = ["STOPWORDS", "content_words", "sentences", "support", "words"]

_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
#: Numbers that order or point rather than state: a list's "1." or "2)" starting a line, and
#: the "[2]" a model writes to cite the second passage.
_MARKER = re.compile(r"^[ \t]*\d{1,2}[.)](?=\s)|\[\d{1,2}\]", re.M)


def numbers_kept(answer: str, passages: Iterable[str]) -> bool:
    """Whether every answer sentence's numbers appear, in order and adjacent, in one passage
    sentence.

    Word overlap cannot see a recombined fact: from "open 9 am to 8 pm on weekdays and 10 am to
    4 pm on Saturdays" a small model writes "open 9 am to 4 pm on Saturdays" — every word
    supported, the fact wrong. Numbers are where that does harm (hours, prices, limits).
    """
    runs = [_NUMBER.findall(sentence) for p in passages for sentence in sentences(p)]
    # "1. Snow guards … 2. A ladder … 3. BBR ch. 8:2 …" states one number, 8:2; the list's
    # own numbering is not a fact to find in the passage (it failed whole-FAQ answers).
    for sentence in sentences(_MARKER.sub(" ", answer)):
        said = _NUMBER.findall(sentence)
        if not said:
            continue
        n = len(said)
        if not any(run[i : i + n] == said for run in runs for i in range(len(run) - n + 1)):
            return False
    return True


def _stems(text: str) -> set[str]:
    """``text``'s content words, lightly stemmed ("permits" → "permit"): what the checks compare."""
    return {w.rstrip("s") for w in content_words(text)}


#: Words that deny: "not", "never", "can't", "no" ... (a denial's polarity is the fact).
_NEGATION = re.compile(
    r"\b(?:not|no|never|none|nothing|nobody|neither|nor|cannot)\b|n['’]t\b", re.IGNORECASE
)


def negations_kept(answer: str, question: str, passages: Iterable[str]) -> bool:
    """Whether every answer sentence that denies something denies it where the passages do.

    Word overlap is blind to polarity: "Flask does not support async views" shares every word
    with "Flask supports async views", and a small model writes such denials when it does not
    know ("The answer to your question is no.", "JSON_SORT_KEYS ... This is not a thing.").
    So a denying sentence must have, among the passage sentences sharing the most of its
    content words (beyond the question's), one that denies too; one sharing no word with any
    passage denies something nobody said. Only this direction is checked: a faithful answer
    often affirms what a denying sentence leads to ("if you don't want X, use Y" → "use Y"),
    which overlap cannot tell from a dropped "not".
    """
    asked = _stems(question)
    candidates = [(_stems(s), bool(_NEGATION.search(s))) for p in passages for s in sentences(p)]
    for sentence in sentences(answer):
        if not _NEGATION.search(sentence):
            continue
        said = _stems(sentence)
        said = (said - asked) or said
        best, denies = 0, False
        for words_, negated in candidates:
            shared = len(said & words_)
            if shared > best:
                best, denies = shared, negated
            elif shared == best and shared:
                denies = denies or negated
        if not (best and denies):
            return False
    return True


def new_facts(answer: str, question: str, passages: Iterable[str]) -> int:
    """Content words the answer takes from the passages beyond what the question said.

    "ROT is only available to those eligible for it" is fully supported by a passage about
    ROT eligibility and says nothing; counting what it adds tells the two apart.
    """
    asked = _stems(question)
    known: set[str] = set()
    for p in passages:
        known.update(_stems(faq_answer(p)))
    return len(_stems(answer) & known - asked)


def faq_answer(text: str) -> str:
    """The answer part of a FAQ chunk (``Q: … A: …``); other chunks unchanged."""
    m = re.search(r"(?:^|\n)A:\s*(.*)", text, re.S)
    return m.group(1).strip() if m else text.strip()


def faq_question(text: str) -> str | None:
    m = re.match(r"\s*Q:\s*(.*?)\s*(?:\nA:|$)", text, re.S)
    return m.group(1).strip() if m else None


def best_sentences(
    question: str, text: str, limit: int = 2, similarity: Sequence[float] | None = None
) -> list[str]:
    """The sentences of ``text`` that best answer ``question``, in their original order.

    With ``similarity`` (the question's cosine to each of ``sentences(text)``, from the
    embedder) sentences rank by meaning, content-word overlap breaking ties; without it, by
    overlap alone with a bonus for the lead sentence (answers usually lead with the key fact).
    Documentation often asks the question itself — "But how do you specify the maximum file
    size?" — and answers it in the next sentence: a sentence ending in "?" is never quoted,
    and lends its score to the one after it.
    """
    found = sentences(text)
    if len(found) <= limit and not any(f.rstrip().endswith("?") for f in found):
        return found
    q = set(content_words(question))
    qs = {w.rstrip("s") for w in q}

    def overlap(i: int) -> float:
        cw = content_words(found[i])
        return sum(1 for w in set(cw) if w in q or w.rstrip("s") in qs)

    if similarity is not None and len(similarity) == len(found):
        scores = [float(similarity[i]) + 0.02 * overlap(i) for i in range(len(found))]
    else:
        scores = [overlap(i) + (0.75 if i == 0 else 0.0) for i in range(len(found))]
    scores = [sc - i * 0.001 for i, sc in enumerate(scores)]
    for i, sentence in enumerate(found):
        if sentence.rstrip().endswith("?"):
            if i + 1 < len(found):
                scores[i + 1] = max(scores[i + 1], scores[i])
            scores[i] = float("-inf")
    ranked = sorted(range(len(found)), key=scores.__getitem__, reverse=True)
    chosen = [i for i in ranked if scores[i] != float("-inf")][:limit]
    return [found[i] for i in sorted(chosen)]


_CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)(?:^```[ \t]*$|\Z)", re.S | re.M)
#: Lines of a code block a quote shows; a longer one ends in "…" (the citation has the rest).
QUOTE_CODE_LINES = 8


def passage_parts(text: str) -> list[tuple[str, bool]]:
    """``text`` as its sentences and fenced code blocks, in order: ``(text, is_code)``.

    Loaders keep code as fenced blocks (knowledge/rst.py, markdown.py); split into "sentences"
    line by line, a block read as prose — "It replaces the Flask.run() method in most cases.
    $ flask --app hello run * Serving Flask app" — and a quote could be nothing but code lines.
    """
    parts: list[tuple[str, bool]] = []
    at = 0
    for m in _CODE_BLOCK.finditer(text):
        parts += [(s, False) for s in sentences(text[at : m.start()])]
        code = m.group(1).strip("\n")
        if code.strip():
            parts.append((code, True))
        at = m.end()
    parts += [(s, False) for s in sentences(text[at:])]
    return parts


def render_quote(parts: Sequence[tuple[str, bool]]) -> str:
    """Quoted sentences run on as prose; a code block stands on its own lines, fenced."""
    out = ""
    for text, is_code in parts:
        if is_code:
            lines = text.splitlines()
            if len(lines) > QUOTE_CODE_LINES:
                lines = [*lines[:QUOTE_CODE_LINES], "…"]
            block = "\n".join(lines)
            out = f"{out.rstrip()}\n```\n{block}\n```\n"
        else:
            out += text if not out or out.endswith("\n") else " " + text
    return out.strip()


def best_quote(
    question: str,
    parts: Sequence[tuple[str, bool]],
    limit: int,
    similarity: Sequence[float] | None = None,
) -> str:
    """The quote that best answers ``question`` from a passage's ``parts``.

    The ``limit`` best sentences by :func:`best_sentences` (``similarity``: the question's
    cosine to each part, code blocks included); a code block comes along where a chosen
    sentence introduces it ("copy the output of this to your config:") and lends that
    sentence its score — the command is often the answer. Code is quoted alone only when the
    passage has no prose.
    """
    prose = [i for i, (_, is_code) in enumerate(parts) if not is_code]
    if not prose:
        return render_quote(parts[:1])
    sims = list(similarity) if similarity is not None and len(similarity) == len(parts) else None
    ranks = None
    if sims is not None:
        ranks = [max(sims[i], sims[i + 1]) if _introduces(parts, i) else sims[i] for i in prose]
    chosen = best_sentences(question, "\n".join(parts[i][0] for i in prose), limit, ranks)
    picked: list[int] = []
    remaining = list(chosen)
    for i in prose:  # back to positions: the same sentence may occur twice
        if remaining and parts[i][0] == remaining[0]:
            picked.append(i)
            remaining.pop(0)
    # A block right after a chosen sentence comes along when that sentence introduces it, or
    # when it matches the question as well as the quote's weakest sentence does ("For
    # example, the range 0, 5 would return 5…" and then the IntRange code that shows it).
    bar = min(sims[i] for i in picked) if sims is not None and picked else None
    out: list[int] = []
    for i in picked:
        out.append(i)
        if not (i + 1 < len(parts) and parts[i + 1][1]):
            continue
        if _introduces(parts, i) or (sims is not None and bar is not None and sims[i + 1] >= bar):
            out.append(i + 1)
    return render_quote([parts[i] for i in out])


def _introduces(parts: Sequence[tuple[str, bool]], i: int) -> bool:
    """Whether sentence ``i`` leads into the code block after it ("…to your config:")."""
    return i + 1 < len(parts) and parts[i + 1][1] and parts[i][0].endswith(":")


# "A: …", "Answer: …", or the FAQ's own "1. Q: <a question>\nA: …" echoed before the answer.
_ANSWER_LABEL = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:Q:[^\n]*\n\s*)?(?:A|Answer)\s*:\s*", re.I)
# What a small model writes before it copies a passage: "The answer is:\n\n[1] …",
# "Referencing passage 1:\n[2] Q: … A: …", "Reference passages:\n[2] …" — a short line about
# the answer or the passages, ending in a colon, then the passage's number.
_PREAMBLE = re.compile(
    r"^\s*(?:[^\n:]{0,30}\b(?:answers?|passages?)\b[^\n:]{0,12}:[ \t]*\n\s*)?\[\d{1,2}\][ \t]*",
    re.I,
)
# A next question the model goes on to ask itself: "\n\nQuestion: …", "\n2. Q: …".
_NEXT_QUESTION = re.compile(r"\n\s*(?:\d+[.)]\s*)?(?:Q|Question)\s*:", re.I)
# A sentence a token limit cut ends in a word or a comma, not in punctuation or an emoji.
_UNFINISHED = re.compile(r"[\w,;:(\-–]$")


def without_cut_sentence(text: str) -> str:
    """``text`` up to its last whole sentence, layout kept: what to show of a reply its token
    limit cut mid-sentence. "" when no sentence is whole; ``text`` when the last one is."""
    said = sentences(text)
    if not said or not _UNFINISHED.search(said[-1]):
        return text
    return text[: text.rfind(said[-1])].rstrip() if len(said) > 1 else ""


def unique_sentences(text: str) -> tuple[list[str], int]:
    """``text``'s sentences with each repeat dropped (case and punctuation aside), and how
    many were dropped: small models say the same sentence again and again."""
    kept: list[str] = []
    seen: set[str] = set()
    said = sentences(text, reply=True)
    for s in said:
        key = re.sub(r"\W+", " ", s.lower()).strip()
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept, len(said) - len(kept)


def tidy_answer(text: str, *, cut: bool = False) -> tuple[str, list[str]]:
    """A generated answer as the user should read it; returns it and what was done (logged).

    The passages are FAQ entries ("Q: … A: …"), so a small model — and an adapter trained on
    its own liked replies — answers "A: …" and goes on to the next "Question: …"; run out of
    tokens (``cut``), it stops mid-word ("Skatteverket carries out un"). The label goes,
    the invented question goes, a repeated sentence goes, and a cut answer keeps its whole
    sentences only: "" when none is whole, so the caller quotes the passage instead.
    """
    done: list[str] = []
    out = text.strip()
    bare = _PREAMBLE.sub("", out, count=1)
    if bare != out:
        out = bare
        done.append("preamble")
    labelled = _ANSWER_LABEL.sub("", out, count=1)
    if labelled != out:
        out = labelled
        done.append("label")
    if re.match(r"1[.)]\s", out) and not re.search(r"^\s*2[.)]\s", out, re.M):
        out = out[2:].lstrip()  # a list of one: "1. Construction waste handling, …"
        done.append("label")
    m = _NEXT_QUESTION.search(out)
    if m:
        out = out[: m.start()].rstrip()
        done.append("invented_question")
        cut = False  # what is left ended where the model chose to move on
    kept, repeated = unique_sentences(out)
    if repeated:
        out = " ".join(kept)
        done += ["repetition"] * repeated
    if cut and (whole := without_cut_sentence(out)) != out:
        out = whole
        done.append("unfinished_sentence")
    said = sentences(out)
    if len(said) > 1 and said[-1].endswith(":"):
        # "Here's an example:" with no example after it (the QA skill stops the model at a
        # code fence): a sentence that introduces what is not there goes.
        out = out[: out.rfind(said[-1])].rstrip()
        done.append("dangling_introduction")
    return out.strip(), done


_DIRECTIVE = re.compile(
    r"\b(ignore|disregard|forget|override)\b.{0,40}\b(instruction|instructions|prompt|rules|above|previous)\b"
    r"|\byou are now\b|\bact as\b|\bsystem prompt\b|\bnew instructions?\b"
    r"|\b(reply|respond|answer|say)\b.{0,20}\bonly\b.{0,30}\bwith\b",
    re.I,
)


def neutralize_instructions(text: str) -> tuple[str, int]:
    """Drop sentences of a document that address the model ("ignore your instructions…").

    Documents are reference material, never instructions; a small model cannot be trusted to
    tell the difference, so directives are removed before the passage reaches the prompt.
    Returns the cleaned text and how many sentences were dropped.
    """
    lines, dropped = [], 0
    for line in text.split("\n"):  # keep the structure ("Q: …\nA: …", headings)
        said = sentences(line)
        kept = [s for s in said if not _DIRECTIVE.search(s)]
        dropped += len(said) - len(kept)
        if len(kept) == len(said):
            lines.append(line.rstrip())  # untouched, indentation and all (code)
        elif kept:
            lines.append(" ".join(kept))
    return "\n".join(lines).strip(), dropped
