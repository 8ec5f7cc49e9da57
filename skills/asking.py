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
(tests/data/off_corpus_heldout.txt, tests/data/chit_chat_heldout.txt, and
tests/data/off_corpus_unseen.txt, written later; see tests/test_skills.py and docs/skills.md
for the figures).
"""

from __future__ import annotations

import re
from typing import Literal

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
    r"^(?:(?:(?:hey|hi|hiya|hello|howdy|good (?:morning|afternoon|evening|day)"
    r"|bonjour|bonsoir|salut|hola|buenos d[ií]as|buenas|ciao|hallo|guten (?:tag|morgen)|ol[aá])"
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
    r"|what can (?:you|u) (?:do|help)|what do (?:you|u) (?:do|think|like|prefer|mean|reckon|feel)"
    r"|how do (?:you|u) (?:feel|like)|do (?:you|u) (?:like|love|enjoy|want|think|feel|remember"
    r"|have feelings|dream|ever)|are (?:you|u) (?:ok|okay|there|a bot|real|human|alive|sure"
    r"|kidding|serious|still there|an? (?:real |actual )?(?:person|human|robot|bot|ai|machine))"
    r"|can (?:you|u) (?:help|hear|see)|will (?:you|u) be my"
    r"|(?:would|will) (?:you|u) (?:like|rather)|what would (?:you|u)|where (?:are|r) (?:you|u) from"
    r"|how old (?:are|r) (?:you|u)|is (?:it|that) (?:ok|okay|fine|alright)|isn't it|right\b"
    r"|what (?:about|now|else|next)\b|why not\b|how come\b|why (?:so|is that)\b|really\b"
    r"|what do i do\b|comment (?:[çc]a va|vas-tu|allez-vous)|[çc]a va\b|qu[ée] tal|c[oó]mo est[aá]s"
    r"|come stai|wie geht"
    r"|what (?:a|an)\b)",
    re.I,
)

#: Requests to make something up, which is not stating facts: jokes, poems, stories, names.
_CREATIVE = re.compile(
    r"\b(?:joke|jokes|poem|poems|haiku|limerick|story|stories|song|lyrics|riddle|pun|puns|rhyme"
    r"|compliment|pep talk|cheer me up|make me (?:laugh|smile)|motivat\w*|roleplay|pretend"
    r"|verses?|sonnet|lines? (?:about|on|for))\b",
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
#: Asking for advice, a suggestion or how to do something: answered (with a hedge when no
#: passage backs it), because general advice is what a chat bot is for — unlike a question
#: of fact, which the model would answer with invented specifics.
_ADVICE = re.compile(
    r"^(?:how (?:do|can|should|could|would|might) (?:i|we|one)\b|how to\b|what should (?:i|we)"
    r"|should (?:i|we)\b|which (?:one )?should (?:i|we)\b|where (?:can|should|could) (?:i|we)\b"
    r"|what(?:'s| is| are| would be)(?: a| an| some| the)? (?:good|nice|fun|easy|quick|best"
    r"|better|healthy|cheap|simple) (?:way|ways|idea|ideas|tip|tips|thing|things|place|places"
    r"|name|names|book|books|movie|movies|film|films|show|shows|recipe|recipes|gift|gifts|game"
    r"|games|habit|habits|routine|exercise|exercises|dinner|lunch|breakfast|meal|meals|snack"
    r"|snacks|dish|dishes|dessert)\b|what are some\b"
    r"|any (?:ideas|tips|advice|suggestions|recommendations)\b"
    r"|(?:can|could|would|will) (?:you|u) (?:give|suggest|recommend|help)\b"
    r"|(?:give me|got any|i need) (?:a |an |some )?(?:\w+ )?(?:tip|tips|idea|ideas|advice"
    r"|suggestion)"
    r"|tips? (?:for|on)\b|ideas? for\b|recommend|suggest"
    r"|is it (?:ok|okay|wise|worth|a good idea|better|best)\b"
    # "coffee or tea in the morning?": a choice to weigh in on, not a fact to state
    r"|\w+ or \w+\b(?!.*\b(?:which|what|who|when|where)\b))",
    re.I,
)
#: "I have an interview tomorrow, any advice?": the ask comes after the situation.
#: "my kitchen sink is clogged, what do I do": a situation, then a plea for what to do.
_ADVICE_AFTER = re.compile(
    r"\b(?:(?:any|some) (?:ideas|tips|advice|suggestions|recommendations|thoughts)"
    r"|(?:what|how) (?:do|should|can|could) (?:i|we) (?:do|fix|solve|handle) ?(?:it|this|that)?"
    r")\W*$",
    re.I,
)
_REQUEST_WORDS = re.compile(r"\b(?:recommend|recommendation|suggest|suggestion)\b", re.I)


Kind = Literal["chat", "advice", "fact"]


def kind_of(text: str) -> Kind:
    """``fact`` when any sentence asks a question of fact, else ``advice`` when one asks for
    advice or a suggestion, else ``chat``.

    Sentence by sentence: "Hi there! How are you today?" greets and asks after the bot;
    "Thanks! And who wrote Hamlet?" asks.
    """
    kinds = {_kind(s) for s in sentences(" ".join(text.split())[:2000])}
    return "fact" if "fact" in kinds else "advice" if "advice" in kinds else "chat"


def _kind(text: str) -> Kind:
    t = text.strip()
    if not t:
        return "chat"
    t = re.sub(r"^[@/]\S+\s*", "", t)  # "@bot what is…"
    if _CREATIVE.search(t):
        return "chat"
    t = _GREETING.sub("", t, count=1)
    core = _WRAPPER.sub("", t, count=1).strip(" ,:;-")
    wrapped = core != t
    core_l = core.lower()
    if not core_l:
        return "chat"
    if _PERSONAL.match(core_l) and not wrapped:
        return "chat"
    if _ADVICE.match(core_l) or _ADVICE_AFTER.search(core_l):
        return "advice"
    if len(core_l.split()) < 2 and not wrapped:  # "what?", "why?": about the last reply
        return "chat"
    asks = (
        _QUESTION.match(core_l)
        or _IMPERATIVE.match(core_l)
        or (wrapped and len(core_l.split()) >= 2)  # "do you know the capital of Peru"
        # A statement that ends in a question mark ("the boiling point of ethanol?") asks
        # too, unless it is a short social one ("you ok?", "right?").
        or (t.endswith("?") and len(core_l.split()) >= 4)
    )
    if asks:
        return "fact"
    return "advice" if _REQUEST_WORDS.search(core_l) else "chat"
