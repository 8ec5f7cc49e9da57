"""Bad input gets a clear answer and loses nothing."""

from __future__ import annotations

import logging

import pytest

from bot import Attachment
from tests.conftest import core_settings


async def test_an_empty_message_gets_a_hint_not_silence(chat, chinwag_bot):
    replies = await chat.send("")
    assert "empty message" in replies[0].text
    assert "/help" in replies[0].text
    assert await chinwag_bot.store.count_messages("in") == 1


async def test_whitespace_only_counts_as_empty(chat):
    assert "empty message" in await chat.ask("  \n\t  ")


async def test_a_sticker_or_photo_without_text_gets_told_we_read_text(chat):
    replies = await chat.send("", attachments=[Attachment("sticker")])
    assert "only read text" in replies[0].text


@pytest.mark.parametrize(
    "chinwag_config", [{"bot": {"fallback": "fallback", "max_message_chars": 4000}}]
)
async def test_a_megabyte_of_text_is_truncated_with_a_notice_and_its_length_logged(
    chat, chinwag_bot, echo
):
    huge = "echo " + "a" * 1_000_000
    replies = await chat.send(huge)
    assert replies[0].kind == "notice"
    assert "1,000,005 characters" in replies[0].text
    assert "first 4,000" in replies[0].text
    assert len(echo.seen[-1].text) == 4000
    stored = (await chinwag_bot.store.messages(direction="in"))[-1]
    assert len(stored.text) == 4000
    assert stored.original_length == 1_000_005
    assert stored.meta["truncated"] is True


async def test_control_characters_and_lone_surrogates_are_cleaned_and_stored(
    chat, chinwag_bot, echo
):
    await chat.send("echo a\x00b\x07c\ud800d\tе\n")
    seen = echo.seen[-1].text
    assert seen == "echo abc\ufffdd\tе\n"
    stored = (await chinwag_bot.store.messages(direction="in"))[-1]
    assert stored.text == seen


async def test_binary_payloads_are_decoded_instead_of_crashing(chat, echo):
    await chat.send(b"echo caf\xc3\xa9 \xff\xfe")
    assert echo.seen[-1].text == "echo café \ufffd\ufffd"


async def test_hostile_markup_is_stored_and_echoed_verbatim_as_plain_text(chat):
    attack = "<script>alert(1)</script> *bold* [x](javascript:alert(1)) '; DROP TABLE messages;--"
    replies = await chat.send(f"/echo {attack}")
    assert replies[0].text == attack
    assert replies[0].format == "plain"
    assert await chat.ask("/echo still alive") == "still alive"


async def test_a_skill_that_raises_gets_the_user_an_apology_and_the_bot_keeps_serving(
    chat, chinwag_bot, caplog
):
    with caplog.at_level(logging.ERROR):
        replies = await chat.send("/boom")
    assert replies[0].kind == "error"
    assert "Sorry" in replies[0].text
    assert "kaboom" not in replies[0].text  # internals are logged, not shown
    assert "Traceback" in caplog.text and "kaboom" in caplog.text
    stored = await chinwag_bot.store.get_message(replies[0].id)
    assert stored.skill == "boom" and stored.meta["error"] == "RuntimeError"
    assert await chat.ask("/echo next") == "next"


async def test_a_skill_that_hangs_times_out_with_an_apology(chat, caplog):
    replies = await chat.send("/slow")
    assert replies[0].kind == "error"
    assert "too long" in replies[0].text
    assert replies[0].metadata["error"] == "timeout"
    assert "timed out" in caplog.text
    assert await chat.ask("/echo next") == "next"


async def test_a_skill_that_returns_garbage_is_treated_as_a_failure(tmp_path):
    from bot import Skill
    from bot.core import Bot
    from bot.testing import ChatUser
    from tests.conftest import SkillsPlugin

    class Garbage(Skill):
        name = "garbage"
        commands = ("garbage",)

        async def handle(self, message, ctx):
            return 42

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Garbage())]) as bot:
        replies = await ChatUser(bot).send("/garbage")
    assert replies[0].kind == "error"


async def test_unknown_command_answers_instead_of_silence(chat):
    assert "I don't know the command /frobnicate" in await chat.ask("/frobnicate now")


async def test_a_missing_data_directory_is_created(tmp_path):
    from bot.core import Bot

    deep = tmp_path / "a" / "b" / "c"
    async with Bot(core_settings(tmp_path, {"data_dir": deep})):
        pass
    assert (deep / "chinwag.sqlite3").exists()


async def test_a_data_directory_that_cannot_be_created_is_a_clear_startup_error(tmp_path):
    from bot.core import Bot
    from bot.store import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bot = Bot(core_settings(tmp_path, {"data_dir": blocker / "data"}))
    with pytest.raises(StoreError, match="cannot create the data directory"):
        await bot.start()


async def test_a_read_only_database_is_a_clear_startup_error(tmp_path):
    from bot.core import Bot
    from bot.store import StoreError

    db = tmp_path / "ro.sqlite3"
    async with Bot(core_settings(tmp_path, {"database": {"url": f"sqlite+aiosqlite:///{db}"}})):
        pass
    # Tests may run as root, which ignores file modes; SQLite's read-only open is the same
    # condition as far as chinwag can tell.
    url = f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true"
    bot = Bot(core_settings(tmp_path, {"database": {"url": url}}))
    with pytest.raises(StoreError, match="read-only"):
        await bot.start()


async def test_a_store_outage_mid_run_answers_politely_and_does_not_process(
    chat, chinwag_bot, echo
):
    await chinwag_bot.store.close()  # the database goes away under a running bot
    replies = await chat.send("echo lost?")
    assert replies[0].kind == "error"
    assert "can't take messages right now" in replies[0].text
    assert echo.seen == []
    await chinwag_bot.store.open()  # so the fixture can stop cleanly
