"""A reply shown while it is generated: one message, posted once its first words exist, edited
as it grows at most every ``interval_s``, and at the end edited into the reply itself.

Time to the first visible words is what users feel; a 100-token reply on a busy CPU takes
seconds. Telegram and Discord both allow editing a sent message and both limit how often, so
the pacing, the "one update in flight" rule and removing a draft that no reply took over are
the same for both and live here; each adapter supplies its platform's post, edit and delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
Handle = TypeVar("Handle")  # what the platform gave back for the posted message
T = TypeVar("T")
CONTINUES = " …"  # shown after a draft's text: more is coming


class Draft(Generic[Handle]):
    """One streamed reply. ``add`` is the skill's token callback and never waits on the network:
    an update is scheduled, at most one is in flight, and text that grew meanwhile goes out with
    the next one."""

    #: Fewer characters than this are not worth a message of their own yet.
    MIN_CHARS = 12

    def __init__(
        self,
        post: Callable[[str], Awaitable[Handle]],
        edit: Callable[[Handle, str], Awaitable[Any]],
        delete: Callable[[Handle], Awaitable[Any]],
        *,
        interval_s: float,
        limit: int,
        platform: str,
    ) -> None:
        self._post, self._edit, self._delete = post, edit, delete
        self.interval_s = interval_s
        self.limit = limit
        self.platform = platform
        self.text = ""
        self.shown = ""
        self.handle: Handle | None = None
        self.finished = False  # no more updates
        self.taken = False  # a reply took the draft over
        self._pending: asyncio.Task[None] | None = None
        self._last = 0.0
        self._lock = asyncio.Lock()
        self._sending = False

    @property
    def posted(self) -> bool:
        return self.handle is not None

    async def add(self, piece: str) -> None:
        self.text += piece
        # Past the platform's limit the draft stops growing; the final reply is split normally.
        if len(self.text.strip()) < self.MIN_CHARS or len(self.text) > self.limit - len(CONTINUES):
            return
        if self._pending is None or self._pending.done():
            wait = 0.0 if self.handle is None else self._last + self.interval_s - time.monotonic()
            self._pending = asyncio.create_task(self._show(max(0.0, wait)))

    async def _show(self, wait: float) -> None:
        if wait:
            await asyncio.sleep(wait)
        async with self._lock:
            text = self.text.strip() + CONTINUES
            if text == self.shown or self.finished:
                return
            self._last = time.monotonic()
            self._sending = True  # from here on, let it land: a cut call may still arrive
            try:
                if self.handle is None:
                    self.handle = await self._post(text)
                else:
                    await self._edit(self.handle, text)
                self.shown = text
            except Exception:
                log.warning("%s: could not update a streamed reply", self.platform, exc_info=True)
            finally:
                self._sending = False

    async def settle(self) -> None:
        """No update in flight afterwards: one being sent lands, one only scheduled is dropped."""
        task = self._pending
        if task is None or task.done():
            return
        if not self._sending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def finish(self, apply: Callable[[Handle], Awaitable[T]]) -> T | None:
        """Turn the draft into the reply with ``apply(handle)`` (an edit to the final text);
        ``None`` when that failed, so the caller sends the reply the ordinary way."""
        await self.settle()
        self.finished = self.taken = True
        assert self.handle is not None, "finish() a draft that was posted"
        async with self._lock:
            try:
                return await apply(self.handle)
            except Exception:
                log.warning("%s: could not finish a streamed reply", self.platform, exc_info=True)
                self.taken = False  # close() removes the partial text
                return None

    async def close(self) -> None:
        """The message is handled: a draft no reply took over (all withheld) is removed, so
        partial text never stays on screen."""
        await self.settle()
        self.finished = True
        if self.handle is not None and not self.taken:
            with contextlib.suppress(Exception):
                await self._delete(self.handle)
