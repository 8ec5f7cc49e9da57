"""The promotion gate's comparisons: is the candidate *measurably* worse than the one in service?

Comparing two means and refusing on any difference blocked adapters that helped: in the
learning benchmark (bench/learning.py) a cycle's held-out split was six FAQ answers, and a
candidate whose loss on them was 0.3148 against 0.3118 (1 % worse, well inside what six
examples can tell apart) was rejected although its regression loss improved. Means also let
one outlier decide: a candidate trained on a log of "lol" was worse on 7 of the 8 regression
conversations, yet its per-example mean was *better*, carried by one reply it happened to
score 4 nats lower.

So each figure is compared pair by pair on the same examples, with a sign test: the candidate
is held back when it is worse on significantly more examples than it is better on (one-sided,
``alpha``), counting an example as worse only beyond ``margin`` (relative). Noise on a handful
of examples does not block a candidate; a consistent regression does, whatever one example
says. Besides the losses, the gate looks at what users see: the candidate and the one in
service each answer the held-out prompts (greedy), and the answers are scored against the
replies users liked or operators wrote (token F1) the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Comparison:
    figure: str
    baseline: float  # mean over the examples
    candidate: float
    #: Examples on which the candidate is worse / better (beyond the margin); ties left out.
    worse_on: int
    better_on: int
    #: One-sided sign-test p-value of "the candidate is worse more often than better".
    p_value: float
    worse: bool
    #: One-sided sign-test p-value of "the candidate is better more often than worse", and
    #: whether that is significant: what promotion asks of the figures a cycle improves.
    p_better: float = 1.0
    better: bool = False

    def why(self) -> str:
        return (
            f"{self.figure} {self.candidate:.4f} vs {self.baseline:.4f} (worse on "
            f"{self.worse_on}, better on {self.better_on}, p={self.p_value:.3f})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "baseline": round(self.baseline, 4),
            "candidate": round(self.candidate, 4),
            "worse_on": self.worse_on,
            "better_on": self.better_on,
            "p_value": round(self.p_value, 4),
            "worse": self.worse,
            "p_better": round(self.p_better, 4),
            "better": self.better,
        }


def sign_test(worse: int, better: int) -> float:
    """P(at least ``worse`` of ``worse + better`` fair coin flips land "worse")."""
    n = worse + better
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n


def compare(
    figure: str,
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    higher_is_better: bool,
    margin: float = 0.0,
    alpha: float = 0.05,
    better_alpha: float = 0.05,
) -> Comparison:
    """Paired comparison of one figure on the same examples (see the module)."""
    pairs = [(b, c) for b, c in zip(baseline, candidate, strict=True) if math.isfinite(b + c)]
    if not pairs:
        return Comparison(figure, math.nan, math.nan, 0, 0, 1.0, False)
    sign = -1.0 if higher_is_better else 1.0
    worse = sum(sign * (c - b) > margin * abs(b) and c != b for b, c in pairs)
    better = sum(sign * (b - c) > margin * abs(b) and c != b for b, c in pairs)
    p = sign_test(worse, better)
    p_better = sign_test(better, worse)
    return Comparison(
        figure,
        statistics.fmean(b for b, _ in pairs),
        statistics.fmean(c for _, c in pairs),
        worse,
        better,
        p,
        worse > better and p < alpha,
        p_better,
        better > worse and p_better < better_alpha,
    )


def answer_f1(
    model: Any, tokenizer: Any, examples: Sequence[Any], *, max_new_tokens: int = 96
) -> list[float]:
    """Greedy answers to each example's prompt, scored by token F1 against its reply."""
    import torch

    from trainers import threads
    from trainers.metrics import token_f1

    scores = []
    model.eval()
    for e in examples:
        threads.adjust(model.device)
        prompt = tokenizer.apply_chat_template(
            list(e.messages[:-1]), add_generation_prompt=True, return_tensors="pt"
        )
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        target = e.messages[-1]["content"]
        budget = min(max_new_tokens, len(tokenizer(target)["input_ids"]) + 16)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=torch.ones_like(ids).to(model.device),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        scores.append(token_f1(answer, target))
    return scores
