"""Operators' controls, users' privacy, and floods."""

from __future__ import annotations

import logging

import pytest

from bot.logs import SecretFilter, setup_logging
from bot.ratelimit import RateLimiter, Verdict
from tests.conftest import CORE


async def test_forget_deletes_the_senders_history_but_not_other_peoples(chinwag_chat, chinwag_bot):
    ann = chinwag_chat(user_id="ann", chat_id="shared", chat_kind="group")
    bob = chinwag_chat(user_id="bob", chat_id="shared", chat_kind="group")
    await ann.send("/echo my phone is 555-0100")
    await bob.send("/echo hello")
    reply = await ann.ask("/forget")
    assert "deleted" in reply
    texts = [m.text for m in await chinwag_bot.store.messages()]
    assert not any("555-0100" in t for t in texts)
    assert "/echo hello" in texts and "hello" in texts
    assert ("test", "ann") in await chinwag_bot.store.forgotten_users()


@pytest.mark.parametrize(
    "chinwag_config", [{**CORE, "rate_limit": {"enabled": True, "per_second": 0.001, "burst": 3}}]
)
async def test_a_flood_gets_one_slow_down_and_is_not_processed(chat, chinwag_bot, echo):
    replies = [await chat.send(f"echo {i}") for i in range(10)]
    answered = [r[0].text for r in replies if r]
    assert answered[:3] == ["echo 0", "echo 1", "echo 2"]
    assert answered[3].startswith("Slow down")
    assert len(answered) == 4  # the rest of the flood gets silence, not a queue of work
    assert len(echo.seen) == 3
    assert await chinwag_bot.store.count_messages("in") == 10  # but nothing is lost


@pytest.mark.parametrize(
    "chinwag_config", [{**CORE, "rate_limit": {"enabled": True, "per_second": 0.001, "burst": 1}}]
)
async def test_admins_and_other_users_are_not_slowed_by_someone_elses_flood(chinwag_chat):
    flooder = chinwag_chat(user_id="f")
    for _ in range(5):
        await flooder.send("/echo x")
    assert await chinwag_chat(user_id="other").ask("/echo hi") == "hi"
    admin = chinwag_chat(user_id="root", admin=True)
    for _ in range(5):
        assert await admin.ask("/echo ok") == "ok"


def test_the_token_bucket_refills_and_warns_once_per_flood():
    now = [0.0]
    limiter = RateLimiter(per_second=1.0, burst=2, clock=lambda: now[0])
    assert [limiter.check("u") for _ in range(4)] == [
        Verdict.ALLOW,
        Verdict.ALLOW,
        Verdict.WARN,
        Verdict.DROP,
    ]
    now[0] += 1.0
    assert limiter.check("u") is Verdict.ALLOW
    assert limiter.check("u") is Verdict.WARN


def test_secrets_never_reach_the_logs(caplog):
    token = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
    secret_filter = setup_logging("INFO", ["hunter2-database-password"])
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    caplog.handler.addFilter(secret_filter)
    log = logging.getLogger("test.secrets")
    log.info("POST https://api.telegram.org/bot%s/sendMessage failed", token)
    log.info("connecting with hunter2-database-password")
    try:
        raise ConnectionError(f"bad url https://api.telegram.org/bot{token}/getMe")
    except ConnectionError:
        log.exception("request failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert token not in text
    assert "hunter2-database-password" not in text
    assert "**********" in text


def test_discord_shaped_tokens_are_scrubbed_too():
    f = SecretFilter()
    token = "MTA4NzY1NDMyMTA5ODc2NTQzMg.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"
    assert token not in f.scrub(f"Authorization: Bot {token}")
