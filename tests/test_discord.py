"""Discord: the real discord.py client against a local gateway (WebSocket) and REST stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import pytest
from aiohttp.test_utils import TestServer

from bot import Command, Context, Message, Reply, Skill
from bot.adapters.discord import TEXT_ONLY, DiscordAdapter
from bot.adapters.text import split_markdown
from bot.config import ConfigError, Settings
from bot.core import Bot
from tests.conftest import EchoSkill, SkillsPlugin, Storyteller, core_settings
from tests.fake_discord import BOT_USER, DM, GENERAL, OTHER_THREAD, THREAD, FakeDiscord
from tests.fake_telegram import FakeTelegram


class Essay(Skill):
    name = "essay"
    commands = (Command("essay", "A long answer"), Command("rated", "A rateable answer"))

    async def handle(self, message: Message, ctx: Context) -> Reply:
        if ctx.command == "rated":
            return Reply("Generated answer.", rateable=True, model="m")
        paragraph = "This sentence is part of a long essay about building permits. " * 8
        code = "```python\n" + "\n".join(f"permit_{i} = {i}" for i in range(120)) + "\n```"
        return Reply("\n\n".join([paragraph.strip()] * 3 + [code] + [paragraph.strip()]))


@contextlib.asynccontextmanager
async def running(tmp_path, *skills, **options):
    """A bot with ``skills`` behind the real discord.py client, talking to a fresh stand-in."""
    fake = FakeDiscord()
    server = TestServer(fake.app())
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")
    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(*skills)])
    await bot.start()
    adapter = DiscordAdapter(
        bot,
        "TEST.TOKEN",
        api_base=f"{fake.base_url}/api/v10",
        gateway_url=f"{fake.base_url.replace('http', 'ws')}/gateway",
        guild_ready_timeout=0.1,
        ready_timeout=20,
        **options,
    )
    fake.bot = bot
    try:
        await adapter.start()
        yield fake
    finally:
        await adapter.stop()
        await bot.stop()
        await server.close()


@pytest.fixture
async def discord_bot(tmp_path):
    async with running(tmp_path, EchoSkill(), Essay()) as fake:
        yield fake


async def test_a_direct_message_round_trip_with_slash_commands_synced(discord_bot):
    (commands,) = discord_bot.sent("PUT", "/commands")
    assert {"echo", "essay", "help"} <= {c["name"] for c in commands}
    assert all(c["options"][0]["name"] == "text" for c in commands)
    said = await discord_bot.user_says("/echo hello from Discord")
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == "hello from Discord"
    assert str(sent["message_reference"]["message_id"]) == said["id"]
    assert sent["allowed_mentions"]["parse"] == []  # a reply never pings anyone
    assert discord_bot.sent("POST", "/typing")


async def test_in_a_guild_channel_it_answers_mentions_and_replies_to_it_only(discord_bot):
    await discord_bot.user_says("/echo nobody asked me", channel_id=GENERAL)
    await discord_bot.user_says("/echo in someone else's thread", channel_id=OTHER_THREAD)
    mention = await discord_bot.user_says("/echo you called?", channel_id=GENERAL, mention=True)
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == "you called?"
    assert str(sent["message_reference"]["message_id"]) == mention["id"]
    # A reply to the bot's own message addresses it without a mention.
    ours = {**mention, "author": BOT_USER, "mentions": []}
    await discord_bot.user_says("/echo following up", channel_id=GENERAL, reply_to=ours)
    sent = await discord_bot.wait_for(count=2)
    assert sent[1]["content"] == "following up"
    await asyncio.sleep(0.3)  # the unaddressed messages stayed unanswered
    assert len(discord_bot.sent()) == 2


async def test_threads_it_started_are_answered_without_a_mention(discord_bot):
    await discord_bot.user_says("/echo in my own thread", channel_id=THREAD)
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == "in my own thread"


async def test_a_channel_allow_list_keeps_it_quiet_elsewhere(tmp_path):
    async with running(tmp_path, EchoSkill(), channels=[12345]) as fake:
        await fake.user_says("/echo hi", channel_id=GENERAL, mention=True)
        await fake.user_says("/echo still answered in DMs", channel_id=DM)
        (sent,) = await fake.wait_for()
        assert sent["content"] == "still answered in DMs"


async def test_a_long_reply_is_split_under_2000_characters_keeping_code_blocks_whole(
    discord_bot,
):
    await discord_bot.user_says("/essay")
    await asyncio.sleep(0.5)
    sent = await discord_bot.wait_for(count=2)
    assert len(sent) >= 2 and all(len(s["content"]) <= 2000 for s in sent)
    assert all(s["content"].count("```") % 2 == 0 for s in sent)  # every fence closed
    assert "message_reference" in sent[0] and "message_reference" not in sent[1]


def test_splitting_reopens_a_code_block_cut_in_two():
    text = "```python\n" + "\n".join(f"x = {i}" for i in range(500)) + "\n```"
    first, second, *_ = split_markdown(text, 2000)
    assert first.endswith("\n```") and second.startswith("```python\n")


async def test_a_reaction_on_a_generated_reply_is_stored_as_feedback(discord_bot):
    await discord_bot.user_says("/rated")
    (sent,) = await discord_bot.wait_for()
    reactions = await discord_bot.wait_for("PUT", "/reactions/", count=2)
    assert len(reactions) == 2
    await discord_bot.user_reacts(discord_bot.posted[-1], "👎")
    for _ in range(100):
        rows = await discord_bot.bot.store.last_turns("discord", str(DM), limit=4)
        reply = next(r for r in rows if r.direction == "out")
        feedback = await discord_bot.bot.store.feedback_for(reply.id)
        if feedback:
            break
        await asyncio.sleep(0.05)
    assert [f.rating for f in feedback] == [-1]
    assert sent["content"] == "Generated answer."


async def test_a_slash_command_is_answered_through_the_interaction(discord_bot):
    await discord_bot.user_runs("echo", "from the menu")
    (callback,) = await discord_bot.wait_for("POST", "/callback")
    assert callback["type"] == 5  # "thinking…" first: a skill may take longer than 3 s
    (followup,) = await discord_bot.wait_for("POST", "/webhooks/")
    assert followup["content"] == "from the menu"


async def test_a_429_is_waited_out_by_the_client_and_the_reply_still_arrives(discord_bot):
    discord_bot.fail("POST", f"/channels/{DM}/messages", 429, times=1, retry_after=0.3)
    await discord_bot.user_says("/echo patience")
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == "patience"
    assert any(m == "POST!429" for m, _, _ in discord_bot.calls)


async def test_after_a_dropped_connection_it_resumes_and_keeps_answering(discord_bot):
    await discord_bot.drop_connections()
    await discord_bot.wait_identified(resumed=1)
    await discord_bot.user_says("/echo still here")
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == "still here"


async def test_an_image_without_text_gets_a_polite_text_only_answer(discord_bot):
    await discord_bot.user_says("", attachments=1)
    (sent,) = await discord_bot.wait_for()
    assert sent["content"] == TEXT_ONLY


async def test_other_bots_are_never_answered(discord_bot):
    said = await discord_bot.user_says("/echo am I a bot?")
    await discord_bot.wait_for()
    said = {**said, "id": "424242", "author": {**said["author"], "id": "7777", "bot": True}}
    await discord_bot.dispatch("MESSAGE_CREATE", said)
    await asyncio.sleep(0.3)
    assert len(discord_bot.sent()) == 1


async def test_a_sharded_client_connects_through_the_gateway_it_is_given(tmp_path):
    async with running(tmp_path, EchoSkill(), sharded=True) as fake:
        assert fake.sent("GET", "/gateway/bot")
        await fake.user_says("/echo sharded")
        (sent,) = await fake.wait_for()
        assert sent["content"] == "sharded"


async def test_a_refused_token_stops_the_start_with_a_clear_error(tmp_path):
    fake = FakeDiscord()
    fake.fail("GET", "/users/@me", 401)
    server = TestServer(fake.app())
    await server.start_server()
    bot = Bot(core_settings(tmp_path))
    await bot.start()
    adapter = DiscordAdapter(bot, "WRONG", api_base=str(server.make_url("/api/v10")))
    try:
        with pytest.raises(ConfigError, match=r"discord\.token was refused"):
            await adapter.start()
    finally:
        await adapter.stop()
        await bot.stop()
        await server.close()


def test_the_conventional_token_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("DISCORD_TOKEN", "from-the-usual-name")
    monkeypatch.setenv("CHINWAG_DISCORD__SHARDED", "true")
    settings = Settings(data_dir=tmp_path)
    assert settings.discord.token.get_secret_value() == "from-the-usual-name"
    assert settings.discord.sharded
    monkeypatch.setenv("CHINWAG_DISCORD__TOKEN", "chinwag-name-wins")
    assert Settings(data_dir=tmp_path).discord.token.get_secret_value() == "chinwag-name-wins"


async def test_chinwag_run_serves_telegram_and_discord_at_once_and_stops_on_sigterm(tmp_path):
    fake_tg, fake_dc = FakeTelegram(), FakeDiscord()
    tg_server, dc_server = TestServer(fake_tg.app()), TestServer(fake_dc.app())
    await tg_server.start_server()
    await dc_server.start_server()
    fake_dc.base_url = str(dc_server.make_url("")).rstrip("/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(tmp_path / "data"),
        CHINWAG_BOT__FALLBACK="fallback",
        CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING="false",
        TELEGRAM_TOKEN="123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz",
        CHINWAG_TELEGRAM__API_BASE=str(tg_server.make_url("")).rstrip("/"),
        CHINWAG_TELEGRAM__POLLING_TIMEOUT="1",
        DISCORD_TOKEN="DISCORD.SECRET.TOKEN",
        CHINWAG_DISCORD__API_BASE=f"{fake_dc.base_url}/api/v10",
        CHINWAG_DISCORD__GATEWAY_URL=f"{fake_dc.base_url.replace('http', 'ws')}/gateway",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await fake_tg.wait_for("getUpdates", within=60)
        await fake_dc.wait_identified(within=60)
        fake_tg.user_says("/help")
        await fake_dc.user_says("/help")
        (tg_sent,) = await fake_tg.wait_for("sendMessage", within=60)
        (dc_sent,) = await fake_dc.wait_for(within=60)
        assert "/forget" in tg_sent["text"] and "/forget" in dc_sent["content"]
        proc.send_signal(signal.SIGTERM)
        _, said = await asyncio.wait_for(proc.communicate(), 30)
        err = said.decode()
        assert proc.returncode == 0, err[-2000:]  # the log says why, should it ever fail
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await tg_server.close()
        await dc_server.close()
    assert "Discord: connected as chinwag" in err
    assert "DISCORD.SECRET.TOKEN" not in err and "TEST-TOKEN" not in err


async def test_a_generated_reply_grows_in_one_message_and_ends_as_the_final_text(tmp_path):
    async with running(tmp_path, Storyteller(), stream_interval_s=1.0) as fake:
        said = await fake.user_says("/story")
        (first,) = await fake.wait_for()
        shown_at = asyncio.get_running_loop().time()
        # The first words are on screen long before the reply is done, as a reply to the user...
        assert first["content"].startswith("Once upon") and first["content"].endswith("…")
        assert str(first["message_reference"]["message_id"]) == said["id"]
        await fake.wait_for("PUT", "/reactions/", count=2)
        streamed_s = asyncio.get_running_loop().time() - shown_at
        edits = fake.sent("PATCH")
        # ...and the same message becomes the final reply, offered for rating.
        assert edits[-1]["content"] == Storyteller.TEXT
        assert fake.posted[-1]["content"] == Storyteller.TEXT
        assert len(fake.sent("POST", "/messages")) == 1
        # Edits are paced under Discord's limit: at most one a second while streaming, then
        # the final one.
        assert len(edits) <= streamed_s / 1.0 + 2


async def test_a_streamed_draft_becomes_the_reply_that_replaced_it(tmp_path):
    async with running(tmp_path, Storyteller(), stream_interval_s=1.0) as fake:
        await fake.user_says("/story withheld")
        await fake.wait_for()
        for _ in range(60):
            await asyncio.sleep(0.1)
            if fake.posted[-1]["content"] == "Sorry — I can't send that.":
                break
        assert [m["content"] for m in fake.posted] == ["Sorry — I can't send that."]


async def test_a_rate_limited_edit_is_waited_out_and_the_reply_still_lands(tmp_path):
    async with running(tmp_path, Storyteller(), stream_interval_s=1.0) as fake:
        fake.fail("PATCH", "/channels", 429, times=2, retry_after=0.3)
        await fake.user_says("/story")
        await fake.wait_for("PUT", "/reactions/", count=2)
        assert [m for m, _, _ in fake.calls].count("PATCH!429") == 2
        assert [m["content"] for m in fake.posted] == [Storyteller.TEXT]


async def test_discord_streaming_can_be_switched_off(tmp_path):
    async with running(tmp_path, Storyteller(), stream=False) as fake:
        await fake.user_says("/story")
        (sent,) = await fake.wait_for()
        assert sent["content"] == Storyteller.TEXT
        assert fake.sent("PATCH") == []
