"""Process hygiene: children that end with the bot, and a shutdown that always ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Threads whose work the process may walk away from at exit (see :func:`leave_abandoned`).
_abandonable: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def die_with_parent() -> None:
    """In a child before ``exec``: the kernel sends it SIGTERM when the bot dies, even by
    SIGKILL, so no trainer lives on holding the training lock (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def exit_within(seconds: float) -> None:
    """A stop was asked for: whatever hangs (a stuck adapter, a model call in C), the process
    is gone ``seconds`` from now."""

    def force() -> None:
        log.error("shutdown took longer than %.0fs; exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has really ended (None: nothing to do)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def abandonable_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start ``target`` in a daemon thread the process need not wait for at exit (a model
    still loading when SIGTERM arrives), and remember it for :func:`leave_abandoned`."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    _abandonable.add(thread)
    thread.start()
    return thread


def abandoned() -> list[str]:
    """The names of the abandonable threads still running."""
    return [t.name for t in _abandonable if t.is_alive()]


def leave_abandoned(code: int) -> None:
    """End the process now, with ``code``, if abandoned work is still running; else return.

    Python's normal exit runs C++ static destructors while such a thread may still be inside
    torch or a tokenizer, and a destroyed ``std::thread`` that is still joinable calls
    ``std::terminate``: a clean stop ended in SIGABRT ("terminate called without an active
    exception", exit -6) for 2 of 8 SIGTERMs sent during the model load. ``os._exit`` skips
    the destructors; by now the store is closed and the adapters are stopped, and the log and
    stdio are flushed first, so nothing is lost.
    """
    running = abandoned()
    if not running:
        return
    log.info("exiting with unfinished background work left behind: %s", ", ".join(running))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
