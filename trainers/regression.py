"""The fixed regression set every generative candidate is scored on, whatever its data.

A cycle's own held-out split shares that cycle's flaws: if every logged reply were "lol", the
held-out replies would be "lol" too and a "lol" model would look perfect on them. This set does
not move: human replies from real conversations (``chitchat-dataset``), chosen by a fixed seed,
so the same candidate always gets the same score and a model that forgot how people talk is
caught.
"""

from __future__ import annotations

import random
from functools import cache

from trainers.dataset import Example


@cache
def regression_examples(n: int = 48, seed: int = 20231123) -> list[Example]:
    from bot.simulation.users import chitchat_conversations

    rng = random.Random(seed)
    conversations = list(chitchat_conversations())
    rng.shuffle(conversations)
    out: list[Example] = []
    for conv in conversations:
        blocks = [text.strip() for _, text in conv if text.strip()]
        if len(blocks) < 4:
            continue
        turn = rng.randrange(1, min(len(blocks), 8), 2)  # a reply by the second speaker
        history = blocks[max(0, turn - 4) : turn + 1]
        roles = ["user", "assistant"] * 4
        offset = (len(history) - 1) % 2  # the last one is the assistant's
        messages = [
            {"role": roles[(i + offset + 1) % 2], "content": text} for i, text in enumerate(history)
        ]
        while messages[0]["role"] == "assistant":
            messages.pop(0)  # a chat template wants the user first
        out.append(Example("regression", f"chitchat-{len(out)}", [], messages, "fixed"))
        if len(out) == n:
            break
    return out
