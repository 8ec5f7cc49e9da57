"""The same store and bot on PostgreSQL: a real server, started for these tests.

Uses the PostgreSQL binaries on the machine (Debian's ``postgresql`` package); when there are
none the tests are skipped with that reason. As root the server runs as the ``postgres`` user,
since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from bot.core import Bot
from bot.messages import Message, Reply, utcnow
from bot.store import ConversationStore
from bot.testing import ChatUser
from tests.conftest import SkillsPlugin, core_settings


def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="chinwag-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            *prefix,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-k",
            str(sock),
            "-p",
            str(port),
            "-c",
            "listen_addresses=",
            "-c",
            "fsync=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (sock / f".s.PGSQL.{port}").exists():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail("PostgreSQL did not start")
        time.sleep(0.1)
    time.sleep(0.3)
    yield f"postgresql+asyncpg://postgres@/postgres?host={sock}&port={port}"
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def fresh_pg(pg_url):
    """A PostgreSQL URL whose chinwag tables are dropped afterwards."""
    yield pg_url
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(pg_url)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "DROP TABLE IF EXISTS messages, feedback, users, chats, forget_requests, "
                "alembic_version CASCADE"
            )
        )
    await engine.dispose()


async def test_the_store_works_the_same_on_postgresql(fresh_pg):
    store = ConversationStore(fresh_pg)
    await store.open()
    try:
        first = Message("tg", "c1", "u1", "hello", message_id="1", user_name="Ann")
        assert await store.log_inbound(first)
        again = Message("tg", "c1", "u1", "hello", message_id="1", user_name="Ann")
        assert not await store.log_inbound(again)
        both = await asyncio.gather(
            *(
                store.log_inbound(Message("tg", "c1", "u1", f"m{i}", message_id=f"b{i}"))
                for i in range(50)
            )
        )
        assert all(both)
        (reply_id,) = await store.log_outbound(first, [Reply("hi Ann", skill="echo")], 2.0)
        await store.add_feedback(reply_id, "tg", "u1", 1)
        turns = await store.last_turns("tg", "c1", 2)
        assert [t.text for t in turns] == ["m49", "hi Ann"]
        (conv,) = await store.conversations(utcnow() - timedelta(minutes=1))
        assert [f.rating for f in conv.feedback[reply_id]] == [1]
        result = await store.forget_user("tg", "u1")
        assert result.messages_deleted == 52
        assert result.feedback_deleted == 1
        assert await store.count_messages() == 0
    finally:
        await store.close()


async def test_a_bot_runs_end_to_end_on_postgresql(tmp_path, fresh_pg):
    settings = core_settings(tmp_path, {"database": {"url": fresh_pg}})
    async with Bot(settings, plugins=[SkillsPlugin()]) as bot:
        user = ChatUser(bot)
        assert await user.ask("/echo over postgres") == "over postgres"
        assert "Sorry" in await user.ask("/boom")
        assert await bot.store.count_messages() == 4
