"""The bot: one object that takes a platform-neutral message and produces replies.

``Bot.handle`` is the whole pipeline (see docs/architecture.md): clean the text → log it durably
(and drop redeliveries) → rate-limit → observers → route → run the skill under a timeout → reply
filters → log the replies → hand them to the adapter. Messages of one chat are handled strictly
in arrival order; different chats run concurrently up to ``bot.max_concurrency``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from bot.config import ConfigError, Settings, format_validation_error
from bot.contract import check_filter, check_observer, check_skill, unknown_keys
from bot.messages import Message, Reply
from bot.models.types import DEADLINE, SUPERSEDED, RuntimeBusy, ShuttingDown, Superseded
from bot.plugins import PluginInfo, Registered, call_lifecycle, collect, make_manager
from bot.ratelimit import RateLimiter, Verdict
from bot.router import Router, SkillEntry, parse_command, suggest
from bot.sanitize import clean_text, to_text
from bot.skill import INBOUND_STORED, TOKEN_SINK, Command, Context
from bot.store import ConversationStore, StoreError

log = logging.getLogger(__name__)

#: ``send(message, replies)``: an adapter's way of delivering replies; it may set
#: ``reply.metadata["platform_message_id"]`` so feedback on that message can be traced back.
Sender = Callable[[Message, list[Reply]], Awaitable[None]]
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


def _as_replies(result: Any) -> list[Reply]:
    if result is None:
        return []
    if isinstance(result, Reply):
        return [result]
    if isinstance(result, str):
        return [Reply(result)] if result else []
    if isinstance(result, list | tuple):
        out: list[Reply] = []
        for item in result:
            out.extend(_as_replies(item))
        return out
    raise TypeError(f"a skill must return Reply, str, a list of them or None, not {type(result)}")


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class Bot:
    """Owns the plugins, the skills, the store and the pipeline; adapters feed it messages."""

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
        self.skills: list[SkillEntry] = []
        self.observers: list[Registered] = []
        self.filters: list[Registered] = []
        self.router = Router([], None)
        self.rate_limiter = RateLimiter(settings.rate_limit.per_second, settings.rate_limit.burst)
        self._chat_locks: dict[str, _ChatLock] = {}
        self._semaphore = asyncio.Semaphore(settings.bot.max_concurrency)
        self._chat_settings: dict[tuple[str, str], dict[str, Any]] = {}
        self._admins = {p: set(ids) for p, ids in settings.admins.items()}
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

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        return self.plugin_infos

    async def warmed(self, within: float = 300.0) -> bool:
        """Wait for the skills' warm-ups (model loads) to finish; ``False`` past ``within`` seconds.

        Live traffic never waits for this — the bot answers while models load. Measurements
        (``chinwag eval``, ``chinwag simulate``, benchmarks) do, so a cold start is not
        mistaken for the bot's behaviour.
        """
        pending = [w for w in self.warmups if not w.done()]
        if not pending:
            return True
        done, _ = await asyncio.wait(pending, timeout=within)
        return len(done) == len(pending)

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
        self._load_skills()
        await self.store.open(migrate=settings.database.auto_migrate)
        try:
            for (platform, chat_id), chat_settings in (await self.store.chat_settings()).items():
                self._chat_settings[(platform, chat_id)] = chat_settings
            for entry in self.skills:
                setup = getattr(entry.skill, "setup", None)  # skills are duck-typed
                if setup is not None:
                    await _maybe_await(setup(self, entry.config))
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
        await self.begin_shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("stopping with %d messages still in flight", self._inflight)
        for result in call_lifecycle(self.pm, "shutdown", bot=self):
            try:
                await _maybe_await(result)
            except Exception:
                log.exception("a shutdown hook failed")
        await self.models.stop()
        await self.store.close()
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

    def _load_skills(self) -> None:
        settings = self.settings
        entries: list[SkillEntry] = []
        seen: set[str] = set()
        for reg in collect(self.pm, "register_skills"):
            skill = reg.obj
            check_skill(skill, reg.plugin)
            name = skill.name
            if name in seen:
                raise ConfigError(f"two plugins register a skill named {name!r}")
            seen.add(name)
            section = settings.skills.get(name)
            config = self._skill_config(skill, name, section)
            commands: dict[str, Command] = {}
            for cmd in getattr(skill, "commands", ()) or ():
                if isinstance(cmd, str):
                    cmd = Command(cmd)
                commands[cmd.name.lower()] = cmd
            entries.append(
                SkillEntry(
                    skill=skill,
                    name=name,
                    plugin=reg.plugin,
                    description=getattr(skill, "description", "") or "",
                    commands=commands,
                    priority=section.priority
                    if section and section.priority is not None
                    else getattr(skill, "priority", 0),
                    threshold=section.threshold
                    if section and section.threshold is not None
                    else getattr(skill, "threshold", 0.5),
                    timeout_s=(section.timeout_s if section and section.timeout_s else None)
                    or getattr(skill, "timeout_s", None)
                    or settings.bot.skill_timeout_s,
                    config=config,
                    enabled=section.enabled if section else True,
                    uses_model=bool(getattr(skill, "uses_model", False)),
                )
            )
        self.skills = entries
        self.router = Router([e for e in entries if e.enabled], settings.bot.fallback)
        if settings.bot.fallback and self.router.fallback is None:
            log.warning("fallback skill %r is not loaded", settings.bot.fallback)
        self.observers = collect(self.pm, "register_observers")
        self.filters = collect(self.pm, "register_reply_filters")
        for r in self.observers:
            check_observer(r.obj, r.plugin)
        for r in self.filters:
            check_filter(r.obj, r.plugin)
        # Observers and filters may read a [skills.<their name>] section too (e.g. safety).
        seen.update(getattr(r.obj, "name", "") for r in (*self.observers, *self.filters))
        for name in settings.skills:
            if name not in seen:
                log.warning(
                    "configuration has a [skills.%s] section but no such skill loaded", name
                )

    @staticmethod
    def _skill_config(skill: Any, name: str, section: Any) -> Any:
        model = getattr(skill, "config_model", None)
        options = section.options() if section is not None else {}
        if model is None:
            if options:
                keys = ", ".join(f"skills.{name}.{k}" for k in options)
                raise ConfigError(f"invalid configuration:\n  {keys}: unknown key")
            return None
        unknown = unknown_keys(model, options)
        if unknown:  # a typo must not pass silently, whatever the model's own setting
            keys = "\n  ".join(f"skills.{name}.{k}: unknown key" for k in unknown)
            raise ConfigError(f"invalid configuration:\n  {keys}")
        try:
            return model(**options)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, f"[skills.{name}]", prefix=f"skills.{name}")
            ) from None

    # -- queries skills use --------------------------------------------------------------------

    def add_admin(self, platform: str, user_id: str) -> None:
        """Grant admin rights for this process (tests, operator tooling); config is the default."""
        self._admins.setdefault(platform, set()).add(user_id)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return user_id in self._admins.get(platform, ())

    def skill(self, name: str) -> SkillEntry | None:
        return self.router.by_name.get(name) or next(
            (e for e in self.skills if e.name == name), None
        )

    def allowed(self, entry: SkillEntry, message: Message) -> bool:
        """Whether ``entry`` may answer in the message's chat (global and per-chat switches)."""
        if not entry.enabled:
            return False
        cfg = self.settings.chats.get(message.chat_key)
        if cfg is not None:
            if entry.name in cfg.disabled_skills:
                return False
            if cfg.enabled_skills is not None and entry.name not in cfg.enabled_skills:
                return False
        chat = self._chat_settings.get((message.platform, message.chat_id))
        return not (chat and entry.name in chat.get("disabled_skills", ()))

    def chat_settings(self, platform: str, chat_id: str) -> dict[str, Any]:
        """Settings stored for one chat (skill switches, ``/reset`` marks…); a copy."""
        return dict(self._chat_settings.get((platform, chat_id), {}))

    async def update_chat_settings(self, platform: str, chat_id: str, **changes: Any) -> None:
        """Merge ``changes`` into the chat's stored settings; survives restarts."""
        current = self.chat_settings(platform, chat_id)
        current.update(changes)
        await self.store.set_chat_settings(platform, chat_id, current)
        self._chat_settings[(platform, chat_id)] = current

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

    def warm_up_models(self) -> None:
        """Load the base model now, in the background (``chinwag run`` does this, so the first
        user does not wait for it and ``/readyz`` says when it is in)."""
        if not any(e.uses_model and e.enabled for e in self.skills):
            return

        async def load() -> None:
            try:
                await self.models.start()
            except Exception:
                log.exception("the model failed to load; model-backed skills will say so")

        self.warmups.append(asyncio.ensure_future(load()))

    async def escalate(self, event: Any) -> None:
        """Hand ``event`` (an :class:`~bot.messages.Escalation`) to every ``escalate`` hook."""
        for result in call_lifecycle(self.pm, "escalate", bot=self, event=event):
            try:
                await _maybe_await(result)
            except Exception:
                log.exception("an escalate hook failed")

    async def set_skill_enabled(
        self, platform: str, chat_id: str, skill: str, enabled: bool
    ) -> None:
        """Switch a skill on or off in one chat; stored, so it survives restarts."""
        current = dict(self._chat_settings.get((platform, chat_id), {}))
        disabled = set(current.get("disabled_skills", []))
        if enabled:
            disabled.discard(skill)
        else:
            disabled.add(skill)
        current["disabled_skills"] = sorted(disabled)
        await self.store.set_chat_settings(platform, chat_id, current)
        self._chat_settings[(platform, chat_id)] = current

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
                    return await self._handle(message, send)
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

    async def _handle(self, message: Message, send: Sender | None) -> list[Reply]:
        started = time.perf_counter()
        bot_settings = self.settings.bot
        text, original_length = clean_text(to_text(message.text), bot_settings.max_message_chars)
        message.text = text
        notices: list[Reply] = []
        if original_length > len(text) and original_length > bot_settings.max_message_chars:
            message.metadata["original_length"] = original_length
            message.metadata["truncated"] = True
            notices.append(
                Reply(
                    f"Your message was {original_length:,} characters long; "
                    f"I only read the first {bot_settings.max_message_chars:,}.",
                    kind="notice",
                    skill="core",
                )
            )
        stored = INBOUND_STORED.get()
        try:
            fresh = await self.store.log_inbound(message)
            if stored is not None and not stored.done():
                stored.set_result(True)
            if not fresh:
                log.info("ignoring redelivered message %s", message.dedup_key)
                return []
        except StoreError:
            if stored is not None and not stored.done():
                stored.set_result(False)
            log.exception("could not log an inbound message; not processing it")
            return await self._deliver(
                message,
                [
                    Reply(
                        "Sorry — I can't take messages right now. Please try again shortly.",
                        kind="error",
                        skill="core",
                    )
                ],
                send,
                log_outbound=False,
            )

        is_admin = self.is_admin(message.platform, message.user_id)
        rl = self.settings.rate_limit
        if rl.enabled and not is_admin and message.platform not in rl.exempt_platforms:
            verdict = self.rate_limiter.check(message.user_key)
            if verdict is Verdict.DROP:
                return []
            if verdict is Verdict.WARN:
                replies = [Reply(rl.message, kind="notice", skill="core:rate_limit")]
                return await self._finish(message, replies, started, send)

        replies = notices + await self._answer(message, is_admin)
        replies = await self._filter(replies, message, is_admin)
        return await self._finish(message, replies, started, send)

    async def _answer(self, message: Message, is_admin: bool) -> list[Reply]:
        if not message.text.strip():
            if message.attachments:
                text = "I can only read text messages for now — please type your question."
            else:
                text = "I got an empty message. Send me some text, or /help to see what I can do."
            return [Reply(text, kind="notice", skill="core")]

        if self.observers:
            await self._observe(message, is_admin)

        parsed = parse_command(message.text)
        command: str | None = None
        args = ""
        if parsed is not None:
            username = self.settings.bot.username
            if parsed.target and username and parsed.target.lower() != username.lower():
                return []  # a command for another bot in the same group
            entry = self.router.owner(parsed.name)
            if entry is None:
                return [self._unknown_command(parsed.name, message)]
            if not self.allowed(entry, message):
                return [
                    Reply(
                        f"/{parsed.name} is switched off in this chat.", kind="notice", skill="core"
                    )
                ]
            if entry.commands[parsed.name].admin_only and not is_admin:
                return [
                    Reply(
                        f"/{parsed.name} is for the bot's admins only.", kind="notice", skill="core"
                    )
                ]
            command, args = parsed.name, parsed.args
        match = None
        if parsed is None:
            found = await self.router.best(
                message, self.allowed, lambda e: self._context(e, is_admin)
            )
            entry, match = found if found is not None else (None, None)
            if entry is None:
                entry = self.router.fallback
                if entry is None or not self.allowed(entry, message):
                    return [
                        Reply(
                            "I don't have an answer for that. Send /help to see what I can do.",
                            kind="notice",
                            skill="core",
                        )
                    ]
        ctx = self._context(entry, is_admin, command, args)
        ctx.match = match
        return await self._run_skill(entry, message, ctx)

    def _context(
        self, entry: SkillEntry, is_admin: bool, command: str | None = None, args: str = ""
    ) -> Context:
        return Context(self, entry.config, command, args, is_admin)

    def _unknown_command(self, name: str, message: Message) -> Reply:
        known = [c for c, e in self.router.commands.items() if self.allowed(e, message)]
        close = suggest(name, known)
        hint = f" Did you mean {', '.join('/' + c for c in close)}?" if close else ""
        return Reply(
            f"I don't know the command /{name}.{hint} Send /help for the list.",
            kind="notice",
            skill="core",
        )

    async def _observe(self, message: Message, is_admin: bool) -> None:
        timeout = self.settings.bot.observer_timeout_s
        before = dict(message.metadata)
        ctx = Context(self, None, None, "", is_admin)
        for reg in self.observers:
            observer = reg.obj
            try:
                async with asyncio.timeout(timeout):
                    await observer.observe(message, ctx)
            except TimeoutError:
                log.warning(
                    "observer %s timed out after %.1fs",
                    getattr(observer, "name", reg.plugin),
                    timeout,
                )
            except Exception:
                log.exception("observer %s failed", getattr(observer, "name", reg.plugin))
        if message.metadata != before and message.id is not None:
            try:
                self.store.update_metadata_nowait(message.id, message.metadata)
            except StoreError:
                log.exception("could not store observer annotations")

    async def _run_skill(self, entry: SkillEntry, message: Message, ctx: Context) -> list[Reply]:
        t0 = time.perf_counter()
        # The model's deadline is a little earlier than the skill's: a reply cut there still
        # has time for the filters, the log and the send before the user's clock runs out.
        margin = min(1.5, 0.1 * entry.timeout_s)
        deadline = DEADLINE.set(time.monotonic() + entry.timeout_s - margin)
        try:
            async with asyncio.timeout(entry.timeout_s):
                if entry.uses_model:
                    async with self._semaphore:
                        result = await entry.skill.handle(message, ctx)
                else:
                    result = await entry.skill.handle(message, ctx)
            replies = _as_replies(result)
        except RuntimeBusy as exc:
            return [self._busy(entry, exc)]
        except Superseded:
            return [
                Reply(
                    self.settings.bot.superseded_notice,
                    kind="notice",
                    skill=entry.name,
                    metadata={"superseded": True},
                )
            ]
        except ShuttingDown:
            return [
                Reply(
                    self.settings.bot.shutdown_notice,
                    kind="notice",
                    skill=entry.name,
                    metadata={"error": "shutdown"},
                )
            ]
        except TimeoutError:
            if entry.uses_model and self.models.loading:
                # The first start converts the model (half a minute) and that work can starve
                # the loop so the skill's own limit fires before the runtime's "still
                # loading": the user gets the honest busy reply, not an apology.
                busy = RuntimeBusy("the model is still loading", retry_after_s=20.0)
                return [self._busy(entry, busy)]
            entry.stats["errors"] += 1
            log.error(
                "skill %s timed out after %.1fs (its limit: %.1fs)",
                entry.name,
                time.perf_counter() - t0,
                entry.timeout_s,
            )
            return [
                Reply(
                    self.settings.bot.timeout_apology,
                    kind="error",
                    skill=entry.name,
                    metadata={"error": "timeout", "timeout_s": entry.timeout_s},
                )
            ]
        except Exception as exc:
            entry.stats["errors"] += 1
            log.exception("skill %s failed on message %s", entry.name, message.id)
            return [
                Reply(
                    self.settings.bot.apology,
                    kind="error",
                    skill=entry.name,
                    metadata={"error": type(exc).__name__},
                )
            ]
        finally:
            DEADLINE.reset(deadline)
        entry.stats["handled"] += 1
        skill_ms = (time.perf_counter() - t0) * 1000
        for r in replies:
            if r.skill is None:
                r.skill = entry.name
            r.metadata.setdefault("skill_ms", round(skill_ms, 3))
        return replies

    def _busy(self, entry: SkillEntry, exc: RuntimeBusy) -> Reply:
        entry.stats["busy"] = entry.stats.get("busy", 0) + 1
        log.info("skill %s: model busy (%s)", entry.name, exc)
        return self.busy_reply(exc, entry.name)

    def busy_reply(self, exc: RuntimeBusy, skill: str) -> Reply:
        """The honest "I'm busy, try again in N s" a skill gives when the model can't answer
        in time (skills with a cheaper answer, like QA's quote, give that instead)."""
        seconds = max(1, math.ceil(exc.retry_after_s))
        return Reply(
            self.settings.bot.busy_message.replace("{seconds}", str(seconds)),
            kind="busy",
            skill=skill,
            metadata={"busy": True, "retry_after_s": seconds},
        )

    async def _filter(self, replies: list[Reply], message: Message, is_admin: bool) -> list[Reply]:
        if not self.filters or not replies:
            return replies
        timeout = self.settings.bot.filter_timeout_s
        ctx = Context(self, None, None, "", is_admin)
        out: list[Reply] = []
        for reply in replies:
            current: Reply | None = reply
            for reg in self.filters:
                if current is None:
                    break
                try:
                    async with asyncio.timeout(timeout):
                        current = await reg.obj.filter(current, message, ctx)
                except Exception:
                    # Filters guard what users see (safety, PII): fail closed.
                    log.exception("reply filter %s failed; reply withheld", reg.plugin)
                    current = Reply(
                        self.settings.bot.apology,
                        kind="error",
                        skill=reply.skill,
                        metadata={"error": "filter", "filter": reg.plugin},
                    )
                    break
            if current is not None:
                out.append(current)
        return out

    async def _finish(
        self, message: Message, replies: list[Reply], started: float, send: Sender | None
    ) -> list[Reply]:
        latency_ms = (time.perf_counter() - started) * 1000
        metrics = self.metrics
        metrics.messages.labels(message.platform).inc()
        for r in replies:
            r.latency_ms = latency_ms
            if r.reply_to is None:
                r.reply_to = message.message_id
            if r.skill is None:
                r.skill = "core"
            metrics.replies.labels(r.skill, r.kind).inc()
            metrics.latency.labels(r.skill).observe(latency_ms / 1000)
            if r.kind == "error":
                metrics.errors.labels(r.skill).inc()
        if replies:
            try:
                self.store.log_outbound_nowait(message, replies, latency_ms)
            except StoreError:
                log.exception("could not log replies to message %s", message.id)
        return await self._deliver(message, replies, send, log_outbound=True)

    async def _deliver(
        self, message: Message, replies: list[Reply], send: Sender | None, *, log_outbound: bool
    ) -> list[Reply]:
        if send is None or not replies:
            return replies
        try:
            await send(message, replies)
        except Exception as exc:
            log.exception("adapter failed to send replies to %s", message.chat_key)
            for r in replies:
                r.metadata["send_error"] = f"{type(exc).__name__}: {exc}"
        if log_outbound:
            for r in replies:
                if r.id is not None and (
                    "send_error" in r.metadata or "platform_message_id" in r.metadata
                ):
                    try:
                        pmid = r.metadata.get("platform_message_id")
                        await self.store.update_metadata(
                            r.id,
                            self.store.reply_meta(r) or {},
                            None if pmid is None else str(pmid),
                        )
                    except StoreError:
                        log.exception("could not record delivery of reply %s", r.id)
        return replies
