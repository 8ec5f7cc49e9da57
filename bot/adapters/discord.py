"""Discord through discord.py: the gateway client, slash commands, 👍/👎 reactions.

The adapter turns discord.py events into the core's :class:`~bot.messages.Message` and the core's
replies into channel messages; no skill knows it serves Discord. What Discord imposes is handled
here or by discord.py itself:

- the bot answers in DMs, when mentioned, when someone replies to one of its messages, in threads
  it started, and everywhere in ``open_channels``; ``channels`` (when set) is an allow-list of
  guild channels — their threads included — outside which it stays silent;
- message content needs the privileged *message content* intent: a bot without it is told so at
  start, in words, rather than receiving empty messages;
- skills' commands become slash commands (``app_commands``), synced at start — globally, or to
  one guild for instant updates while developing; admin-only commands stay typed-only;
- 2,000 characters per message: replies are split at paragraph, sentence, then word boundaries,
  with code fences closed and reopened across a cut;
- replies never ping anyone (``AllowedMentions.none()``): text a user got the bot to repeat
  cannot turn into ``@everyone``;
- model-generated replies get 👍/👎 reactions; a user's click on one becomes a feedback row;
- rate limits (429 with ``retry_after``, the global bucket), 5xx retries and gateway reconnects
  and resumes are discord.py's own, which follows Discord's rules more closely than a wrapper
  could; large bots shard with ``AutoShardedClient`` (``sharded = true``).

The REST base URL and gateway URL are configurable for API proxies (and for the local stand-in
the tests drive the real client against). discord.py reads both from class attributes, so they
apply to the whole process — one Discord bot per process, which is how it runs anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.adapters.draft import Draft
from bot.adapters.text import split_markdown
from bot.config import ConfigError
from bot.core import Bot
from bot.messages import Attachment, Message, Reply

log = logging.getLogger(__name__)
PLATFORM = "discord"
LIMIT = 2000
RATINGS = {"👍": 1, "👎": -1}
TEXT_ONLY = "I read text only for now — please type your message. Try /help to see what I can do."
_COMMAND_NAME = re.compile(r"[-_a-z0-9]{1,32}")


class DiscordAdapter:
    platform = PLATFORM

    def __init__(
        self,
        bot: Bot,
        token: str,
        *,
        api_base: str | None = None,
        gateway_url: str | None = None,
        channels: list[int] | None = None,
        open_channels: list[int] | None = None,
        answer_in_own_threads: bool = True,
        sync_commands: bool = True,
        command_guild: int | None = None,
        sharded: bool = False,
        shard_count: int | None = None,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
        stream: bool = True,
        stream_interval_s: float = 1.5,
    ) -> None:
        self.bot = bot
        self.token = token
        self.api_base = api_base
        self.gateway_url = gateway_url
        self.channels = set(channels or [])
        self.open_channels = set(open_channels or [])
        self.answer_in_own_threads = answer_in_own_threads
        self.sync_commands = sync_commands
        self.command_guild = command_guild
        self.ready_timeout = ready_timeout
        #: Generated replies are posted as soon as their first words exist and edited as they
        #: grow, at most every ``stream_interval_s``.
        self.stream = stream
        self.stream_interval_s = stream_interval_s
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the Developer Portal
        options: dict[str, Any] = {
            "intents": intents,
            "allowed_mentions": discord.AllowedMentions.none(),
            "guild_ready_timeout": guild_ready_timeout,
        }
        if sharded:
            self.client: discord.Client = discord.AutoShardedClient(
                shard_count=shard_count, **options
            )
        else:
            self.client = discord.Client(**options)
        self.tree = app_commands.CommandTree(self.client)
        for handler in (self.on_message, self.on_raw_reaction_add):
            self.client.event(handler)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._saved_urls: tuple[str, yarl.URL] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._point_at_servers()
        try:
            await self.client.login(self.token)
        except discord.LoginFailure as exc:
            raise ConfigError(f"discord.token was refused by Discord: {exc}") from exc
        self._register_commands()
        if self.sync_commands:
            guild = discord.Object(self.command_guild) if self.command_guild else None
            try:
                synced = await self.tree.sync(guild=guild)
                log.info("Discord: %d slash commands synced", len(synced))
            except discord.HTTPException:
                log.exception("Discord: slash commands could not be synced; typed ones still work")
        self._task = asyncio.create_task(self.client.connect(reconnect=True), name="discord")
        ready = asyncio.create_task(self.client.wait_until_ready())
        done, _ = await asyncio.wait(
            {self._task, ready}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            failure = self._task.exception() if self._task in done else None
            await self.stop()
            if isinstance(failure, discord.PrivilegedIntentsRequired):
                raise ConfigError(
                    "Discord refused the message content intent: enable 'Message Content Intent' "
                    "for this bot under Bot → Privileged Gateway Intents in the Developer Portal"
                ) from failure
            raise ConfigError(f"Discord gateway did not become ready: {failure or 'timed out'}")
        self.bot.outboxes[PLATFORM] = self.push
        log.info("Discord: connected as %s", self.client.user)

    def _point_at_servers(self) -> None:
        if self.api_base or self.gateway_url:
            self._saved_urls = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
        if self.api_base:
            Route.BASE = self.api_base.rstrip("/")
        if self.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    async def stop(self) -> None:
        """In-flight replies finish (messages arriving meanwhile too), then the gateway closes."""
        self.bot.outboxes.pop(PLATFORM, None)
        for _ in range(3):  # a message that arrived while waiting is waited for as well
            if not self._inflight:
                break
            await asyncio.wait(set(self._inflight), timeout=30)
        await self.client.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
            self._task = None
        if self._saved_urls is not None:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = self._saved_urls
            self._saved_urls = None

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    # -- slash commands --------------------------------------------------------------------------

    def _register_commands(self) -> None:
        """One slash command per skill command, with an optional free-text argument."""
        self.tree.clear_commands(guild=None)
        for name, entry in sorted(self.bot.router.commands.items()):
            cmd = entry.commands[name]
            if cmd.admin_only or not _COMMAND_NAME.fullmatch(name):
                continue

            @app_commands.describe(text="What to say to the command (optional)")
            async def run(interaction: discord.Interaction, text: str | None = None) -> None:
                await self.on_command(interaction, text)

            self.tree.add_command(
                app_commands.Command(
                    name=name, description=(cmd.description or name)[:100], callback=run
                ),
                guild=discord.Object(self.command_guild) if self.command_guild else None,
            )

    async def on_command(self, interaction: discord.Interaction, text: str | None) -> None:
        self._track()
        assert interaction.command is not None
        # Discord wants an answer within 3 s; "thinking…" buys the skill 15 minutes.
        await interaction.response.defer(thinking=True)
        message = Message(
            PLATFORM,
            str(interaction.channel_id),
            str(interaction.user.id),
            f"/{interaction.command.name} {text or ''}".strip(),
            message_id=f"slash:{interaction.id}",
            user_name=interaction.user.display_name,
            chat_kind="private" if interaction.guild_id is None else "group",
            chat_title=_title(interaction.channel),
        )
        replies = await self.bot.handle(
            message, send=functools.partial(self._send_followups, interaction)
        )
        if not replies:
            await interaction.followup.send("Done.", ephemeral=True)

    async def _send_followups(
        self, interaction: discord.Interaction, message: Message, replies: list[Reply]
    ) -> None:
        for reply in replies:
            last = None
            for piece in split_markdown(reply.text, LIMIT) or ["…"]:
                last = await interaction.followup.send(piece, wait=True)
            if last is not None:
                await self._offer_rating(last, reply)

    # -- inbound ---------------------------------------------------------------------------------

    def _addressed(self, msg: discord.Message) -> tuple[bool, bool, bool]:
        """(answer it?, mentions the bot?, replies to the bot?)"""
        me = self.client.user
        assert me is not None
        mentioned = any(u.id == me.id for u in msg.mentions)
        ref = msg.reference.resolved if msg.reference else None
        to_bot = isinstance(ref, discord.Message) and ref.author.id == me.id
        if msg.guild is None:
            return True, mentioned, to_bot
        channel = msg.channel
        home = channel.parent_id if isinstance(channel, discord.Thread) else channel.id
        if self.channels and channel.id not in self.channels and home not in self.channels:
            return False, mentioned, to_bot
        own_thread = (
            self.answer_in_own_threads
            and isinstance(channel, discord.Thread)
            and channel.owner_id == me.id
        )
        open_channel = channel.id in self.open_channels or home in self.open_channels
        return mentioned or to_bot or own_thread or open_channel, mentioned, to_bot

    async def on_message(self, msg: discord.Message) -> None:
        if msg.author.bot or msg.webhook_id is not None or self.client.user is None:
            return  # never talk to bots (ourselves included): two bots can loop forever
        answer, mentioned, to_bot = self._addressed(msg)
        if not answer:
            return
        self._track()
        me = self.client.user
        text = re.sub(rf"<@!?{me.id}>", "", msg.content).strip() if mentioned else msg.content
        if not text.strip():
            if msg.attachments or msg.stickers:
                await self._send(msg.channel, TEXT_ONLY, reference=msg)
            return
        message = Message(
            PLATFORM,
            str(msg.channel.id),
            str(msg.author.id),
            text,
            message_id=str(msg.id),
            user_name=msg.author.display_name,
            chat_kind="private" if msg.guild is None else "group",
            chat_title=_title(msg.channel),
            reply_to=str(msg.reference.message_id)
            if msg.reference and msg.reference.message_id
            else None,
            reply_to_bot=to_bot,
            mentions_bot=mentioned,
            sent_at=msg.created_at,
            attachments=[
                Attachment("file", a.content_type, a.size, a.filename, a.url)
                for a in msg.attachments
            ],
        )
        typing = asyncio.create_task(self._typing(msg.channel))
        draft = self._draft(msg) if self.stream else None
        try:
            if draft is None:
                await self.bot.handle(message, send=functools.partial(self.send, msg))
            else:
                await self.bot.handle(
                    message, send=functools.partial(self.send, msg, draft=draft), on_token=draft.add
                )
        finally:
            typing.cancel()
            if draft is not None:
                await draft.close()

    async def _typing(self, channel: Any) -> None:
        """ "is typing…" while a skill works (Discord shows it for ~10 s per call).

        Not ``async with channel.typing()``: its first call is awaited and raises into the
        handler (a 429 or a missing permission would cost the reply); typing is decoration."""
        with contextlib.suppress(Exception):
            while True:
                await channel.typing()
                await asyncio.sleep(8)

    async def on_raw_reaction_add(self, event: discord.RawReactionActionEvent) -> None:
        """A 👍/👎 on one of our rateable replies becomes a feedback row."""
        rating = RATINGS.get(str(event.emoji))
        me = self.client.user
        if rating is None or me is None or event.user_id == me.id:
            return
        await self.bot.record_feedback(
            PLATFORM,
            str(event.user_id),
            rating,
            chat_id=str(event.channel_id),
            platform_message_id=str(event.message_id),
        )

    # -- outbound --------------------------------------------------------------------------------

    async def send(
        self,
        original: discord.Message,
        message: Message,
        replies: list[Reply],
        draft: Draft[discord.Message] | None = None,
    ) -> None:
        for reply in replies:
            sent = None
            if draft is not None:
                await draft.settle()
                if draft.posted:
                    # The streamed draft becomes this reply, edited to the final text (also when
                    # a filter replaced it: the partial text must not stay on screen).
                    sent = await self._finish(draft, original.channel, reply)
                draft = None
            if sent is None:
                await self._send(original.channel, reply.text, reference=original, reply=reply)

    def _draft(self, original: discord.Message) -> Draft[discord.Message]:
        async def post(text: str) -> discord.Message:
            return await original.channel.send(
                text,
                reference=original.to_reference(fail_if_not_exists=False),
                mention_author=False,
            )

        async def edit(sent: discord.Message, text: str) -> None:
            await sent.edit(content=text)

        async def delete(sent: discord.Message) -> None:
            await sent.delete()

        return Draft(
            post, edit, delete, interval_s=self.stream_interval_s, limit=LIMIT, platform="Discord"
        )

    async def _finish(
        self, draft: Draft[discord.Message], channel: Any, reply: Reply
    ) -> discord.Message | None:
        """Edit the draft into ``reply`` (further pieces follow as new messages); ``None`` when
        it can't be, and the reply is sent the ordinary way."""
        pieces = split_markdown(reply.text, LIMIT) or ["…"]
        last = await draft.finish(lambda sent: sent.edit(content=pieces[0]))
        if last is None:
            return None
        for piece in pieces[1:]:
            last = await channel.send(piece, mention_author=False)
        await self._offer_rating(last, reply)
        return last

    async def push(self, chat_id: str, reply: Reply) -> None:
        channel = self.client.get_partial_messageable(int(chat_id))
        await self._send(channel, reply.text, reply=reply)

    async def _send(
        self,
        channel: Any,
        text: str,
        *,
        reference: discord.Message | None = None,
        reply: Reply | None = None,
    ) -> discord.Message | None:
        last = None
        for i, piece in enumerate(split_markdown(text, LIMIT) or ["…"]):
            last = await channel.send(
                piece,
                reference=reference.to_reference(fail_if_not_exists=False)
                if reference is not None and i == 0
                else None,
                mention_author=False,
            )
        if last is not None and reply is not None:
            await self._offer_rating(last, reply)
        return last

    async def _offer_rating(self, sent: discord.Message, reply: Reply) -> None:
        reply.metadata["platform_message_id"] = str(sent.id)
        if reply.rateable and reply.id:
            with contextlib.suppress(discord.HTTPException):  # no Add Reactions permission
                for emoji in RATINGS:
                    await sent.add_reaction(emoji)


def _title(channel: Any) -> str:
    guild = getattr(channel, "guild", None)
    name = getattr(channel, "name", None)
    if guild is not None and name:
        return f"{guild.name} #{name}"
    return name or ""
