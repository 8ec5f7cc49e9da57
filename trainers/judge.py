"""An LLM-as-judge panel in the manner of ChatEval (Chan et al., 2023): several judges with
different roles discuss two answers in turn, then each gives its scores.

Off by default: judging needs a model much stronger than the one being judged (the embedded
135M model would be grading itself). Point ``--judge-url``/``--judge-model`` at any
OpenAI-compatible server (vLLM, a hosted API). Two known biases are countered:

- **position**: every comparison runs twice with the answers swapped, and the scores are
  averaged back onto the answers; a panel that prefers whichever answer comes first ends in a
  tie, and ``position_consistent`` says whether both orders agreed;
- **one voice**: judges have different roles and read each other's arguments before scoring
  (ChatEval's one-by-one debate), rather than one prompt voting alone.

A judge whose verdict cannot be read (no ``A: n/10`` line) is left out of the average and
counted, rather than guessed.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from bot.models.remote import RemoteBackend
from bot.models.types import GenerationParams

ROLES: dict[str, str] = {
    "critic": "You are a demanding critic. You look for factual errors, unsupported claims, "
    "vagueness and anything that does not answer the question.",
    "user advocate": "You speak for the person who asked. You care whether the answer helps "
    "them: is it correct, clear, complete enough and polite?",
    "subject expert": "You are an expert in the subject of the question. You check the answers "
    "for accuracy against the reference material and your own knowledge.",
}
_SCORE = re.compile(r"\b([AB])\s*[:=]\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.I)


@dataclass
class Verdict:
    """Mean scores (1–10) of answers ``a`` and ``b`` over judges and both orders."""

    a: float | None
    b: float | None
    position_consistent: bool
    unreadable: int = 0
    discussion: list[dict[str, str]] = field(default_factory=list)

    @property
    def winner(self) -> str:
        if self.a is None or self.b is None or abs(self.a - self.b) < 0.5:
            return "tie"
        return "a" if self.a > self.b else "b"


class JudgePanel:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        roles: dict[str, str] | None = None,
        rounds: int = 1,
        max_tokens: int = 250,
    ) -> None:
        self.backend = RemoteBackend(url, model=model, api_key=api_key)
        self.roles = roles or ROLES
        self.rounds = rounds
        self.params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)

    async def close(self) -> None:
        await self.backend.stop()

    async def _say(self, system: str, prompt: str) -> str:
        gen = await self.backend.generate(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            self.params,
        )
        return gen.text

    async def _debate(
        self, question: str, first: str, second: str, context: str
    ) -> tuple[list[dict[str, str]], list[tuple[float, float] | None]]:
        case = (
            f"Question: {question}\n\n"
            + (f"Reference material:\n{context}\n\n" if context else "")
            + f"Answer A:\n{first}\n\nAnswer B:\n{second}\n"
        )
        discussion: list[dict[str, str]] = []
        for _ in range(self.rounds):
            for role, persona in self.roles.items():
                said = "\n".join(f"{d['judge']}: {d['text']}" for d in discussion)
                text = await self._say(
                    persona,
                    case
                    + (f"\nThe panel so far:\n{said}\n" if said else "")
                    + "\nIn two or three sentences, argue which answer is better and why.",
                )
                discussion.append({"judge": role, "text": text.strip()})
        scores: list[tuple[float, float] | None] = []
        said = "\n".join(f"{d['judge']}: {d['text']}" for d in discussion)
        for _role, persona in self.roles.items():
            text = await self._say(
                persona,
                case + f"\nThe panel's discussion:\n{said}\n\nNow give your final scores from 1 "
                "to 10, exactly in this form on one line: A: <score>/10, B: <score>/10",
            )
            found = {m.group(1).upper(): float(m.group(2)) for m in _SCORE.finditer(text)}
            scores.append((found["A"], found["B"]) if {"A", "B"} <= found.keys() else None)
        return discussion, scores

    async def compare(self, question: str, a: str, b: str, context: str = "") -> Verdict:
        """Answer ``a`` against answer ``b``, in both orders."""
        talk1, forward = await self._debate(question, a, b, context)
        talk2, backward = await self._debate(question, b, a, context)
        a_scores = [s[0] for s in forward if s] + [s[1] for s in backward if s]
        b_scores = [s[1] for s in forward if s] + [s[0] for s in backward if s]
        unreadable = sum(s is None for s in forward + backward)

        def lean(scores: list[tuple[float, float] | None], swapped: bool) -> float:
            diffs = [(y - x) if swapped else (x - y) for x, y in (s for s in scores if s)]
            return statistics.mean(diffs) if diffs else 0.0

        # Both orders must lean the same way (or both be even) for the verdict to stand.
        sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
        consistent = sign(lean(forward, False)) == sign(lean(backward, True))
        return Verdict(
            statistics.mean(a_scores) if a_scores else None,
            statistics.mean(b_scores) if b_scores else None,
            consistent,
            unreadable,
            [{"order": "a-b", **d} for d in talk1] + [{"order": "b-a", **d} for d in talk2],
        )


async def judge_against_references(
    panel: JudgePanel, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """The bot's answers against reference answers: 1 for a win, ½ a tie, 0 a loss."""
    points, consistent, unreadable, verdicts = [], 0, 0, []
    for case in cases:
        v = await panel.compare(case["question"], case["reply"], case["reference"])
        points.append({"a": 1.0, "tie": 0.5, "b": 0.0}[v.winner])
        consistent += v.position_consistent
        unreadable += v.unreadable
        verdicts.append({"question": case["question"], "bot": v.a, "reference": v.b})
    return {
        "judge_vs_reference": statistics.mean(points) if points else None,
        "judge_position_consistency": consistent / len(cases) if cases else None,
        "judge_unreadable": unreadable,
        "judge_verdicts": verdicts,
    }
