"""Telegram: the real aiogram Bot and Dispatcher against a local Bot API stand-in over HTTP."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp.test_utils import TestServer

from bot import Command, Context, Message, Reply, Skill
from bot.adapters.telegram import TEXT_ONLY, TelegramAdapter, formatted, split_text
from bot.core import Bot
from tests.conftest import EchoSkill, SkillsPlugin, Storyteller, core_settings
from tests.fake_telegram import FakeTelegram

HOWTO = (
    "To run the app in debug mode 😀, use:\n```console\n$ flask --app hello run --debug\n"
    "```\nThe server reloads on changes.\n\nSources:\n[1] Debug Mode (quickstart.rst.txt)"
)


class Essay(Skill):
    name = "essay"
    commands = (
        Command("essay", "A long answer"),
        Command("rated", "A rateable answer"),
        Command("howto", "An answer quoting code"),
    )

    async def handle(self, message: Message, ctx: Context) -> Reply:
        if ctx.command == "rated":
            return Reply("Generated answer.", rateable=True, model="m")
        if ctx.command == "howto":
            return Reply(HOWTO)
        paragraph = "This sentence is part of a long essay about building permits. " * 20
        return Reply("\n\n".join([paragraph.strip()] * 6))


@contextlib.asynccontextmanager
async def running(tmp_path, *skills, **options):
    """A bot with ``skills`` behind the real adapter, talking to a fresh Bot API stand-in."""
    fake = FakeTelegram()
    server = TestServer(fake.app())
    await server.start_server()
    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(*skills)])
    await bot.start()
    options = {"min_interval_s": 0, "group_interval_s": 0, "polling_timeout": 1, **options}
    adapter = TelegramAdapter(
        bot, "123:TEST", api_base=str(server.make_url("")).rstrip("/"), **options
    )
    await adapter.start()
    fake.bot = bot
    try:
        yield fake
    finally:
        await adapter.stop()
        await bot.stop()
        await server.close()


@pytest.fixture
async def telegram(tmp_path):
    async with running(tmp_path, EchoSkill(), Essay()) as fake:
        yield fake


async def test_a_conversation_round_trip_with_commands_registered(telegram):
    commands = {c["command"] for c in telegram.sent("setMyCommands")[0]["commands"]}
    assert {"echo", "essay", "help"} <= commands
    update = telegram.user_says("/echo hello from Telegram")
    (sent,) = await telegram.wait_for("sendMessage")
    assert sent["text"] == "hello from Telegram" and sent["chat_id"] == "100"
    assert sent["reply_parameters"]["message_id"] == update["message"]["message_id"]
    assert telegram.sent("sendChatAction")[0]["action"] == "typing"


async def test_an_update_is_acknowledged_only_after_its_message_is_stored(telegram):
    update = telegram.user_says("/echo keep me")
    await telegram.wait_for("sendMessage")
    await asyncio.sleep(1.5)  # the next long poll carries the acknowledgement
    acks = [stored for offset, stored in telegram.acked if offset > update["update_id"]]
    assert acks and acks[0] >= 1


async def test_a_long_reply_is_split_under_the_limit_at_paragraphs(telegram):
    telegram.user_says("/essay")
    await asyncio.sleep(0.5)
    sent = await telegram.wait_for("sendMessage", 2)
    assert all(len(s["text"]) <= 4096 for s in sent)
    assert all(s["text"].endswith(".") for s in sent)
    assert "reply_parameters" in sent[0] and "reply_parameters" not in sent[1]


def test_splitting_prefers_paragraphs_then_sentences():
    text = ("a" * 3000) + "\n\n" + ("b" * 2000) + ". " + ("c" * 3000)
    pieces = split_text(text)
    assert [len(p) for p in pieces] == [3000, 2001, 3000]


async def test_a_429_is_waited_out_and_retried(telegram):
    telegram.fail("sendMessage", 429, retry_after=1)
    telegram.user_says("/echo patience")
    sent = await telegram.wait_for("sendMessage", 2)
    assert sent[-1]["text"] == "patience"  # the second attempt went through


async def test_a_server_error_then_success_is_retried(telegram):
    telegram.fail("sendMessage", 500, times=2)
    telegram.user_says("/echo again")
    sent = await telegram.wait_for("sendMessage", 3)
    assert sent[-1]["text"] == "again"


async def test_a_dropped_connection_is_retried(telegram):
    telegram.fail("sendMessage", 0, times=1)  # status 0: close the connection, no answer
    telegram.user_says("/echo still here")
    sent = await telegram.wait_for("sendMessage", 2)
    assert sent[-1]["text"] == "still here"


async def test_a_redelivered_update_is_answered_once(telegram):
    update = telegram.user_says("/echo once")
    telegram.updates.append(dict(update, update_id=update["update_id"] + 100))  # same message
    telegram._new.set()
    await telegram.wait_for("sendMessage")
    await asyncio.sleep(1.0)
    assert [s["text"] for s in telegram.sent()] == ["once"]


async def test_a_rating_button_stores_feedback_and_is_answered(telegram):
    telegram.user_says("/rated")
    (sent,) = await telegram.wait_for("sendMessage")
    buttons = sent["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["👍", "👎"]
    telegram.user_presses(buttons[0]["callback_data"])
    (answer,) = await telegram.wait_for("answerCallbackQuery")
    assert "Thanks" in answer["text"]
    reply_id = int(buttons[0]["callback_data"].split(":")[1])
    await telegram.bot.store.flush()
    assert [f.rating for f in await telegram.bot.store.feedback_for(reply_id)] == [1]


async def test_a_forged_rating_button_for_another_chats_reply_is_refused(telegram):
    """Callback data comes from the client: a crafted one must not rate someone else's reply
    (or any message that is not one of the bot's replies)."""
    telegram.user_says("/rated")
    (sent,) = await telegram.wait_for("sendMessage")
    data = sent["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    reply_id = int(data.split(":")[1])
    telegram.user_presses(data, chat_id=555, user_id=9)  # pressed in another chat
    telegram.user_presses(f"fb:{reply_id - 1}:1")  # the user's own message, not a reply
    telegram.user_presses("fb:99999999999999999999999:1")  # beyond any id
    answers = await telegram.wait_for("answerCallbackQuery", 3)
    assert all("couldn't record" in a["text"] for a in answers)
    await telegram.bot.store.flush()
    assert await telegram.bot.store.feedback_for(reply_id) == []
    assert await telegram.bot.store.feedback_for(reply_id - 1) == []


async def test_group_messages_need_a_command_a_mention_or_a_reply(telegram):
    telegram.user_says("echo just chatting", chat_id=-5, chat_type="group")
    telegram.user_says("@chinwag_bot echo you there?", chat_id=-5, chat_type="group")
    telegram.user_says("echo replying to you", chat_id=-5, chat_type="group", reply_to_bot=True)
    await telegram.wait_for("sendMessage", 2)
    await asyncio.sleep(0.5)
    assert sorted(s["text"] for s in telegram.sent()) == ["echo replying to you", "echo you there?"]


async def test_edited_messages_are_ignored_by_default(telegram):
    update = telegram.user_says("/echo first")
    await telegram.wait_for("sendMessage")
    telegram.user_edits(update, "/echo edited")
    await asyncio.sleep(1.0)
    assert [s["text"] for s in telegram.sent()] == ["first"]


async def test_a_sticker_gets_a_polite_text_only_answer(telegram):
    telegram.user_says(None, sticker=True)
    (sent,) = await telegram.wait_for("sendMessage")
    assert sent["text"] == TEXT_ONLY


async def test_webhook_mode_refuses_a_wrong_secret_and_acks_after_storing(tmp_path):
    import socket

    from aiohttp import ClientSession

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    webhook = {
        "url": "https://bot.example.com/telegram",
        "host": "127.0.0.1",
        "port": port,
        "path": "/telegram",
        "secret": "hook-secret",
        "max_connections": 80,
    }
    async with running(tmp_path, EchoSkill(), webhook=webhook) as fake:
        bot = fake.bot
        (hook,) = fake.sent("setWebhook")
        assert (hook["url"], hook["secret_token"], hook["max_connections"]) == (
            "https://bot.example.com/telegram",
            "hook-secret",
            "80",
        )
        update = fake.user_says("/echo via webhook")
        url = f"http://127.0.0.1:{port}/telegram"
        async with ClientSession() as http:
            wrong = await http.post(
                url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "guess"}
            )
            assert wrong.status == 401
            assert await bot.store.count_messages() == 0
            right = await http.post(
                url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "hook-secret"}
            )
            assert right.status == 200
            assert await bot.store.count_messages("in") == 1  # stored before the ack
            again = await http.post(
                url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "hook-secret"}
            )
            assert again.status == 200
        await fake.wait_for("sendMessage")
        await asyncio.sleep(0.3)
        assert [s["text"] for s in fake.sent()] == ["via webhook"]  # the redelivery: once


async def test_chinwag_run_with_a_token_serves_telegram_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import sys

    fake = FakeTelegram()
    server = TestServer(fake.app())
    await server.start_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(tmp_path / "data"),
        CHINWAG_BOT__FALLBACK="fallback",
        CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING="false",
        CHINWAG_TELEGRAM__TOKEN="123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz",
        CHINWAG_TELEGRAM__API_BASE=str(server.make_url("")).rstrip("/"),
        CHINWAG_TELEGRAM__POLLING_TIMEOUT="1",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await fake.wait_for("getUpdates", within=60)
        fake.user_says("/help")
        (sent,) = await fake.wait_for("sendMessage", within=60)
        assert "/forget" in sent["text"]
        proc.send_signal(signal.SIGTERM)
        _, said = await asyncio.wait_for(proc.communicate(), 30)
        err = said.decode()
        assert proc.returncode == 0, err[-2000:]  # the log says why, should it ever fail
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.close()
    assert "Telegram: polling as @chinwag_bot" in err
    assert "TEST-TOKEN" not in err  # the token never reaches the log


async def test_edited_messages_can_be_configured_to_be_answered_again(tmp_path):
    async with running(tmp_path, EchoSkill(), edited="rehandle") as fake:
        update = fake.user_says("/echo first")
        await fake.wait_for("sendMessage")
        fake.user_edits(update, "/echo second thoughts")
        sent = await fake.wait_for("sendMessage", 2)
        assert [s["text"] for s in sent] == ["first", "second thoughts"]
        assert sent[1]["reply_parameters"]["message_id"] == update["message"]["message_id"]


async def test_a_generated_reply_grows_in_one_message_and_ends_as_the_final_text(tmp_path):
    async with running(tmp_path, Storyteller(), stream_interval_s=0.5) as fake:
        fake.user_says("/story")
        (first,) = await fake.wait_for("sendMessage")
        # The first words are on screen long before the reply is done...
        assert first["text"].startswith("Once upon") and first["text"].endswith("…")
        await fake.wait_for("editMessageText", 2, within=10)
        # The reply ends with the rating buttons: wait for that edit (a fixed pause lost the
        # race on a busy machine), then a moment for any draft edit that would come after it.
        deadline = asyncio.get_running_loop().time() + 10
        while not any("fb:" in str(e.get("reply_markup")) for e in fake.sent("editMessageText")):
            assert asyncio.get_running_loop().time() < deadline, fake.sent("editMessageText")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        edits = fake.sent("editMessageText")
        final = edits[-1]
        # ...and the same message becomes the final reply, with the rating buttons.
        assert final["text"] == Storyteller.TEXT
        assert "fb:" in str(final.get("reply_markup"))
        assert len(fake.sent("sendMessage")) == 1
        # Edits are paced: never more than one per interval while streaming.
        assert len(edits) <= 1 + 1.3 / 0.5 + 1


async def test_a_streamed_draft_never_outlives_a_reply_that_replaced_it(tmp_path):
    async with running(tmp_path, Storyteller(), stream_interval_s=0.5) as fake:
        fake.user_says("/story withheld")
        await fake.wait_for("sendMessage")
        await asyncio.sleep(2.0)
        assert fake.sent("editMessageText")[-1]["text"] == "Sorry — I can't send that."
        assert len(fake.sent("sendMessage")) == 1


async def test_streaming_can_be_switched_off(tmp_path):
    async with running(tmp_path, Storyteller(), stream=False) as fake:
        fake.user_says("/story")
        (sent,) = await fake.wait_for("sendMessage")
        assert sent["text"].endswith("answered.")
        assert fake.sent("editMessageText") == []


def shown(sent: dict) -> list[tuple[str, str | None]]:
    """The code a Telegram client draws as code: each ``pre`` entity's text (offsets in
    UTF-16 units, as Telegram counts them) and language."""
    units = sent["text"].encode("utf-16-le")
    found = [e if isinstance(e, dict) else e.model_dump() for e in sent.get("entities") or []]
    return [
        (
            units[2 * e["offset"] : 2 * (e["offset"] + e["length"])].decode("utf-16-le"),
            e.get("language"),
        )
        for e in found
        if e["type"] == "pre"
    ]


async def test_quoted_code_is_shown_as_code_not_as_backticks(telegram):
    telegram.user_says("/howto")
    (sent,) = await telegram.wait_for("sendMessage")
    assert "```" not in sent["text"]
    assert shown(sent) == [("$ flask --app hello run --debug", "console")]
    assert sent["text"].startswith("To run the app in debug mode 😀, use:\n$ flask")
    assert sent["text"].endswith("[1] Debug Mode (quickstart.rst.txt)")
    assert not sent.get("parse_mode")  # entities: nothing a user typed is read as markup


async def test_a_reply_whose_formatting_telegram_refuses_still_arrives_plain(telegram):
    telegram.fail("sendMessage", 400)
    telegram.user_says("/howto")
    refused, sent = await telegram.wait_for("sendMessage", 2)
    assert refused.get("entities")
    assert sent["text"] == HOWTO and not sent.get("entities")


def test_code_split_across_messages_is_code_in_each_of_them():
    code = "\n".join(f"print({i})  # line {i} of a long example" for i in range(200))
    pieces = split_text(f"Here is the whole script:\n```python\n{code}\n```\nThat is all.")
    assert len(pieces) > 1
    drawn = [shown(formatted(p)) for p in pieces]
    assert all(len(d) == 1 and d[0][1] == "python" for d in drawn)
    assert "\n".join(d[0][0] for d in drawn) == code
