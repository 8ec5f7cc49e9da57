"""Grounded question answering from the knowledge index (``/ask``, and questions by score).

The answer must come from the passages: the model (``qa`` adapter, or the base model until one
is trained) writes it from the retrieved passages, and when what it wrote is not supported by
them (content-word overlap below ``min_support``) the skill quotes the passage sentences that
best answer the question instead. An answer an operator taught for this very question
(``/correct``, knowledge/taught.py) is given as they wrote it. Every answer cites its sources;
when nothing relevant is found the skill says so rather than guess.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bot import (
    Command,
    Context,
    Match,
    Message,
    ModelError,
    Reply,
    RuntimeBusy,
    ShuttingDown,
    Skill,
    Source,
    hookimpl,
)
from skills.asking import kind_of
from skills.grounding import (
    best_quote,
    faq_answer,
    faq_question,
    negations_kept,
    neutralize_instructions,
    new_facts,
    numbers_kept,
    passage_parts,
    support,
    tidy_answer,
)

log = logging.getLogger(__name__)


class QAConfig(BaseModel):
    model_config = {"extra": "forbid"}

    #: Cosine similarity a passage needs to count as an answer source (the knowledge index's
    #: own ``min_score`` is looser). Chosen on the FAQ and the Flask docs, checked on Click's
    #: (docs/skills.md): 0.45 turned away 27 % of answerable documentation questions; at
    #: 0.40, 3 % of off-corpus questions pass it.
    min_score: float = Field(0.40, ge=-1, le=1)
    top_k: int = Field(3, ge=1, le=20)
    #: Cite further passages scoring within this margin of the best one.
    cite_margin: float = Field(0.08, ge=0, le=1)
    max_sources: int = Field(2, ge=1, le=10)
    #: Let the model write the answer; off: always quote the best sentences (fast, no model).
    generate: bool = True
    adapter: str = "qa"
    max_new_tokens: int = Field(64, ge=8, le=1024)
    #: A generation slower than this (a busy CPU) is abandoned for the quoted answer.
    generate_timeout_s: float = Field(15.0, gt=0)
    #: Share of the generated answer's content words that must appear in the passages.
    min_support: float = Field(0.75, ge=0, le=1)
    #: ...and at least this many content words from the passages that the question lacked
    #: (a supported but empty answer — "X is available to those eligible" — is quoted over).
    min_new_facts: int = Field(3, ge=0)
    #: Sentences a quoted answer takes from the best passage. Measured on each corpus's top
    #: passage (docs/skills.md, 2026-12-04): 2 → 3 put the key fact in the quote for Flask
    #: 0.45 → 0.60, Click (held out) 0.65 → 0.70, FAQ 0.81 → 0.86, at 157 → 222 characters;
    #: answer F1 +0.01, −0.02, +0.11. 4 added length and no fact on the docs.
    quote_sentences: int = Field(3, ge=1, le=10)
    #: An operator's taught answer (knowledge/taught.py) this close to the question is the
    #: answer, word for word — the operator was promised "from now on I answer this with
    #: your correction" — rather than one passage among others for the model to rewrite.
    taught_min_score: float = Field(0.8, ge=-1, le=1)
    #: ... and only when no other passage matches the question better by more than this.
    #: Taught to "How do I apply for the ROT deduction?", an answer scored 0.80 for "Who can
    #: claim the ROT tax deduction?" and took the place of the FAQ's own answer at 0.87
    #: (bench/learning.py, 2026-12-05): a correction answers its question, not its neighbours.
    taught_margin: float = Field(0.02, ge=0, le=1)
    passage_chars: int = Field(600, ge=100)
    #: Re-rank the passages by how well each explains the question: the base model's
    #: likelihood of the question written after the passage (query likelihood, as in
    #: "unsupervised passage re-ranking"). On the Python documentation, held out, the right
    #: page came first for 0.37 of questions by the fused vector/keyword rank and for 0.67
    #: re-ranked (docs/skills.md). Off: the fused rank decides, and no model is asked.
    rerank: bool = True
    #: Passages the search hands to the re-ranking (the best ``top_k`` of them are kept). On
    #: the Python docs the right page came first for 0.47 / 0.57 / 0.67 / 0.67 of questions
    #: re-ranking the top 2 / 3 / 4 / 5; each passage costs a ~0.4 s pass on a 2-core CPU.
    rerank_candidates: int = Field(4, ge=1, le=20)
    #: Re-ranking slower than this (a busy model) is skipped: the fused rank answers.
    rerank_timeout_s: float = Field(4.0, gt=0)
    #: How much the best passage must raise the question's likelihood over no passage at all
    #: (nats per question token) for the skill to answer from it; below, it says it doesn't
    #: know. Questions the documentation answers scored 0.49–1.97 on the Python docs; "is
    #: pluto a planet" against the enum HOWTO's ``Planet`` example scored under 0.15.
    min_relevance: float = Field(0.3)
    #: Ask the model only where its answers pass the checks: when fewer than this share of
    #: its last ``pass_window`` answers (per adapter version) passed, a question is quoted
    #: at once, and only every ``retry_every``-th still asks the model — so a better adapter
    #: is noticed. On the Python docs 2 of 30 answers passed (Click 1 of 19, Flask 11 of 57,
    #: the FAQ 14 of 36), and each failed one cost the user ~3 s of a 2-core CPU before the
    #: quote they got anyway. 0: always ask.
    min_pass_rate: float = Field(0.1, ge=0, le=1)
    pass_window: int = Field(20, ge=2)
    retry_every: int = Field(5, ge=1)


QUESTION_WORDS = frozenset(
    """what who whom whose which when where why how is are am was were do does did can could
    should would will shall may might must has have had isn't aren't don't doesn't didn't can't
    won't wouldn't shouldn't""".split()
)
_ASKING = re.compile(
    r"\b(tell me|explain|i (?:want|need|would like) to know|i wonder|any idea|do you know)\b", re.I
)
#: "what's X", "hows…": a question word with its verb run on (the bare words are above).
_WH_CONTRACTED = re.compile(r"^(?:what|how|where|who|when|why)'?s$")
#: A question tacked on after the subject, as people type lookups: "after_this_request how does
#: it work", "stream_with_context, why do I need it", "TEMPLATES_AUTO_RELOAD what is it for".
_TRAILING_QUESTION = re.compile(
    r"\b(?:(?:what|why|how|when|where|which)\s+(?:is|are|do|does|did|can|should|would|to)\b"
    r"|what for\b|how come\b)",
    re.I,
)
#: Someone who needs to do something, or whose something does not work: a support request,
#: not small talk ("i need to send a really big csv…", "the app won't start").
_NEED = re.compile(
    r"^(?:(?:i|we)(?:'m| am|'re| are)? (?:need|want|would like|'d like|trying|tried|try|have)"
    r" to\b|(?:i|we) (?:can't|cannot|couldn't|don't know how to)\b)"
    r"|\b(?:can't|cannot|won't|doesn't|does not|isn't|not)\s+(?:work|working|start|starting"
    r"|load|loading|open|connect|run|running|find|install)\b",
    re.I,
)
#: Names from code and configuration: UPPER_SNAKE, snake_case, --options, dotted.names, calls().
_CODE_NAME = re.compile(
    r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b|\b[a-z][a-z0-9]*_[a-z0-9_]+\b|(?<!\w)--[a-z][\w-]+"
    r"|\b[a-z_]\w*\.[a-z_]\w*\b|\b\w+\(\)"
)

SYSTEM = (
    "You answer questions using only the reference passages you are given. "
    "Answer in one or two sentences with the facts from the passages. "
    "If the passages do not contain the answer, say you don't know."
)

#: Where a generated answer ends. At a code fence: the 135M model's code is its own, not the
#: passages' — both Python-docs answers that passed the support check on their prose went on
#: to code it made up (a signal handler for "wait 2 seconds"); the quote shows the passage's
#: real code instead. At a next question: ``tidy_answer`` would cut it there anyway. Each
#: token not generated is ~55 ms of a 2-core CPU.
ANSWER_STOPS = ("```", "\nQuestion:", "\nQ:")


def question_likeness(text: str) -> float:
    """1 for a clear question, less for indirect ones, 0 for statements (cheap, no model).

    Only a first cut: a message scored above 0 still goes to QA only when the knowledge base
    has a passage relevant enough (``min_score``), which is what keeps small talk out. What
    counts as asking was widened after users' documentation questions were measured going to
    dialogue (docs/skills.md): terse lookups of a name, questions tacked on after their
    subject, and "I need to…" support requests.
    """
    t = text.strip()
    if not t:
        return 0.0
    if t.endswith("?"):
        return 1.0
    first = t.split(None, 1)[0].lower().strip(",.!:;")
    if first in QUESTION_WORDS or _WH_CONTRACTED.match(first):
        return 0.8
    if _ASKING.search(t) or _TRAILING_QUESTION.search(t) or _NEED.search(t):
        return 0.7
    if len(t.split()) <= 5 and _CODE_NAME.search(t):  # "PREFERRED_URL_SCHEME", "--extra-files"
        return 0.7
    if kind_of(t) == "fact":
        # A request for information not phrased as a question ("convert 100 fahrenheit to
        # celsius", "define photosynthesis"): dialogue would decline it only where no passage
        # matched, and with a passage beside it the model stated an invented answer ("100
        # fahrenheit is equal to … 95.00 celsius"). Here its relevance is checked instead,
        # and the answer is the passage's or "I don't know".
        return 0.7
    return 0.0


class _Skipped(Exception):
    """The model's recent answers here rarely passed the checks: quote without asking it."""


class AnswerRecord:
    """Whether the model's recent answers on this bot's knowledge base passed the checks, per
    adapter version: a newly promoted adapter starts with a clean record.

    Each checked answer is noted in its reply's metadata (``answer_check``), so the record
    is read back from the conversation log on the first question after a start
    (:meth:`seed`): a restart does not make users wait for ``pass_window`` failing
    generations again before the skill remembers it should quote."""

    def __init__(self) -> None:
        self._outcomes: dict[str, deque[bool]] = {}
        self._skipped: Counter[str] = Counter()
        self.seeded = False

    @staticmethod
    def key(adapter: str | None, version: str | None) -> str:
        """``qa@v3``; the base model (no adapter) is ``base``."""
        return f"{adapter}@{version}" if adapter else "base"

    def skip(self, key: str, cfg: QAConfig) -> str | None:
        """Why this question should not ask the model (None: ask it)."""
        outcomes = self._outcomes.get(key)
        if not cfg.min_pass_rate or outcomes is None or len(outcomes) < cfg.pass_window // 2:
            return None
        passed = sum(outcomes)
        if passed >= cfg.min_pass_rate * len(outcomes):
            return None
        self._skipped[key] += 1
        if self._skipped[key] % cfg.retry_every == 0:
            return None  # now and then the model is asked again, in case it does better
        return f"{passed} of the model's last {len(outcomes)} answers here passed the checks"

    def add(self, key: str, passed: bool, cfg: QAConfig) -> None:
        outcomes = self._outcomes.setdefault(key, deque(maxlen=cfg.pass_window))
        outcomes.append(passed)

    async def seed(self, store: Any, skill: str, cfg: QAConfig) -> int:
        """Replay the checks noted in the last week's replies; how many were read. Once per
        process; a log that cannot be read leaves the record empty (it fills as before)."""
        if self.seeded:
            return 0
        self.seeded = True
        if store is None or not cfg.min_pass_rate:
            return 0
        since = datetime.now(UTC) - timedelta(days=7)
        try:  # every version's last answers: the version in service is one of them
            rows = await store.recent_replies(skill, cfg.pass_window * 10, since=since)
        except Exception:
            log.exception("qa: could not read the model's recent answers from the log")
            return 0
        n = 0
        for row in rows:
            check = row.meta.get("answer_check") if isinstance(row.meta, dict) else None
            if isinstance(check, dict) and isinstance(check.get("key"), str):
                self.add(check["key"], bool(check.get("passed")), cfg)
                n += 1
        return n


class QASkill(Skill):
    name = "qa"
    description = "Answers questions from the knowledge base, with sources."
    commands = (Command("ask", "Ask the knowledge base a question", usage="QUESTION"),)
    config_model = QAConfig
    priority = 50
    threshold = 0.5
    uses_model = True

    def __init__(self) -> None:
        self.record = AnswerRecord()

    async def _search(self, ctx: Context, question: str, cfg: QAConfig) -> list[Any]:
        kb = ctx.bot.services.get("knowledge")
        if kb is None:
            return []
        k = max(cfg.top_k, cfg.rerank_candidates) if reranks(cfg) else cfg.top_k
        return await kb.search(question, k, min_score=cfg.min_score)

    async def score(self, message: Message, ctx: Context) -> float | Match:
        q = question_likeness(message.text)
        if q == 0.0 or "knowledge" not in ctx.bot.services:
            return 0.0
        cfg: QAConfig = ctx.config
        try:
            passages = await self._search(ctx, message.text, cfg)
        except Exception:
            log.exception("qa: knowledge search failed while scoring")
            return 0.0
        if not passages:
            return 0.0
        # The passages go to handle with the match: one search per message.
        return Match(q * (0.55 + 0.45 * passages[0].score), passages)

    async def handle(self, message: Message, ctx: Context) -> Reply:
        cfg: QAConfig = ctx.config
        question = (ctx.args if ctx.command else message.text).strip()
        if not question:
            return Reply("Ask me something after the command, e.g. /ask how long does it take?")
        kb = ctx.bot.services.get("knowledge")
        if kb is None:
            return Reply(
                "I have no knowledge base to answer from. An operator can add documents with "
                "`chinwag knowledge add PATH`.",
                kind="notice",
            )
        cached = ctx.match if not ctx.command else None
        try:
            passages = cached if cached is not None else await self._search(ctx, question, cfg)
        except Exception as exc:
            log.exception("qa: knowledge search failed")
            return Reply(
                "My knowledge base is unavailable right now, so I can't look that up. "
                "The operator can see why in the logs.",
                kind="error",
                metadata={"error": type(exc).__name__},
            )
        if not passages:
            return await self._abstain(question, kb)
        return await self._answer(question, passages, ctx, cfg)

    async def _abstain(self, question: str, kb: Any) -> Reply:
        try:
            files = int((await kb.stats()).get("files", 0))
            where = f"the knowledge base ({files} document{'' if files == 1 else 's'})"
        except Exception:
            where = "the knowledge base"
        shown = question if len(question) <= 120 else question[:117] + "…"
        return Reply(
            f"I don't know. I searched {where} for “{shown}” and found nothing relevant "
            "enough to answer from, so I won't guess.",
            metadata={"abstained": True, "query": question},
        )

    async def _quote(self, question: str, passage: Any, ctx: Context, cfg: QAConfig) -> str:
        """The passage's sentences that best answer the question, whole and in order, with
        the code block a chosen sentence introduces.

        From the whole passage (the prompt's cut at ``passage_chars`` would hide an answer
        further down), ranked by the embedder's similarity to the question: on the Flask
        docs, overlap of words alone quoted the section's opening lines instead of the
        sentence with the answer.
        """
        parts = passage_parts(faq_answer(neutralize_instructions(passage.text)[0]))
        similarity = None
        knowledge = ctx.bot.services.get("knowledge")
        if parts and knowledge is not None and hasattr(knowledge, "similarity"):
            try:
                similarity = await knowledge.similarity(question, [text for text, _ in parts])
            except Exception:  # the lexical ranking still answers
                log.exception("qa: could not rank the passage's sentences by meaning")
        return best_quote(question, parts, cfg.quote_sentences, similarity)

    async def _answer(
        self, question: str, passages: list[Any], ctx: Context, cfg: QAConfig
    ) -> Reply:
        rival = max((p.score for p in passages if not p.meta.get("taught_at")), default=-1.0)
        taught = [
            p
            for p in passages
            if p.meta.get("taught_at")
            and p.score >= cfg.taught_min_score
            and p.score >= rival - cfg.taught_margin
        ]
        if taught:
            return self._taught(question, taught[0], cfg)
        meta: dict[str, Any] = {}
        ranked = await self._rerank(question, passages, ctx, cfg) if reranks(cfg) else None
        if ranked is None:
            passages = passages[: cfg.top_k]
            top = passages[0]
            cited = [p for p in passages if p.score >= top.score - cfg.cite_margin]
        else:
            passages, relevance = ranked
            meta["relevance"] = [round(r, 3) for r in relevance]
            if relevance[0] < cfg.min_relevance:
                log.info("qa: no passage explains %r (best %.2f)", question, relevance[0])
                reply = await self._abstain(question, ctx.bot.services["knowledge"])
                reply.metadata.update(meta, why="no passage is about the question")
                return reply
            top = passages[0]
            # A second source only when it, too, is about the question and matches it about
            # as well as the first.
            cited = [top] + [
                p
                for p, r in zip(passages[1:], relevance[1:], strict=True)
                if r >= cfg.min_relevance and p.score >= top.score - cfg.cite_margin
            ]
        cited = cited[: cfg.max_sources]
        texts = [neutralize_instructions(p.text)[0][: cfg.passage_chars] for p in cited]
        meta["passages"] = [p.chunk_id for p in cited]
        meta["retrieval_scores"] = [round(p.score, 4) for p in cited]
        answer: str | None = None
        generation = None
        prompt = qa_prompt(question, texts)
        # The trainers learn the ``qa`` adapter from this prompt and the answer (or an
        # operator's correction of it), not from the bare question: the adapter must learn
        # the task it is served for — answering from the passages.
        meta["prompt"] = prompt
        if cfg.generate:
            runtime = ctx.bot.models
            try:
                adapter = await runtime.resolve_adapter(
                    cfg.adapter, within_s=cfg.generate_timeout_s
                )
                await self.record.seed(getattr(ctx.bot, "store", None), self.name, cfg)
                key = AnswerRecord.key(adapter, runtime.adapters().get(adapter or ""))
                if (why := self.record.skip(key, cfg)) is not None:
                    raise _Skipped(why)
                # A busy runtime refuses at once (RuntimeBusy) and the quote below answers:
                # the user gets the passage in a second rather than a generated answer late.
                generation = await runtime.generate(
                    prompt,
                    adapter,
                    max_new_tokens=cfg.max_new_tokens,
                    stop=ANSWER_STOPS,
                    within_s=cfg.generate_timeout_s,
                )
                if generation.finish_reason in ("deadline", "superseded"):
                    raise TimeoutError  # a cut answer: the quote is whole
                # Checked as the user would read it: without "A:", the next question the
                # model asked itself, or a sentence the token limit cut.
                text, tidied = tidy_answer(
                    generation.text, cut=generation.finish_reason == "length"
                )
                if tidied:
                    meta["tidied"] = tidied
                meta["support"] = round(support(text, texts), 3)
                meta["new_facts"] = new_facts(text, question, texts)
                meta["numbers_kept"] = numbers_kept(text, texts)
                meta["negations_kept"] = negations_kept(text, question, texts)
                by_passage = [round(support(text, [t]), 3) for t in texts]
                meta["support_by_passage"] = by_passage
                failed = [
                    why
                    for why, bad in (
                        ("unsupported", meta["support"] < cfg.min_support),
                        ("says nothing new", meta["new_facts"] < cfg.min_new_facts),
                        ("numbers not in the passages", not meta["numbers_kept"]),
                        ("denies what the passages do not", not meta["negations_kept"]),
                        ("says it doesn't know", "don't know" in text.lower()),
                        ("answers from another passage", elsewhere(by_passage, cfg.min_support)),
                    )
                    if bad
                ]
                self.record.add(key, not failed, cfg)
                meta["answer_check"] = {"key": key, "passed": not failed}
                if not failed:
                    answer = text
                else:  # kept for the operator (and the log): why the user got a quote
                    meta["rejected_generation"] = generation.text.strip()
                    meta["rejected_because"] = failed
            except _Skipped as exc:
                meta["model_skipped"] = str(exc)
            except TimeoutError:
                log.warning(
                    "qa: generation took over %.0fs; quoting instead", cfg.generate_timeout_s
                )
                meta["model_error"] = "timeout"
            except RuntimeBusy as exc:
                log.info("qa: the model is busy (%s); quoting instead", exc)
                meta["model_error"] = "busy"
            except ShuttingDown:
                meta["model_error"] = "shutdown"
            except Exception as exc:
                log.warning("qa: generation failed (%s); quoting the passage instead", exc)
                meta["model_error"] = type(exc).__name__
        if answer is None:
            answer = await self._quote(question, cited[0], ctx, cfg)
            meta["mode"] = "quoted"
            generation = None
            if not answer.strip():  # the passage held nothing but instructions to the model
                return await self._abstain(question, ctx.bot.services["knowledge"])
        else:
            meta["mode"] = "generated"
        meta["answer"] = answer
        sources = [
            Source(_title(p), p.source, round(p.score, 4), getattr(p, "url", None)) for p in cited
        ]
        lines = "\n".join(
            f"[{i + 1}] {s.title}" + (f" — {s.url}" if s.url else "") for i, s in enumerate(sources)
        )
        reply = Reply(
            f"{answer}\n\nSources:\n{lines}",
            rateable=True,
            sources=sources,
            metadata=meta,
        )
        if generation is not None:
            reply.grounded_in = texts  # its numbers were checked against these (numbers_kept)
            reply.model = generation.model
            reply.adapter = generation.adapter
            reply.adapter_version = generation.adapter_version
        return reply

    async def _rerank(
        self, question: str, passages: list[Any], ctx: Context, cfg: QAConfig
    ) -> tuple[list[Any], list[float]] | None:
        """The passages best first by how likely the model finds the question after each,
        with each one's relevance: that likelihood over the question's likelihood after no
        passage, per token. None when the model cannot say in time (busy, loading, a remote
        server): the fused rank and the similarity bar then decide, as before.

        Why not similarity: on a large corpus the off-corpus question "is pluto a planet"
        is as similar to the enum HOWTO's ``Planet`` example (0.5) as real questions are to
        their answers, but that passage does not make the question any likelier.
        """
        anchored = keeps_order(passages)
        if anchored:
            # A FAQ pair was found by its own question's vector: a person's wording of what
            # it answers, which matches users better than the model's guess does (the FAQ's
            # right pair first for 0.83 of questions by the search, 0.69 re-ranked). The order
            # stands; only the passages that could be cited are scored, for their relevance.
            top = passages[0]
            passages = [top] + [
                p for p in passages[1 : cfg.top_k] if p.score >= top.score - cfg.cite_margin
            ]
        requests = [(relevance_prompt(p, cfg.passage_chars), question) for p in passages]
        requests.append((NO_PASSAGE, question))
        try:
            scores = await ctx.bot.models.score(requests, within_s=cfg.rerank_timeout_s)
        except (TimeoutError, ModelError) as exc:
            log.info("qa: passages not re-ranked (%s); the search's order stands", exc or "slow")
            return None
        except Exception:  # a ranking is not worth losing the answer over
            log.exception("qa: re-ranking failed; the search's order stands")
            return None
        null = scores[-1].logprob
        relevance = [(s.logprob - null) / max(1, s.tokens) for s in scores[:-1]]
        if anchored:
            return passages, relevance  # the search's order; relevance decides whether to answer
        order = sorted(range(len(passages)), key=lambda i: -scores[i].logprob)
        return [passages[i] for i in order], [relevance[i] for i in order]

    def _taught(self, question: str, passage: Any, cfg: QAConfig) -> Reply:
        """An operator's answer to this question, as they wrote it, cited as theirs.

        The prompt is recorded as for any answer: liked, the reply teaches the ``qa`` adapter
        to answer from that passage, not from a memory of the bare question."""
        answer = faq_answer(passage.text)
        source = Source(_title(passage), passage.source, round(passage.score, 4), passage.url)
        return Reply(
            f"{answer}\n\nSources:\n[1] {source.title}",
            rateable=True,
            sources=[source],
            metadata={
                "mode": "taught",
                "answer": answer,
                "prompt": qa_prompt(
                    question, [neutralize_instructions(passage.text)[0][: cfg.passage_chars]]
                ),
                "passages": [passage.chunk_id],
                "retrieval_scores": [round(passage.score, 4)],
            },
        )


def elsewhere(support_by_passage: list[float], min_support: float) -> bool:
    """Whether an answer is grounded in a passage other than the best match, and not in it.

    The prompt carries every passage within ``cite_margin`` of the best; the small model (and
    the adapter trained on its answers) often copies the wrong one. On the FAQ, "Can I get the
    ROT deduction for renovating my facade?" was answered with the neighbouring entry's "Yes,
    if the outbuilding is linked to the home…": 6 of 8 answers drawn from the second passage
    held the wrong fact, while the first passage's quote held the right one (docs/skills.md).
    An answer that draws on several passages together still passes: no single one holds it.
    """
    if len(support_by_passage) < 2 or support_by_passage[0] >= min_support:
        return False
    return max(support_by_passage[1:]) >= min_support


def keeps_order(passages: list[Any]) -> bool:
    """Whether the search's order stands without re-ranking: the best hit is a question and
    answer pair, found by its own question — unless it is an operator's taught answer
    among documentation passages.

    A taught answer close enough to the question is given word for word before any ranking
    (``taught_min_score``); one that is not was taught for another question. On Flask's
    documentation, the correction "Functions registered with before_request() run before
    each request." (taught for "is there a hook to run some code before each request?")
    came first by 0.555 to 0.553 for "how do I stop a request early with an error code like
    401?" and was quoted, although the model found the question far likelier after the
    documentation's ``abort()`` passage (2.23 nats per token against 0.78). Among FAQ pairs
    the search's order still stands, taught or not.
    """
    top = passages[0]
    if faq_question(top.text) is None:
        return False
    if not top.meta.get("taught_at"):
        return True
    return all(faq_question(p.text) is not None for p in passages[1:])


def reranks(cfg: QAConfig) -> bool:
    """Re-ranking asks the model, so it is off where the model writes nothing either."""
    return cfg.rerank and cfg.generate


#: What the question is scored against when no passage is given: the baseline a passage has
#: to beat to count as being about the question.
NO_PASSAGE = [{"role": "user", "content": "Write a question."}]


def relevance_prompt(passage: Any, chars: int) -> list[dict[str, str]]:
    """The prompt after which the question's likelihood says how well ``passage`` explains it."""
    text = neutralize_instructions(passage.text)[0][:chars]
    return [
        {
            "role": "user",
            "content": f"Here is a passage from the knowledge base.\n\nSection: "
            f"{passage.title}\n\n{text}\n\nWrite a question that this passage answers.",
        }
    ]


def qa_prompt(question: str, passages: list[str]) -> list[dict[str, str]]:
    """The chat messages the model answers from: the instructions, numbered passages, the
    question."""
    numbered = "\n\n".join(f"[{i + 1}] {t}" for i, t in enumerate(passages))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Reference passages:\n{numbered}\n\nQuestion: {question}"},
    ]


def _title(passage: Any) -> str:
    """ "How long does a permit take? (faq-en.jsonl › bygglov)" — the question or heading
    trail, then where it lives."""
    name = getattr(passage, "where", None) or Path(passage.source).name
    question = faq_question(passage.text)
    headings = [h for h in passage.headings if h]
    if question:
        trail = " › ".join([name, *headings[1:-1]]) if len(headings) > 1 else name
        return f"{question} ({trail})"
    trail = " › ".join(headings) if headings else ""
    return f"{trail} ({name})" if trail else name


@hookimpl
def register_skills(register):
    register(QASkill())
