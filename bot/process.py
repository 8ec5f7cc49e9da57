"""Process hygiene: children that end with the bot, and a shutdown that always ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)


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
