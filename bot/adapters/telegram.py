"""Telegram through aiogram 3: long polling, replies threaded to what they answer, 👍/👎 buttons.

The adapter turns aiogram updates into the core's :class:`~bot.messages.Message` and the core's
replies into ``sendMessage`` calls; no skill knows it serves Telegram. What Telegram imposes is
handled here:

- 4,096 characters per message: longer replies are split at paragraph, then sentence, then word
  boundaries, code fences kept balanced in every piece;
- formatting as message entities, never a parse mode, so user text can never break markup: a
  fenced code block (documentation answers quote commands and code) is sent as a ``pre``
  entity — Telegram shows it as code, not as three backticks around a line; where Telegram
  refuses the entities, the same text goes out plain rather than not at all;
- rate limits: a 429 is waited out for its ``retry_after`` and retried, 5xx and network errors
  retried with backoff (tenacity); sends to one chat are paced (``min_interval_s``);
- redelivered updates are answered once (the core de-duplicates by chat and message id);
- in groups the bot answers commands, mentions and replies to its own messages only;
- stickers, photos, voice… get a polite "I read text only" instead of silence.

The Bot API base URL is configurable (``telegram.api_base``) for self-hosted Bot API servers —
and for the local stand-in server the tests drive the real aiogram client against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiogram import Bot as TelegramBot
from aiogram import Dispatcher, F
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import PRODUCTION, TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.types import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    ReplyParameters,
    Update,
)
from aiogram.types import Message as TelegramMessage
from aiogram.utils.formatting import Pre, Text
from aiohttp import web
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from bot.adapters.draft import Draft
from bot.adapters.text import split_markdown
from bot.config import ConfigError
from bot.core import Bot
from bot.messages import Attachment, Message, Reply
from bot.skill import INBOUND_STORED

log = logging.getLogger(__name__)
PLATFORM = "telegram"
LIMIT = 4096
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]
TEXT_ONLY = "I read text only for now — please type your message. Send /help to see what I can do."


#: A fenced block as the core's replies write it (bot/adapters/text.py keeps them balanced).
_FENCED = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def split_text(text: str, limit: int = LIMIT) -> list[str]:
    """Telegram-sized pieces, each with its code fences closed."""
    return split_markdown(text, limit)


def formatted(piece: str) -> dict[str, Any]:
    """``text`` and ``entities`` for one piece: fenced code blocks become ``pre`` entities.

    Entities rather than ``parse_mode``: with MarkdownV2 or HTML every ``_``, ``*`` or ``<`` a
    user or a document wrote would need escaping, and one missed would lose the message.
    aiogram's formatting nodes count the offsets in UTF-16 units, as Telegram does.
    """
    nodes: list[Any] = []
    at = 0
    for m in _FENCED.finditer(piece):
        nodes.append(piece[at : m.start()])
        code = m.group(2).rstrip("\n")
        if code.strip():
            nodes.append(Pre(code, language=m.group(1).strip() or None))
        at = m.end()
    if not nodes:
        return {"text": piece, "entities": None}
    nodes.append(piece[at:])
    made = Text(*nodes).as_kwargs()
    return {
        "text": made["text"] if made["text"].strip() else "…",
        "entities": made["entities"] or None,
    }


class TelegramAdapter:
    platform = PLATFORM

    def __init__(
        self,
        bot: Bot,
        token: str,
        *,
        api_base: str | None = None,
        min_interval_s: float = 1.0,
        group_interval_s: float = 3.0,
        retries: int = 5,
        polling_timeout: int = 30,
        webhook: dict[str, Any] | None = None,
        edited: str = "ignore",
        stream: bool = True,
        stream_interval_s: float = 1.5,
    ) -> None:
        self.bot = bot
        api = TelegramAPIServer.from_base(api_base) if api_base else PRODUCTION
        self.tg = TelegramBot(token, session=AiohttpSession(api=api))
        self.dp = Dispatcher()
        self.dp.message.register(self.on_message)
        self.dp.callback_query.register(self.on_feedback, F.data.startswith("fb:"))
        if edited == "rehandle":
            self.dp.edited_message.register(self.on_message)
        self.min_interval_s = min_interval_s
        self.group_interval_s = group_interval_s
        #: Private chats see a generated reply grow: the first words as soon as they exist,
        #: then edits at most every ``stream_interval_s`` (under Telegram's edit limits).
        self.stream = stream
        self.stream_interval_s = stream_interval_s
        self.retries = retries
        self.polling_timeout = polling_timeout
        self.me: Any = None
        self._next_send: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        #: ``{"url", "host", "port", "path", "secret", "max_connections"}`` for webhook mode.
        self.webhook = webhook
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.me = await self._call(self.tg.get_me)
        if self.me.username and not self.bot.settings.bot.username:
            self.bot.settings.bot.username = self.me.username
        commands = [
            BotCommand(command=name, description=(cmd.description or name)[:256])
            for name, entry in sorted(self.bot.router.commands.items())
            for cmd in [entry.commands[name]]
            if not cmd.admin_only and re.fullmatch(r"[a-z0-9_]{1,32}", name)
        ]
        await self._call(self.tg.set_my_commands, commands=commands)
        self.bot.outboxes[PLATFORM] = self.push
        if self.webhook is not None:
            await self._start_webhook(self.webhook)
            return
        self._task = asyncio.create_task(self._poll(), name="telegram-polling")
        log.info("Telegram: polling as @%s", self.me.username)

    async def _poll(self) -> None:
        """Long polling that acknowledges updates only once they are stored.

        Telegram considers updates below ``offset`` delivered; the next ``getUpdates`` carries
        the new offset only after every update of this batch has its inbound row committed (a
        few milliseconds — skills run on, concurrently). A crash in between means redelivery,
        which the core answers once. (aiogram's own polling advances the offset first.)
        """
        offset: int | None = None
        while True:
            try:
                updates = await self._call(
                    self.tg.get_updates,
                    offset=offset,
                    timeout=self.polling_timeout,
                    allowed_updates=ALLOWED_UPDATES,
                    request_timeout=self.polling_timeout + 15,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Telegram: getUpdates failed; retrying in 2 s")
                await asyncio.sleep(2)
                continue
            acks = []
            for update in updates:
                acks.append(self._dispatch(update))
                offset = update.update_id + 1
            if acks:
                await asyncio.gather(
                    *(asyncio.wait_for(asyncio.shield(a), 30) for a in acks),
                    return_exceptions=True,
                )

    def _dispatch(self, update: Update) -> asyncio.Future[bool]:
        """Handle ``update`` in its own task; the future resolves once it is stored."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        token = INBOUND_STORED.set(stored)
        try:
            task = asyncio.create_task(self.dp.feed_update(self.tg, update))
        finally:
            INBOUND_STORED.reset(token)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        # Updates the core never stores (a button press, a group message not for us) count as
        # acknowledged once handled.
        task.add_done_callback(lambda _t: None if stored.done() else stored.set_result(True))
        return stored

    async def _start_webhook(self, hook: dict[str, Any]) -> None:
        if not hook.get("secret") or not hook.get("url"):
            raise ConfigError(
                "telegram.mode is 'webhook' but telegram.webhook_url or telegram.webhook_secret "
                "is not set"
            )
        app = web.Application()
        app.router.add_post(hook["path"], self._on_webhook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, hook["host"], hook["port"]).start()
        await self._call(
            self.tg.set_webhook,
            url=hook["url"],
            secret_token=hook["secret"],
            max_connections=hook.get("max_connections", 40),
            allowed_updates=ALLOWED_UPDATES,
        )
        log.info("Telegram: webhook %s as @%s", hook["url"], self.me.username)

    async def _on_webhook(self, request: web.Request) -> web.Response:
        """Acknowledge an update only once its message is stored (or it needed no storing).

        Telegram redelivers unacknowledged updates; the core answers a redelivery once.
        """
        assert self.webhook is not None
        given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not hmac.compare_digest(given.encode(), str(self.webhook["secret"]).encode()):
            return web.Response(status=401, text="wrong secret token")
        try:
            update = Update.model_validate(await request.json(), context={"bot": self.tg})
        except (ValueError, ValidationError):
            return web.Response(status=400, text="not a Telegram update")
        stored = self._dispatch(update)
        try:
            ok = await asyncio.wait_for(asyncio.shield(stored), 30)
        except TimeoutError:
            ok = False
        return web.Response(status=200 if ok else 503)

    async def stop(self) -> None:
        self.bot.outboxes.pop(PLATFORM, None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._task is not None:
            self._task.cancel()  # stops taking updates; handled ones finish below
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.tg.session.close()

    # -- inbound ---------------------------------------------------------------------------------

    def _addressed(self, msg: TelegramMessage) -> tuple[bool, bool, bool]:
        """(answer it?, mentions the bot?, replies to the bot?)"""
        username = (self.me.username or "").lower() if self.me else ""
        text = (msg.text or msg.caption or "").lower()
        mentioned = bool(username) and f"@{username}" in text
        to_bot = bool(
            msg.reply_to_message
            and msg.reply_to_message.from_user
            and self.me
            and msg.reply_to_message.from_user.id == self.me.id
        )
        if msg.chat.type == "private":
            return True, mentioned, to_bot
        return text.startswith("/") or mentioned or to_bot, mentioned, to_bot

    async def on_message(self, msg: TelegramMessage) -> None:
        answer, mentioned, to_bot = self._addressed(msg)
        if not answer or msg.from_user is None:
            return
        text = msg.text
        if text is None:
            await self._send(msg.chat.id, TEXT_ONLY, msg.message_id)
            return
        if mentioned and self.me and self.me.username:
            text = re.sub(rf"@{re.escape(self.me.username)}\b", "", text, flags=re.I).strip()
        # An edit keeps its message id: key it by the edit time so it is handled, once.
        message_id = str(msg.message_id) + (f":edit:{msg.edit_date}" if msg.edit_date else "")
        message = Message(
            PLATFORM,
            str(msg.chat.id),
            str(msg.from_user.id),
            text,
            message_id=message_id,
            user_name=msg.from_user.full_name,
            chat_kind="private" if msg.chat.type == "private" else "group",
            chat_title=msg.chat.title or "",
            reply_to=str(msg.reply_to_message.message_id) if msg.reply_to_message else None,
            reply_to_bot=to_bot,
            mentions_bot=mentioned,
            attachments=[Attachment("photo")] if msg.photo else [],
        )
        typing = asyncio.create_task(self._typing(msg.chat.id))
        draft = self._draft(msg.chat.id, msg.message_id) if self._streams(msg) else None
        try:
            if draft is None:
                await self.bot.handle(message, send=self.send)
            else:
                await self.bot.handle(
                    message, send=lambda m, r: self.send(m, r, draft), on_token=draft.add
                )
        finally:
            typing.cancel()
            if draft is not None:
                await draft.close()

    def _streams(self, msg: TelegramMessage) -> bool:
        return self.stream and msg.chat.type == "private"

    def _draft(self, chat_id: int, reply_to: int) -> Draft[int]:
        """A reply growing in one message (edits paced at ``stream_interval_s``; a 429 is
        waited out by ``_call``)."""

        async def post(text: str) -> int:
            return (await self._send(chat_id, text, reply_to)).message_id

        async def edit(message_id: int, text: str) -> None:
            await self._call(
                self.tg.edit_message_text, chat_id=chat_id, message_id=message_id, text=text
            )

        async def delete(message_id: int) -> None:
            await self._call(self.tg.delete_message, chat_id=chat_id, message_id=message_id)

        return Draft(
            post, edit, delete, interval_s=self.stream_interval_s, limit=LIMIT, platform="Telegram"
        )

    async def _finish(self, draft: Draft[int], chat_id: int, reply: Reply) -> Any:
        """Edit the draft into ``reply`` (further pieces follow as new messages); ``None``
        when it can't be, and the reply is sent the ordinary way."""
        pieces = split_text(reply.text) or ["…"]
        markup = self._markup(reply)
        edited = await draft.finish(
            lambda message_id: self._formatted(
                self.tg.edit_message_text,
                pieces[0],
                chat_id=chat_id,
                message_id=message_id,
                reply_markup=markup if len(pieces) == 1 else None,
            )
        )
        if edited is None:
            return None
        last = edited if not isinstance(edited, bool) else None
        for i, piece in enumerate(pieces[1:], start=1):
            await self._pace(chat_id)
            last = await self._formatted(
                self.tg.send_message,
                piece,
                chat_id=chat_id,
                reply_markup=markup if i == len(pieces) - 1 else None,
            )
        return last if last is not None else _Sent(draft.handle)

    async def _typing(self, chat_id: int) -> None:
        """ "typing…" while a skill works (Telegram shows it for ~5 s per call).

        Not aiogram's ``ChatActionSender``: a failed call ends its task with an exception
        nobody retrieves, and leaving it waits for a call in flight; typing is decoration, so
        here a failure is ignored and the end of the work cancels it at once."""
        with contextlib.suppress(Exception):
            while True:
                await self.tg.send_chat_action(chat_id, "typing")
                await asyncio.sleep(4.5)

    async def on_feedback(self, cb: CallbackQuery) -> None:
        try:
            _, reply_id, rating = (cb.data or "").split(":")
            recorded = await self.bot.record_feedback(
                PLATFORM,
                str(cb.from_user.id),
                int(rating),
                reply_id=int(reply_id),
                chat_id=str(cb.message.chat.id) if cb.message is not None else None,
            )
        except (ValueError, TypeError, OverflowError):
            recorded = None
        if recorded is None:
            await self._call(cb.answer, "Sorry, I couldn't record that.")
            return
        await self._call(cb.answer, "Thanks for the feedback!")
        if cb.message is not None:
            with contextlib.suppress(Exception):
                await self._call(
                    self.tg.edit_message_reply_markup,
                    chat_id=cb.message.chat.id,
                    message_id=cb.message.message_id,
                    reply_markup=None,
                )

    # -- outbound --------------------------------------------------------------------------------

    async def send(
        self, message: Message, replies: list[Reply], draft: Draft[int] | None = None
    ) -> None:
        chat_id = int(message.chat_id)
        reply_to = int(message.message_id.split(":")[0]) if message.message_id else None
        for reply in replies:
            sent = None
            if draft is not None:
                await draft.settle()
            if draft is not None and draft.posted:
                # The streamed draft becomes this reply: one message, edited to the final text
                # (also when a filter replaced it: the partial text must not stay on screen).
                sent = await self._finish(draft, chat_id, reply)
                draft = None
            if sent is None:
                sent = await self._send(chat_id, reply.text, reply_to, reply)
            if sent is not None:
                reply.metadata["platform_message_id"] = str(sent.message_id)

    @staticmethod
    def _markup(reply: Reply) -> InlineKeyboardMarkup | None:
        if not (reply.rateable and reply.id):
            return None
        return InlineKeyboardMarkup(
            inline_keyboard=[
                [
                    InlineKeyboardButton(text="👍", callback_data=f"fb:{reply.id}:1"),
                    InlineKeyboardButton(text="👎", callback_data=f"fb:{reply.id}:-1"),
                ]
            ]
        )

    async def push(self, chat_id: str, reply: Reply) -> None:
        await self._send(int(chat_id), reply.text, None, reply)

    async def _send(
        self, chat_id: int, text: str, reply_to: int | None, reply: Reply | None = None
    ) -> Any:
        pieces = split_text(text) or ["…"]
        last = None
        for i, piece in enumerate(pieces):
            markup = None
            if reply is not None and i == len(pieces) - 1:
                markup = self._markup(reply)
            await self._pace(chat_id)
            last = await self._formatted(
                self.tg.send_message,
                piece,
                chat_id=chat_id,
                reply_parameters=ReplyParameters(
                    message_id=reply_to, allow_sending_without_reply=True
                )
                if reply_to and i == 0
                else None,
                reply_markup=markup,
            )
        return last

    async def _formatted(self, fn: Any, piece: str, **kwargs: Any) -> Any:
        """``fn`` (send or edit) with ``piece`` as text and entities; plain text where
        Telegram refuses the entities ("can't parse entities"): the message matters more than
        its code block."""
        made = formatted(piece)
        if made["entities"] is None:
            return await self._call(fn, text=piece, **kwargs)
        try:
            return await self._call(fn, **made, **kwargs)
        except TelegramBadRequest as exc:
            log.warning("Telegram refused the reply's formatting (%s); sending it plain", exc)
            return await self._call(fn, text=piece, **kwargs)

    async def _pace(self, chat_id: int) -> None:
        """At most one message per ``min_interval_s`` per chat (groups: ``group_interval_s``)."""
        interval = self.group_interval_s if chat_id < 0 else self.min_interval_s
        now = time.monotonic()
        at = max(now, self._next_send.get(chat_id, 0.0))
        self._next_send[chat_id] = at + interval
        if at > now:
            await asyncio.sleep(at - now)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the Bot API: 429 waited out, 5xx and network errors retried with backoff."""
        for attempt in range(self.retries + 1):
            try:
                async for retry in AsyncRetrying(
                    retry=retry_if_exception_type((TelegramServerError, TelegramNetworkError)),
                    wait=wait_exponential(multiplier=0.2, max=10) + wait_random(0, 0.2),
                    stop=stop_after_attempt(self.retries + 1),
                    reraise=True,
                ):
                    with retry:
                        return await fn(*args, **kwargs)
            except TelegramRetryAfter as exc:
                if attempt == self.retries:
                    raise
                log.warning("Telegram asks to wait %ss (429)", exc.retry_after)
                await asyncio.sleep(exc.retry_after)
        raise AssertionError("unreachable")


@dataclass(slots=True)
class _Sent:
    message_id: int | None
