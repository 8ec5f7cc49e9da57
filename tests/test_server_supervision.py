"""The model server chinwag supervises (``backend = "vllm"``): it ends with the bot, and one
that crashes or hangs is started again.

vLLM's API server forks engine and worker processes that outlive it when it is killed, and
the kernel's parent-death signal reaches only a direct child. These tests use stand-ins — a
shell that forks a stubborn worker, a small HTTP server that answers like vLLM's health
endpoints — so they run without vLLM; the real server is covered in tests/test_vllm.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.models import ModelError, ModelRuntime
from bot.models.vllm_server import GUARD, VLLMServer
from bot.process_guard import group_members

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


_group = group_members  # live processes of a group (from /proc), this one excluded


def _wait_gone(pgid: int, within: float) -> bool:
    until = time.monotonic() + within
    while time.monotonic() < until:
        if not _group(pgid):
            return True
        time.sleep(0.1)
    return False


#: A "server" that forks a worker which ignores SIGTERM, as a hung engine would.
FORKING = ["sh", "-c", "sh -c 'trap \"\" TERM; sleep 300' & sleep 300"]

#: A bot process that starts the guard and reports its group, then waits to be killed.
BOT = """
import subprocess, sys, time
guard = subprocess.Popen(
    [sys.executable, sys.argv[1], "--grace", "1", "--parent", str(__import__("os").getpid()),
     "--", *sys.argv[2:]],
    start_new_session=True,
)
print(guard.pid, flush=True)
time.sleep(300)
"""


def test_a_bot_killed_outright_takes_the_whole_server_group_with_it():
    bot = subprocess.Popen(
        [sys.executable, "-c", BOT, str(GUARD), *FORKING], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert bot.stdout is not None
        group = int(bot.stdout.readline())
        until = time.monotonic() + 10
        while len(_group(group)) < 4 and time.monotonic() < until:  # guard, sh, sh, sleeps
            time.sleep(0.05)
        assert len(_group(group)) >= 4
        bot.kill()  # no clean-up code of the bot runs
        bot.wait()
        # SIGTERM to all, then after the 1 s grace SIGKILL to the worker that ignored it.
        assert _wait_gone(group, 10), _group(group)
    finally:
        if bot.poll() is None:
            bot.kill()


def test_a_server_that_exits_by_itself_leaves_no_workers_behind_and_its_status_is_kept():
    guard = subprocess.Popen(
        [sys.executable, str(GUARD), "--", "sh", "-c", "sleep 300 & exit 3"],
        start_new_session=True,
    )
    assert guard.wait(30) == 3  # the supervisor logs why it restarts
    assert _wait_gone(guard.pid, 5), _group(guard.pid)  # the background sleep went too


async def test_stopping_the_server_ends_every_process_it_forked(tmp_path):
    server = VLLMServer("unused", log_file=tmp_path / "server.log", grace_s=1.0)
    server.command = lambda: FORKING  # type: ignore[method-assign]
    server.spawn()
    group = server.proc.pid
    until = time.monotonic() + 10
    while len(_group(group)) < 4 and time.monotonic() < until:  # noqa: ASYNC110 - /proc
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await server.stop()
    assert not _group(group)
    assert time.monotonic() - started < 1.0 + 5  # the grace, not the worker's 300 s


async def test_vllm_missing_from_the_interpreter_is_a_clear_error(tmp_path):
    runtime = ModelRuntime(
        load_settings(
            overrides={
                "data_dir": tmp_path,
                "models": {
                    "backend": "vllm",
                    "base_model": str(tmp_path),  # a folder: passed on as it is
                    "vllm": {"python": sys.executable},  # chinwag's own: no vLLM in it
                },
            }
        )
    )
    try:
        with pytest.raises(ModelError, match="vLLM is not installed for"):
            await runtime.start()
    finally:
        await runtime.stop()
    log = (tmp_path / "logs" / "vllm.log").read_text()
    assert "No module named" in log  # the reason is kept for the operator


async def test_a_missing_interpreter_is_named(tmp_path):
    server = VLLMServer("m", python=tmp_path / "nope" / "python", log_file=tmp_path / "l.log")
    with pytest.raises(ModelError, match="no Python interpreter at"):
        await server.start(10)


def _fake_vllm(tmp_path: Path, **kwargs) -> VLLMServer:
    """A server that answers ``/v1/models`` and ``/health`` the way vLLM does (HTTP 200)."""
    root = tmp_path / "www"
    (root / "v1").mkdir(parents=True, exist_ok=True)
    (root / "v1" / "models").write_text("{}")
    (root / "health").write_text("")
    server = VLLMServer("unused", log_file=tmp_path / "server.log", grace_s=1.0, **kwargs)
    server.command = lambda: [  # type: ignore[method-assign]
        sys.executable, "-m", "http.server", str(server.port), "--bind", "127.0.0.1",
        "--directory", str(root),
    ]  # fmt: skip
    return server


async def _until(check, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polling a process from outside
            await asyncio.sleep(0.05)


async def test_a_crashed_server_is_started_again_on_its_port_and_told_to_restore(tmp_path):
    server = _fake_vllm(tmp_path, restart_backoff_s=0.1)
    restored = []

    async def restore() -> None:
        restored.append(server.url)

    await server.start(30)
    url = server.url
    watch = asyncio.create_task(server.supervise(30, on_restart=restore, every_s=0.05))
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)  # the whole server dies at once
        await _until(lambda: not server.serving)
        await _until(lambda: server.serving and server.restarts == 1)
        assert server.url == url and restored == [url]  # same port: the backend's URL holds
    finally:
        watch.cancel()
        await server.stop()


async def test_a_server_that_stops_answering_is_restarted(tmp_path):
    server = _fake_vllm(tmp_path, restart_backoff_s=0.1)
    await server.start(30)
    watch = asyncio.create_task(
        server.supervise(30, every_s=0.05, health_every_s=0.3, health_misses=2)
    )
    try:
        (hung,) = [p for p in _group(server.proc.pid) if p != server.proc.pid]
        os.kill(hung, signal.SIGSTOP)  # alive, but answers nothing: a hung engine
        await _until(lambda: server.restarts == 1 and server.serving)
        assert hung not in _group(server.proc.pid)
    finally:
        watch.cancel()
        await server.stop()


async def test_the_server_log_stays_bounded_across_starts(tmp_path, monkeypatch):
    from bot.models import vllm_server

    monkeypatch.setattr(vllm_server, "LOG_ROTATE_BYTES", 100)
    server = _fake_vllm(tmp_path)
    (tmp_path / "server.log").write_text("old run\n" * 50)
    await server.start(30)
    await server.stop()
    assert (tmp_path / "server.log.1").read_text().startswith("old run")
    assert (tmp_path / "server.log").read_text().lstrip().startswith("--- chinwag: starting")
    assert "--disable-uvicorn-access-log" in VLLMServer("m", log_file=tmp_path / "x").command()
