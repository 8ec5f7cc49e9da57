"""The pipeline one message goes through, step by step (docs/architecture.md).

clean the text → log it durably (and drop redeliveries) → rate-limit → observers → route →
run the skill under its timeout (and, for model skills, the concurrency bound) → reply filters
→ log the replies → hand them to the adapter. What each step does when it fails is decided
here: a skill that raises or hangs gets the apology, a busy model the honest "busy" reply, a
filter that fails withholds the reply (fail closed), a store that is down refuses the message
rather than lose it silently.

:class:`bot.core.Bot` owns the lifecycle and the per-chat ordering around it; this module owns
no state of its own beyond what it is given.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from bot.chats import ChatPolicy
from bot.config import Settings
from bot.messages import Message, Reply
from bot.metrics import Metrics
from bot.models.types import DEADLINE, RuntimeBusy, ShuttingDown, Superseded
from bot.plugins import Loaded
from bot.ratelimit import RateLimiter, Verdict
from bot.router import SkillEntry, parse_command, suggest
from bot.sanitize import clean_text, to_text
from bot.services import BotServices
from bot.skill import INBOUND_STORED, Context
from bot.store import ConversationStore, StoreError

log = logging.getLogger(__name__)

#: ``send(message, replies)``: an adapter's way of delivering replies; it may set
#: ``reply.metadata["platform_message_id"]`` so feedback on that message can be traced back.
Sender = Callable[[Message, list[Reply]], Awaitable[None]]


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


def busy_reply(settings: Settings, exc: RuntimeBusy, skill: str) -> Reply:
    """The honest "I'm busy, try again in N s" a skill gives when the model can't answer in
    time (skills with a cheaper answer, like QA's quote, give that instead)."""
    seconds = max(1, math.ceil(exc.retry_after_s))
    return Reply(
        settings.bot.busy_message.replace("{seconds}", str(seconds)),
        kind="busy",
        skill=skill,
        metadata={"busy": True, "retry_after_s": seconds},
    )


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ConversationStore,
        chats: ChatPolicy,
        services: BotServices,
        loaded: Loaded,
        models: Any,
        metrics: Metrics,
        rate_limiter: RateLimiter,
        semaphore: asyncio.Semaphore,
    ) -> None:
        self.settings = settings
        self.store = store
        self.chats = chats
        self.services = services
        self.loaded = loaded
        self.models = models
        self.metrics = metrics
        self.rate_limiter = rate_limiter
        self.semaphore = semaphore

    async def run(self, message: Message, send: Sender | None) -> list[Reply]:
        """Every step after the message's turn in its chat has come (see the module)."""
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

        is_admin = self.chats.is_admin(message.platform, message.user_id)
        rl = self.settings.rate_limit
        if rl.enabled and not is_admin and message.platform not in rl.exempt_platforms:
            verdict = self.rate_limiter.check(message.user_key)
            if verdict is Verdict.DROP:
                return []
            if verdict is Verdict.WARN:
                replies = [Reply(rl.message, kind="notice", skill="core:rate_limit")]
                return await self._finish(message, replies, started, send)

        # One context per message: what an observer leaves in ``extras`` the skill and the
        # filters of the same message see (each step gets its own view of config and match).
        base = Context(self.services, is_admin=is_admin)
        replies = notices + await self._answer(message, base)
        replies = await self._filter(replies, message, base)
        return await self._finish(message, replies, started, send)

    async def _answer(self, message: Message, base: Context) -> list[Reply]:
        is_admin = base.is_admin
        if not message.text.strip():
            if message.attachments:
                text = "I can only read text messages for now — please type your question."
            else:
                text = "I got an empty message. Send me some text, or /help to see what I can do."
            return [Reply(text, kind="notice", skill="core")]

        if self.loaded.observers:
            await self._observe(message, base)

        parsed = parse_command(message.text)
        command: str | None = None
        args = ""
        if parsed is not None:
            username = self.settings.bot.username
            if parsed.target and username and parsed.target.lower() != username.lower():
                return []  # a command for another bot in the same group
            entry = self.loaded.router.owner(parsed.name)
            if entry is None:
                return [self._unknown_command(parsed.name, message)]
            if not self.chats.allowed(entry, message):
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
            found = await self.loaded.router.best(
                message, self.chats.allowed, lambda e: self._context(base, e)
            )
            entry, match = found if found is not None else (None, None)
            if entry is None:
                entry = self.loaded.router.fallback
                if entry is None or not self.chats.allowed(entry, message):
                    return [
                        Reply(
                            "I don't have an answer for that. Send /help to see what I can do.",
                            kind="notice",
                            skill="core",
                        )
                    ]
        assert entry is not None  # a command's owner, the best scorer or the fallback
        ctx = self._context(base, entry, command, args, match)
        return await self._run_skill(entry, message, ctx)

    @staticmethod
    def _context(
        base: Context,
        entry: SkillEntry,
        command: str | None = None,
        args: str = "",
        match: Any = None,
    ) -> Context:
        """The message's context as one skill sees it: its own configuration and match, the
        message's shared ``extras``."""
        return replace(base, config=entry.config, command=command, args=args, match=match)

    def _unknown_command(self, name: str, message: Message) -> Reply:
        commands = self.loaded.router.commands
        known = [c for c, e in commands.items() if self.chats.allowed(e, message)]
        close = suggest(name, known)
        hint = f" Did you mean {', '.join('/' + c for c in close)}?" if close else ""
        return Reply(
            f"I don't know the command /{name}.{hint} Send /help for the list.",
            kind="notice",
            skill="core",
        )

    async def _observe(self, message: Message, ctx: Context) -> None:
        timeout = self.settings.bot.observer_timeout_s
        before = dict(message.metadata)
        for reg in self.loaded.observers:
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
                    async with self.semaphore:
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
        return busy_reply(self.settings, exc, entry.name)

    async def _filter(self, replies: list[Reply], message: Message, ctx: Context) -> list[Reply]:
        if not self.loaded.filters or not replies:
            return replies
        timeout = self.settings.bot.filter_timeout_s
        out: list[Reply] = []
        for reply in replies:
            current: Reply | None = reply
            for reg in self.loaded.filters:
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
