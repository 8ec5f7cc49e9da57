"""Torch's thread count for a training process on CPU, re-measured while it runs.

Two threads on the 2-core machine trained at 411–429 tokens/s alone but at 35 beside one busy
core (each parallel region waits for the thread that lost its core), where one thread kept
269 (273 alone); the cycle's scoring passes (held-out loss, generated answers) collapse the
same way. Trying the other count on real work, as the serving tuner does with its millisecond
decode steps, costs whole seconds here when it is the wrong one, so at most every
``INTERVAL_S`` seconds a matmul of a training batch's shape (about 0.1 s) is timed at each
candidate count instead and the fastest runs the next stretch.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: How long a measured thread count stands before the next measurement.
INTERVAL_S = 6.0

_state: dict[str, Any] = {"checked": float("-inf"), "threads": None}


@functools.cache
def _work() -> Any:
    """Four matmuls of a training batch's shape (800 positions, SmolLM2's MLP), in the dtype
    training runs in here: emulated bf16 would time other kernels."""
    import torch

    from bot.models.tuning import has_native_bf16

    dtype = torch.bfloat16 if has_native_bf16() else torch.float32
    x = torch.randn(800, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)

    def work() -> None:
        for _ in range(4):
            torch.nn.functional.linear(x, w)

    return work


def adjust(device: Any = "cpu") -> None:
    """Re-measure the thread count if ``INTERVAL_S`` has passed; call it between units of work.

    Does nothing for a model on a GPU or on a single usable core.
    """
    if str(device).startswith("cuda"):
        return
    now = time.monotonic()
    if now - _state["checked"] < INTERVAL_S:
        return
    import torch

    from bot.models.tuning import fastest_threads, thread_candidates

    candidates = thread_candidates()
    if len(candidates) < 2:
        return
    chosen = fastest_threads(candidates, _work(), repeats=11)
    if chosen != _state["threads"]:
        log.info("training threads: %s → %d", _state["threads"] or "default", chosen)
    _state["threads"] = chosen
    torch.set_num_threads(chosen)
    _state["checked"] = time.monotonic()
