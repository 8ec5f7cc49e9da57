"""Is this message asking the bot for information, or just talking?

A bot that serves people from a knowledge base must not answer a question of fact from the
small model's imagination ("The capital of Mongolia is known as Herat"). Dialogue therefore
declines a request for information that no knowledge passage supports, and chats freely
otherwise: greetings, thanks, feelings, jokes and poems, questions about the bot itself.

The line is drawn by the *form* of the message — interrogatives, "tell me about", "how do I",
"can you explain", "recommend" — because that is what separates "what's the boiling point of
ethanol" from "what a day!" on a one-line chat message, in microseconds, explainably. The
rules were written against tests/data/off_corpus_questions.txt and
tests/data/chit_chat.txt and are measured on held-out sets written separately
(tests/data/off_corpus_heldout.txt, tests/data/chit_chat_heldout.txt; see tests/test_skills.py
and docs/skills.md for the figures).
"""

from __future__ import annotations

import re

from bot.text import sentences

_WH = (
    r"what|whats|what's|who|whom|whose|who's|when|where|where's|which|why|how|hows|how's"
    r"|wat|wht|wut"
)
_AUX = (
    r"is|are|was|were|do|does|did|can|could|will|would|should|shall|has|have|had|may|might"
    r"|must|isn't|aren't|wasn't|doesn't|don't|didn't|can't|won't"
)

#: Ways of asking that wrap the real question: "do you know who…", "can you tell me…".
_GREETING = re.compile(
    r"^(?:(?:(?:hey|hi|hiya|hello|howdy|good (?:morning|afternoon|evening|day))"
    r"(?: there| again| all| everyone| guys| folks)?|ok|okay|so|um+|uh+|quick question|question"
    r"|please|pls|plz|yo)[,!.:]*\s+)+",
    re.I,
)
_WRAPPER = re.compile(
    r"^(?:(?:do|would|did) (?:you|u|ya) (?:happen to )?know"
    r"|(?:can|could|would|will) (?:you|u) (?:please |pls )?(?:tell|show|remind|explain to) me"
    r"|tell me|i (?:want|need|would like) to know|i'd like to know"
    r"|i(?:'m| am) (?:wondering|curious)|i wonder|any idea|idk|no idea|please tell me"
    r"|remind me)\b[,:]?\s*",
    re.I,
)

#: The message is about the conversation or the bot itself, not the world.
_PERSONAL = re.compile(
    r"^(?:how (?:are|r) (?:you|u|ya|things)|how (?:was|is|'s) (?:your|ur)\b"
    r"|how(?:'s| is) it going|how(?:'s| has| have) (?:your|ur) (?:day|week|weekend|morning"
    r"|evening)|how do you do|what(?:'s| is) up|wh?at'?s good"
    r"|sup\b|what(?:'s| is) (?:your|ur) name|who (?:are|r) (?:you|u)|what (?:are|r) (?:you|u)\b"
    r"|what can (?:you|u) do|what do (?:you|u) (?:do|think|like|prefer|mean|reckon|feel)"
    r"|how do (?:you|u) (?:feel|like)|do (?:you|u) (?:like|love|enjoy|want|think|feel|remember"
    r"|have feelings|dream|ever)|are (?:you|u) (?:ok|okay|there|a bot|real|human|alive|sure"
    r"|kidding|serious|still there)|can (?:you|u) (?:help|hear|see)|will (?:you|u) be my"
    r"|(?:would|will) (?:you|u) (?:like|rather)|what would (?:you|u)|where (?:are|r) (?:you|u) from"
    r"|how old (?:are|r) (?:you|u)|is (?:it|that) (?:ok|okay|fine|alright)|isn't it|right\b"
    r"|what (?:about|now|else|next)\b|why not\b|how come\b|why (?:so|is that)\b|really\b"
    r"|what do i do\b|what should i (?:do|say)\b|should i\b|any (?:tips|advice)"
    r"|what (?:a|an)\b)",
    re.I,
)

#: Requests to make something up, which is not stating facts: jokes, poems, stories, names.
_CREATIVE = re.compile(
    r"\b(?:joke|jokes|poem|poems|haiku|limerick|story|stories|song|lyrics|riddle|pun|puns|rhyme"
    r"|compliment|pep talk|cheer me up|make me (?:laugh|smile)|motivat\w*|roleplay|pretend)\b",
    re.I,
)

#: Requests for information that are not phrased as questions.
_IMPERATIVE = re.compile(
    r"^(?:please |pls |plz )?(?:explain|describe|define|summari[sz]e|list|name|give me|show me"
    r"|find|look up|search|tell me (?:about|how|what|who|when|where|why|which|if|whether)"
    r"|recommend|suggest|compare|translate|calculate|convert|what about)\b",
    re.I,
)

_QUESTION = re.compile(
    rf"^(?:{_WH})\b|^(?:{_AUX})\s+\w+|^(?:in|on|at|from|for|by|since|to) "
    rf"(?:what|which|whom|when|how)\b",
    re.I,
)
_REQUEST_WORDS = re.compile(r"\b(?:recommend|recommendation|suggest|suggestion)\b", re.I)


def asks_for_information(text: str) -> bool:
    """Whether ``text`` asks for facts, instructions or recommendations about the world.

    Sentence by sentence: "Hi there! How are you today?" greets and asks after the bot;
    "Thanks! And who wrote Hamlet?" asks.
    """
    return any(_asks(s) for s in sentences(" ".join(text.split())[:2000]))


def _asks(text: str) -> bool:
    t = text.strip()
    if not t:
        return False
    t = re.sub(r"^[@/]\S+\s*", "", t)  # "@bot what is…"
    if _CREATIVE.search(t):
        return False
    t = _GREETING.sub("", t, count=1)
    core = _WRAPPER.sub("", t, count=1).strip(" ,:;-")
    wrapped = core != t
    core_l = core.lower()
    if not core_l:
        return False
    if _PERSONAL.match(core_l) and not wrapped:
        return False
    if len(core_l.split()) < 2 and not wrapped:  # "what?", "why?": about the last reply
        return False
    if _QUESTION.match(core_l) or _IMPERATIVE.match(core_l):
        return True
    if wrapped and len(core_l.split()) >= 2:  # "do you know the capital of Peru"
        return True
    if _REQUEST_WORDS.search(core_l):
        return True
    # A statement that ends in a question mark ("the boiling point of ethanol?") asks too,
    # unless it is a short social one ("you ok?", "right?").
    return t.endswith("?") and len(core_l.split()) >= 4
