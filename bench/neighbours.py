"""The other work a user's machine runs beside the bot, for benchmarks measured under load.

A figure taken on an idle machine is not the one users get: these machines are shared, and
torch's thread pools in particular collapse when one core is taken (two threads can run
several times slower than one). ``busy_core()`` takes one core with a spinning process for as
long as the block runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator


def _spin(stop: float) -> None:
    while time.monotonic() < stop:
        pass


@contextlib.contextmanager
def busy_core(active: bool = True) -> Iterator[None]:
    """One core kept busy (a pure-Python loop in its own process) while the block runs."""
    if not active:
        yield
        return
    hog = multiprocessing.Process(target=_spin, args=(time.monotonic() + 3600,), daemon=True)
    hog.start()
    try:
        yield
    finally:
        hog.kill()
        hog.join()
