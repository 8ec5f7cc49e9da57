"""The bot: the front adapters talk to — lifecycle, per-chat ordering, pushes, readiness.

``Bot.handle`` takes a platform-neutral message and returns (and sends) the replies. Messages
of one chat are handled strictly in arrival order, a newer message from the same user
supersedes the older one's generation, and different chats run concurrently up to
``bot.max_concurrency``. What happens to one message is :mod:`bot.pipeline`; which skills,
observers and filters exist is :func:`bot.plugins.load_skills`; per-chat policy is
:mod:`bot.chats`; what skills may use is :class:`bot.services.BotServices`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.chats import ChatPolicy
from bot.config import Settings
from bot.messages import Message, Reply
from bot.models.types import SUPERSEDED, RuntimeBusy
from bot.pipeline import Pipeline, Sender, busy_reply
from bot.plugins import Loaded, PluginInfo, Registered, call_lifecycle, load_skills, make_manager
from bot.ratelimit import RateLimiter
from bot.router import Router, SkillEntry
from bot.sanitize import to_text
from bot.services import BotServices
from bot.skill import TOKEN_SINK
from bot.store import ConversationStore, StoreError

log = logging.getLogger(__name__)

__all__ = ["Bot", "Pusher", "Sender"]
#: ``push(chat_id, reply)``: an adapter's way of sending a message nobody asked for
#: (escalation notices, reminders); registered per platform in ``Bot.outboxes``.
Pusher = Callable[[str, Reply], Awaitable[None]]


@dataclass(slots=True)
class _ChatLock:
    lock: asyncio.Lock
    users: int = 0
    #: Per user, the events of their messages being answered or waiting, oldest first: a
    #: newer message sets the older ones, so their generations wrap up (see ``supersede``).
    pending: dict[str, list[tuple[str | None, threading.Event]]] = field(default_factory=dict)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class Bot:
    """Owns the plugins, the store, the model runtime and the pipeline; adapters feed it
    messages. Plugins' lifecycle hooks (``startup``, ``shutdown``, ``escalate``) get the Bot;
    skills get :class:`~bot.services.BotServices` as ``ctx.bot``."""

    def __init__(
        self,
        settings: Settings,
        *,
        plugins: Sequence[Any] = (),
        load_entry_points: bool = True,
    ) -> None:
        self.settings = settings
        self.pm, self.plugin_infos = make_manager(
            load_entry_points=load_entry_points,
            disabled=settings.disabled_plugins,
            extra=plugins,
        )
        self.store = ConversationStore(
            settings.database_url,
            synchronous=settings.database.synchronous,
            batch_max=settings.database.batch_max,
            echo=settings.database.echo,
        )
        self.loaded = Loaded([], Router([], None), [], [])
        self.chats = ChatPolicy(settings, self.store)
        self.rate_limiter = RateLimiter(settings.rate_limit.per_second, settings.rate_limit.burst)
        self._chat_locks: dict[str, _ChatLock] = {}
        self._semaphore = asyncio.Semaphore(settings.bot.max_concurrency)
        self._inflight = 0
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        #: Services plugins attach for skills (e.g. ``knowledge``).
        self.services: dict[str, Any] = {}
        #: Per platform, how to send a message unprompted; adapters register themselves here.
        self.outboxes: dict[str, Pusher] = {}
        #: The model runtime every model-backed skill uses; the model loads on first use.
        from bot.models import ModelRuntime

        self.models = ModelRuntime(settings)
        from bot.metrics import Metrics

        self.metrics = Metrics()
        self.metrics.track(lambda: self._inflight, self.models.queue_depth)
        #: Background warm-ups started by skills (model loads); :meth:`warmed` waits for them.
        self.warmups: list[asyncio.Future[Any]] = []
        #: What skills see as ``ctx.bot``.
        self.facade = BotServices(
            settings=settings,
            store=self.store,
            models=self.models,
            services=self.services,
            chats=self.chats,
            skills=lambda: self.loaded.skills,
            push=self.push,
            escalate=self.escalate,
            busy_reply=self.busy_reply,
            warmups=self.warmups,
        )
        self.pipeline = self._pipeline()

    def _pipeline(self) -> Pipeline:
        return Pipeline(
            settings=self.settings,
            store=self.store,
            chats=self.chats,
            services=self.facade,
            loaded=self.loaded,
            models=self.models,
            metrics=self.metrics,
            rate_limiter=self.rate_limiter,
            semaphore=self._semaphore,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        return self.plugin_infos

    async def warmed(self, within: float = 300.0) -> bool:
        """Wait for the skills' warm-ups (model loads) to finish, and then for the model's
        faster CPU layers (:meth:`ModelRuntime.settled`); ``False`` past ``within`` seconds.

        Live traffic never waits for this — the bot answers while models load. Measurements
        (``chinwag eval``, ``chinwag simulate``, benchmarks) do, so a cold start is not
        mistaken for the bot's behaviour.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        pending = [w for w in self.warmups if not w.done()]
        if pending:
            done, _ = await asyncio.wait(pending, timeout=within)
            if len(done) != len(pending):
                return False
        # The model is in; its faster CPU layers follow a few seconds later.
        return await self.models.settled(max(0.0, until - loop.time()))

    async def start(self) -> None:
        """Open the store, load and configure the skills, run startup hooks."""
        if self._started:
            return
        settings = self.settings
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the data directory {settings.data_dir}: {exc.strerror or exc}"
            ) from None
        self.load_skills()
        await self.store.open(migrate=settings.database.auto_migrate)
        try:
            await self.chats.load()
            for entry in self.skills:
                setup = getattr(entry.skill, "setup", None)  # skills are duck-typed
                if setup is not None:
                    await _maybe_await(setup(self.facade, entry.config))
            for result in call_lifecycle(self.pm, "startup", bot=self):
                await _maybe_await(result)
        except BaseException:
            await self.store.close()
            raise
        self._started = True
        log.info(
            "chinwag started with skills: %s", ", ".join(e.name for e in self.skills) or "none"
        )

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Cancel model work, let in-flight messages finish (their users get the shutdown
        notice), run shutdown hooks, flush and close the store.

        ``drain_timeout`` defaults to most of ``bot.shutdown_timeout_s``.
        """
        if not self._started:
            return
        if drain_timeout is None:
            drain_timeout = self.settings.bot.shutdown_timeout_s * 0.6
        # Each step's time is logged: an operator whose stop took long sees which step did.
        t0 = time.monotonic()
        await self.begin_shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("stopping with %d messages still in flight", self._inflight)
        drained = time.monotonic()
        for result in call_lifecycle(self.pm, "shutdown", bot=self):
            try:
                await _maybe_await(result)
            except Exception:
                log.exception("a shutdown hook failed")
        hooks = time.monotonic()
        await self.models.stop()
        models = time.monotonic()
        await self.store.close()
        log.info(
            "stopped in %.1f s: in-flight messages %.1f s, shutdown hooks %.1f s, models %.1f s, "
            "store %.1f s",
            time.monotonic() - t0,
            drained - t0,
            hooks - drained,
            models - hooks,
            time.monotonic() - models,
        )
        self._started = False
        self._stopping = False

    async def begin_shutdown(self) -> None:
        """The first step of stopping, while the adapters can still deliver: ``/readyz`` turns
        503, and model work is cancelled — it would hold the shutdown for minutes — so each
        waiting user gets the short shutdown notice (logged) instead of silence."""
        self._stopping = True
        for warming in self.warmups:  # a model still loading is not waited for
            warming.cancel()
        await self.models.interrupt()

    async def __aenter__(self) -> Bot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def load_skills(self) -> None:
        """Load, check and configure what the plugins register (``start`` does this first)."""
        self.loaded = load_skills(self.pm, self.settings)
        self.pipeline = self._pipeline()

    @property
    def skills(self) -> list[SkillEntry]:
        return self.loaded.skills

    @property
    def router(self) -> Router:
        return self.loaded.router

    @property
    def observers(self) -> list[Registered]:
        return self.loaded.observers

    @property
    def filters(self) -> list[Registered]:
        return self.loaded.filters

    # -- queries skills use --------------------------------------------------------------------

    def add_admin(self, platform: str, user_id: str) -> None:
        """Grant admin rights for this process (tests, operator tooling); config is the default."""
        self.chats.add_admin(platform, user_id)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return self.chats.is_admin(platform, user_id)

    def skill(self, name: str) -> SkillEntry | None:
        return self.router.by_name.get(name) or next(
            (e for e in self.skills if e.name == name), None
        )

    def allowed(self, entry: SkillEntry, message: Message) -> bool:
        """Whether ``entry`` may answer in the message's chat (global and per-chat switches)."""
        return self.chats.allowed(entry, message)

    def chat_settings(self, platform: str, chat_id: str) -> dict[str, Any]:
        return self.chats.chat_settings(platform, chat_id)

    async def update_chat_settings(self, platform: str, chat_id: str, **changes: Any) -> None:
        await self.chats.update_chat_settings(platform, chat_id, **changes)

    async def set_skill_enabled(
        self, platform: str, chat_id: str, skill: str, enabled: bool
    ) -> None:
        await self.chats.set_skill_enabled(platform, chat_id, skill, enabled)

    def busy_reply(self, exc: RuntimeBusy, skill: str) -> Reply:
        """The honest "I'm busy, try again in N s" (see :func:`bot.pipeline.busy_reply`)."""
        return busy_reply(self.settings, exc, skill)

    async def push(self, platform: str, chat_id: str, reply: Reply | str) -> bool:
        """Send a message nobody asked for (a notice to admins, a reminder); logged.

        Returns ``False`` (and logs why) when no adapter for ``platform`` is running.
        """
        if isinstance(reply, str):
            reply = Reply(reply, kind="notice")
        outbox = self.outboxes.get(platform)
        if outbox is None:
            log.warning(
                "cannot push to %s:%s: no %s adapter is running", platform, chat_id, platform
            )
            return False
        origin = Message(platform=platform, chat_id=chat_id, user_id="", text="")
        if reply.skill is None:
            reply.skill = "core:push"
        try:
            self.store.log_outbound_nowait(origin, [reply], 0.0)
        except StoreError:
            log.exception("could not log a pushed message")
        try:
            await outbox(chat_id, reply)
        except Exception:
            log.exception("pushing to %s:%s failed", platform, chat_id)
            return False
        return True

    async def record_feedback(
        self,
        platform: str,
        user_id: str,
        rating: int,
        *,
        reply_id: int | None = None,
        chat_id: str | None = None,
        platform_message_id: str | None = None,
        comment: str | None = None,
    ) -> int | None:
        """Store a rating (👍 ``1`` / 👎 ``-1``) of one of the bot's replies; its feedback id,
        or ``None`` when the rated message is not a reply the bot sent in that chat on that
        platform (a forged button, a reaction on someone else's message).

        Adapters name the reply by the bot's id (Telegram's buttons carry it, the HTTP API
        returns it) or by the platform's (a Discord reaction); a reply whose platform id is
        still on its way to disk is waited for once.
        """
        store = self.store

        async def find() -> Any:
            if reply_id is not None:
                return await store.get_message(reply_id)
            if chat_id is None or platform_message_id is None:
                raise ValueError("name the reply: reply_id, or chat_id and platform_message_id")
            return await store.find_by_platform_id(platform, chat_id, platform_message_id)

        target = await find()
        if target is None:
            await store.flush()
            target = await find()
        if (
            target is None
            or target.direction != "out"
            or target.platform != platform
            or (chat_id is not None and target.chat_id != chat_id)
        ):
            return None
        return await store.add_feedback(target.id, platform, user_id, rating, correction=comment)

    def readiness(self) -> dict[str, Any]:
        """Whether this worker should get traffic: started, not stopping, the model loaded
        (when a skill needs it) and its queue not saturated — with the figures behind it."""
        reasons = []
        if not self._started:
            reasons.append("not started")
        if self._stopping:
            reasons.append("shutting down")
        if self.models.loading:
            reasons.append("the model is loading")
        load = self.models.load()
        if load and load["pending"] >= self.settings.models.max_queue:
            reasons.append("the model queue is full")
        elif load and load["waiting"] >= load["capacity"] and load["step_s"]:
            start, _ = self.models.estimate_start()
            if start > self.settings.models.max_start_wait_s:
                reasons.append(f"the model is saturated (a new reply would start in {start:.0f}s)")
        return {
            "ready": not reasons,
            "reasons": reasons,
            "in_flight": self._inflight,
            "model": load,
        }

    def warm_up(self) -> None:
        """Load the base model and the services' indexes now, in the background (``chinwag
        run`` does this, so the first user does not wait for them and ``/readyz`` says when
        the model is in).

        A service warms up when it has a ``warm_up`` coroutine method: the knowledge base
        opens its catalogue, index and embedder, which the first question on the Python
        documentation (18,312 chunks) otherwise waited 3.5 s for.
        """

        async def warm(what: str, start: Callable[[], Awaitable[Any]]) -> None:
            try:
                await start()
            except Exception:
                log.exception("warming up %s failed; it loads on first use instead", what)

        if any(e.uses_model and e.enabled for e in self.skills):
            self.warmups.append(asyncio.ensure_future(warm("the model", self.models.start)))
        for name, service in list(self.services.items()):
            start = getattr(service, "warm_up", None)
            if callable(start):
                self.warmups.append(asyncio.ensure_future(warm(name, start)))

    async def escalate(self, event: Any) -> None:
        """Hand ``event`` (an :class:`~bot.messages.Escalation`) to every ``escalate`` hook."""
        for result in call_lifecycle(self.pm, "escalate", bot=self, event=event):
            try:
                await _maybe_await(result)
            except Exception:
                log.exception("an escalate hook failed")

    # -- the pipeline --------------------------------------------------------------------------

    async def handle(
        self,
        message: Message,
        send: Sender | None = None,
        *,
        on_token: Callable[[str], Awaitable[None]] | None = None,
    ) -> list[Reply]:
        """Process one inbound message; returns the replies (already sent when ``send`` is given).

        ``on_token`` receives generated text as skills produce it (for platforms that stream).
        Returns ``[]`` for a redelivered message, for a flood past its warning, and for a
        command addressed to another bot.
        """
        if on_token is not None:
            token = TOKEN_SINK.set(on_token)
            try:
                return await self.handle(message, send)
            finally:
                TOKEN_SINK.reset(token)
        if not self._started:
            raise RuntimeError("Bot.handle called before Bot.start()")
        key = message.chat_key
        chat_lock = self._chat_locks.get(key)
        if chat_lock is None:
            chat_lock = self._chat_locks[key] = _ChatLock(asyncio.Lock())
        chat_lock.users += 1
        self._inflight += 1
        self._idle.clear()
        cut = threading.Event()
        mine = chat_lock.pending.setdefault(message.user_id, [])
        if self.settings.bot.supersede and not to_text(message.text).lstrip().startswith("/"):
            for older_key, older in mine:
                # The user moved on: replies to their earlier messages wrap up — unless this is
                # the same message delivered again (a platform retry), which changes nothing.
                if older_key is None or older_key != message.dedup_key:
                    older.set()
        entry = (message.dedup_key, cut)
        mine.append(entry)
        try:
            async with chat_lock.lock:
                token = SUPERSEDED.set(cut)
                try:
                    return await self.pipeline.run(message, send)
                finally:
                    SUPERSEDED.reset(token)
        finally:
            mine.remove(entry)
            if not mine:
                chat_lock.pending.pop(message.user_id, None)
            chat_lock.users -= 1
            if chat_lock.users == 0:
                del self._chat_locks[key]
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
