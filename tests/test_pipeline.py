"""What happens to every message on its way through the bot."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from bot import Context, Message, Reply, Skill, hookimpl
from tests.conftest import SkillsPlugin, core_settings


class LoggedBeforeHandled(Skill):
    """Looks itself up in the store while it is being handled."""

    name = "introspect"
    commands = ("introspect",)

    async def handle(self, message: Message, ctx: Context) -> Reply:
        stored = await ctx.bot.store.get_message(message.id)
        return Reply("stored" if stored and stored.text == message.text else "missing")


async def test_every_message_is_logged_durably_before_a_skill_sees_it(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(LoggedBeforeHandled())]) as bot:
        assert await ChatUser(bot).ask("/introspect") == "stored"


async def test_replies_are_logged_with_skill_latency_and_a_link_to_the_question(chat, chinwag_bot):
    replies = await chat.send("/echo hi")
    rows = await chinwag_bot.store.messages()
    inbound, outbound = rows[-2], rows[-1]
    assert (inbound.direction, inbound.text, inbound.user_id) == ("in", "/echo hi", "user-1")
    assert (outbound.direction, outbound.text, outbound.skill) == ("out", "hi", "echo")
    assert outbound.reply_to_id == inbound.id
    assert outbound.latency_ms is not None and outbound.latency_ms >= 0
    assert replies[0].id == outbound.id


async def test_the_same_platform_message_delivered_twice_is_handled_once(chat, chinwag_bot, echo):
    message = chat.message("echo once", message_id="42")
    first = await chinwag_bot.handle(message)
    again = await chinwag_bot.handle(chat.message("echo once", message_id="42"))
    assert [r.text for r in first] == ["echo once"]
    assert again == []
    assert len(echo.seen) == 1
    assert await chinwag_bot.store.count_messages("in") == 1


async def test_redelivery_is_caught_even_after_a_restart(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    settings = core_settings(tmp_path)
    async with Bot(settings, plugins=[SkillsPlugin()]) as bot:
        assert await bot.handle(ChatUser(bot).message("/echo a", message_id="7"))
    async with Bot(settings, plugins=[SkillsPlugin()]) as bot:
        assert await bot.handle(ChatUser(bot).message("/echo a", message_id="7")) == []


class Recorder(Skill):
    name = "recorder"
    commands = ("rec",)

    def __init__(self) -> None:
        self.order: list[str] = []
        self.active = 0
        self.peak = 0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.01 if ctx.args.endswith("0") else 0.001)
        self.order.append(f"{message.chat_id}:{ctx.args}")
        self.active -= 1
        return Reply(ctx.args)


async def test_messages_of_one_chat_are_answered_in_arrival_order(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    rec = Recorder()
    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(rec)]) as bot:
        user = ChatUser(bot)
        await asyncio.gather(*(user.send(f"/rec {i}") for i in range(20)))
    assert rec.order == [f"chat-1:{i}" for i in range(20)]
    assert rec.peak == 1


class ModelRecorder(Recorder):
    """Stands for a skill that waits on the model (it says so with ``uses_model``)."""

    name = "model-recorder"
    commands = ("think",)
    uses_model = True

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def handle(self, message: Message, ctx: Context) -> Reply:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await self.release.wait()
        self.active -= 1
        return Reply("thought")


async def test_model_backed_skills_run_concurrently_up_to_the_configured_bound(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    slow = ModelRecorder()
    settings = core_settings(tmp_path, {"bot": {"max_concurrency": 4}})
    async with Bot(settings, plugins=[SkillsPlugin(slow, Recorder())]) as bot:
        users = [ChatUser(bot, chat_id=f"c{i}", user_id=f"u{i}") for i in range(12)]
        waiting = [asyncio.create_task(u.send("/think")) for u in users]
        async with asyncio.timeout(10):
            while slow.peak < 4:  # noqa: ASYNC110 - polling the skill's own counter
                await asyncio.sleep(0.01)
        # The bound is full of model work; a model-free command in another chat still
        # answers at once instead of queueing behind it.
        other = ChatUser(bot, chat_id="elsewhere", user_id="x")
        assert await asyncio.wait_for(other.ask("/rec 1"), 5) == "1"
        slow.release.set()
        assert [r[0].text for r in await asyncio.gather(*waiting)] == ["thought"] * 12
    assert slow.peak == 4


class Shouty:
    name = "shouty"

    async def observe(self, message: Message, ctx: Context) -> None:
        message.metadata["shouting"] = any(w.isupper() and len(w) > 1 for w in message.text.split())


class BrokenObserver:
    name = "broken"

    async def observe(self, message: Message, ctx: Context) -> None:
        raise ValueError("observer bug")


class NoSecrets:
    name = "no-secrets"

    async def filter(self, reply: Reply, message: Message, ctx: Context) -> Reply | None:
        if "drop me" in reply.text:
            return None
        reply.text = reply.text.replace("secret", "[redacted]")
        return reply


class ObserversAndFilters:
    @hookimpl
    def register_observers(self, register):
        register(BrokenObserver())
        register(Shouty())

    @hookimpl
    def register_reply_filters(self, register):
        register(NoSecrets())


@pytest.fixture
def chinwag_plugins(echo):
    return [SkillsPlugin(echo), ObserversAndFilters()]


async def test_observer_annotations_are_stored_with_the_message_and_seen_by_skills(
    chat, chinwag_bot, echo
):
    await chat.send("echo HELLO")
    assert echo.seen[-1].metadata["shouting"] is True
    stored = (await chinwag_bot.store.messages(direction="in"))[-1]
    assert stored.meta["shouting"] is True


async def test_a_failing_observer_is_logged_and_does_not_stop_the_reply(chat, caplog):
    with caplog.at_level(logging.ERROR):
        assert await chat.ask("/echo hi") == "hi"
    assert "observer broken failed" in caplog.text


async def test_reply_filters_rewrite_or_withhold_replies(chat):
    assert await chat.ask("/echo the secret plan") == "the [redacted] plan"
    assert await chat.send("/echo drop me") == []


class CrashingFilter:
    name = "crashing"

    async def filter(self, reply, message, ctx):
        raise RuntimeError("filter bug")


class CrashingFilterPlugin:
    @hookimpl
    def register_reply_filters(self, register):
        register(CrashingFilter())


async def test_a_crashing_reply_filter_withholds_the_reply_instead_of_leaking_it(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    plugins = [SkillsPlugin(), CrashingFilterPlugin()]
    async with Bot(core_settings(tmp_path), plugins=plugins) as bot:
        replies = await ChatUser(bot).send("/echo private data")
    assert len(replies) == 1
    assert "private data" not in replies[0].text
    assert replies[0].kind == "error"


async def test_replies_are_handed_to_the_adapter_and_delivery_ids_recorded(chat, chinwag_bot):
    delivered = []

    async def send(message, replies):
        for i, r in enumerate(replies):
            r.metadata["platform_message_id"] = f"tg-{i}"
        delivered.append((message.text, [r.text for r in replies]))

    replies = await chinwag_bot.handle(chat.message("/echo hi"), send=send)
    assert delivered == [("/echo hi", ["hi"])]
    found = await chinwag_bot.store.find_by_platform_id("test", "chat-1", "tg-0")
    assert found is not None and found.id == replies[0].id


async def test_a_failed_delivery_is_recorded_and_the_bot_keeps_serving(chat, chinwag_bot):
    async def send(message, replies):
        raise ConnectionError("platform down")

    replies = await chinwag_bot.handle(chat.message("/echo hi"), send=send)
    stored = await chinwag_bot.store.get_message(replies[0].id)
    assert "platform down" in stored.meta["send_error"]
    assert await chat.ask("/echo still here") == "still here"


async def test_stop_lets_in_flight_messages_finish(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    rec = Recorder()
    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(rec)])
    await bot.start()
    task = asyncio.create_task(ChatUser(bot).send("/rec 10"))
    await asyncio.sleep(0.001)
    await bot.stop()
    assert [r.text for r in await task] == ["10"]


async def test_an_observers_note_reaches_the_skill_and_the_reply_filter_of_that_message_only(
    tmp_path,
):
    from bot.core import Bot
    from bot.testing import ChatUser

    class Language:
        name = "language"

        async def observe(self, message, ctx):
            if "hej" in message.text:
                ctx.extras["language"] = "sv"

    class Greet(Skill):
        name = "greet"
        commands = ("greet",)

        async def handle(self, message, ctx):
            return "Hej!" if ctx.extras.get("language") == "sv" else "Hello!"

    class Flag:
        name = "flag"

        async def filter(self, reply, message, ctx):
            reply.text += f" [{ctx.extras.get('language', '?')}]"
            return reply

    class Plugin:
        @hookimpl
        def register_observers(self, register):
            register(Language())

        @hookimpl
        def register_reply_filters(self, register):
            register(Flag())

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Greet()), Plugin()]) as bot:
        user = ChatUser(bot)
        assert await user.ask("/greet hej") == "Hej! [sv]"
        assert await user.ask("/greet there") == "Hello! [?]"  # nothing left from the last one


async def test_the_console_tells_an_operator_with_an_empty_knowledge_base_how_to_fill_it(
    chinwag_bot, faq_file
):
    """Every factual question is declined on a first start: the chat says why and what to do."""
    from bot.adapters.console import ConsoleChat

    chat = ConsoleChat(chinwag_bot, out=io.StringIO())
    (note,) = await chat.notes()
    assert "knowledge base is empty" in note and "chinwag knowledge add PATH" in note
    await chinwag_bot.services["knowledge"].add([faq_file])
    assert await chat.notes() == ["Knowledge base: 1 file, 503 passages."]
