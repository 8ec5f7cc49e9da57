"""The HTTP API over a real socket: what a web chat widget or another service sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot import Command, Context, Message, Reply, Skill
from bot.adapters.http import make_app
from bot.core import Bot
from tests.conftest import EchoSkill, SkillsPlugin, core_settings

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Streamer(Skill):
    name = "streamer"
    commands = (Command("story"), Command("cut"))

    async def handle(self, message: Message, ctx: Context) -> Reply:
        if ctx.command == "cut":  # what dialogue returns when the deadline stopped the model
            return Reply(
                "The first sentence.", model="test-model", metadata={"cleaned": ["deadline"]}
            )
        for piece in ("Once ", "upon ", "a time."):
            await ctx.emit(piece)
        return Reply("Once upon a time.", rateable=True, model="test-model")


@pytest.fixture
async def client(tmp_path):
    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(EchoSkill(), Streamer())])
    await bot.start()
    async with TestClient(TestServer(make_app(bot, [TOKEN]))) as c:
        c.bot = bot
        yield c
    await bot.stop()


def sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_a_message_round_trip_returns_the_replies_as_json(client):
    resp = await client.post(
        "/v1/messages", json={"chat_id": "w1", "user_id": "ann", "text": "/echo hi"}, headers=AUTH
    )
    assert resp.status == 200
    (reply,) = (await resp.json())["replies"]
    assert (reply["text"], reply["skill"], reply["kind"]) == ("hi", "echo", "answer")
    assert isinstance(reply["id"], int) and reply["latency_ms"] >= 0
    assert reply["cut_short"] is False


async def test_a_reply_the_deadline_cut_short_says_so(client):
    resp = await client.post(
        "/v1/messages", json={"chat_id": "w9", "user_id": "ann", "text": "/cut"}, headers=AUTH
    )
    (reply,) = (await resp.json())["replies"]
    assert reply["text"] == "The first sentence." and reply["cut_short"] is True


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
async def test_requests_without_the_right_bearer_token_are_refused(client, headers):
    resp = await client.post(
        "/v1/messages", json={"chat_id": "w1", "user_id": "ann", "text": "hi"}, headers=headers
    )
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.get("/metrics", headers=headers)).status == 401
    assert await client.bot.store.count_messages() == 0  # nothing was processed


async def test_bad_bodies_are_a_400_naming_the_field(client):
    resp = await client.post("/v1/messages", data=b"\xff not json", headers=AUTH)
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]
    resp = await client.post("/v1/messages", json={"chat_id": "w1", "text": "hi"}, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"].startswith("user_id:")


async def test_streaming_sends_tokens_then_the_reply_then_done(client):
    resp = await client.post(
        "/v1/messages/stream",
        json={"chat_id": "w2", "user_id": "ann", "text": "/story"},
        headers=AUTH,
    )
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse(await resp.text())
    assert [e for e, _ in events] == ["token", "token", "token", "reply", "done"]
    assert "".join(d["text"] for e, d in events if e == "token") == "Once upon a time."
    assert events[3][1]["text"] == "Once upon a time." and events[3][1]["rateable"]


async def test_feedback_on_a_reply_is_stored_and_unknown_replies_are_a_404(client):
    resp = await client.post(
        "/v1/messages", json={"chat_id": "w3", "user_id": "bo", "text": "/story"}, headers=AUTH
    )
    reply_id = (await resp.json())["replies"][0]["id"]
    await client.bot.store.flush()
    resp = await client.post(
        "/v1/feedback", json={"reply_id": reply_id, "user_id": "bo", "rating": 1}, headers=AUTH
    )
    assert resp.status == 201
    assert [f.rating for f in await client.bot.store.feedback_for(reply_id)] == [1]
    resp = await client.post(
        "/v1/feedback", json={"reply_id": 12345, "user_id": "bo", "rating": -1}, headers=AUTH
    )
    assert resp.status == 404
    resp = await client.post(
        "/v1/feedback", json={"reply_id": reply_id, "user_id": "bo", "rating": 5}, headers=AUTH
    )
    assert resp.status == 400 and "rating" in (await resp.json())["error"]


async def test_health_is_open_and_metrics_count_messages_and_latency_per_skill(client):
    health = await client.get("/healthz")
    assert health.status == 200 and "echo" in (await health.json())["skills"]
    for text in ("/echo a", "/echo b", "/story"):
        await client.post(
            "/v1/messages", json={"chat_id": "w4", "user_id": "cy", "text": text}, headers=AUTH
        )
    body = await (await client.get("/metrics", headers=AUTH)).text()
    assert 'chinwag_messages_total{platform="http"} 3.0' in body
    assert 'chinwag_replies_total{kind="answer",skill="echo"} 2.0' in body
    assert 'chinwag_reply_latency_seconds_count{skill="streamer"} 1.0' in body
    assert "chinwag_inflight_messages 0.0" in body
    assert "chinwag_model_queue_depth" in body


async def test_the_dialogue_skill_streams_real_generated_tokens(tmp_path, chinwag_model_cache):
    settings = core_settings(
        tmp_path,
        {
            "bot": {"fallback": "dialogue"},
            "models": {"cache_dir": str(chinwag_model_cache)},
            "skills": {"dialogue": {"max_new_tokens": 16, "temperature": 0}},
        },
    )
    async with Bot(settings) as bot, TestClient(TestServer(make_app(bot, [TOKEN]))) as c:
        resp = await c.post(
            "/v1/messages/stream",
            json={"chat_id": "w5", "user_id": "di", "text": "Hi! How are you today?"},
            headers=AUTH,
        )
        events = sse(await resp.text())
    tokens = [d["text"] for e, d in events if e == "token"]
    (reply,) = [d for e, d in events if e == "reply"]
    assert len(tokens) > 1 and reply["skill"] == "dialogue" and reply["model"] == "smollm2"
    assert reply["text"].strip() and reply["text"].split()[0] in "".join(tokens)


def test_chinwag_run_serves_the_api_and_stops_gracefully_on_sigterm(tmp_path):
    import signal
    import time
    import urllib.request

    port = _free_port()
    proc = _chinwag_run(tmp_path / "data", port, CHINWAG_BOT__FALLBACK="fallback")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "never came up"
                time.sleep(0.2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/messages",
            data=json.dumps({"chat_id": "c", "user_id": "u", "text": "/help"}).encode(),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        replies = json.loads(urllib.request.urlopen(req, timeout=30).read())["replies"]
        assert replies[0]["skill"] == "help"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "HTTP API listening" in proc.stderr.read()


def test_a_stop_while_the_model_is_still_loading_exits_at_once_and_cleanly(tmp_path):
    """A container stopped during the first start (the model converting, ~20 s) exits with 0
    right away: the load is abandoned, not waited for, and not a crash on the way out
    (it used to end in SIGABRT, "terminate called without an active exception")."""
    import signal
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    # Its own data dir and so its own model cache: the load converts the GGUF.
    proc = _chinwag_run(tmp_path / "data", port, CHINWAG_TRAINERS__SCHEDULE="")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                pytest.fail("ready before the model loaded")
            except urllib.error.HTTPError as exc:
                reasons = json.loads(exc.read())["reasons"]
                if "the model is loading" in reasons:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "never came up"
            time.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 0, err[-2000:]
    assert took < 10
    assert "unfinished background work left behind: chinwag-model-load" in err
    assert "terminate called" not in err


async def test_readiness_is_open_and_says_why_a_worker_should_not_get_traffic(client):
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["ready"] is True and body["reasons"] == []
    client.bot._stopping = True  # what a SIGTERM sets while the bot drains
    resp = await client.get("/readyz")
    assert resp.status == 503 and "shutting down" in (await resp.json())["reasons"]
    client.bot._stopping = False


async def test_hostile_bodies_are_a_400_not_a_crash(client):
    nested = "[" * 100_000 + "]" * 100_000
    resp = await client.post(
        "/v1/messages", data=nested, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == 400 and "nested too deeply" in (await resp.json())["error"]
    for reply_id in (2**70, -(2**70), 0):
        resp = await client.post(
            "/v1/feedback", json={"reply_id": reply_id, "user_id": "u", "rating": 1}, headers=AUTH
        )
        assert resp.status == 400, reply_id
        assert "reply_id" in (await resp.json())["error"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chinwag_run(data: Path, port: int, **settings: str) -> subprocess.Popen[str]:
    """``chinwag run`` in a process of its own, serving the HTTP API on ``port``, with no
    CHINWAG_ setting from the test's environment: only these, and ``settings`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(data),
        CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING="false",
        CHINWAG_HTTP__ENABLED="true",
        CHINWAG_HTTP__PORT=str(port),
        CHINWAG_HTTP__TOKENS=json.dumps([TOKEN]),
        **settings,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run"], env=env, stderr=subprocess.PIPE, text=True
    )


def _post(port: int, text: str, chat: str, timeout: float = 60) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/messages",
        data=json.dumps({"chat_id": chat, "user_id": chat, "text": text}).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def test_sigterm_under_model_load_answers_everyone_and_exits_on_time(tmp_path, chinwag_model_cache):
    """In-flight generations are cancelled: each waiting user gets the short shutdown notice,
    every inbound message stays in the log, and the process is gone within its grace period."""
    import signal
    import sqlite3
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    port = _free_port()
    data = tmp_path / "data"
    proc = _chinwag_run(
        data,
        port,
        CHINWAG_MODELS__CACHE_DIR=str(chinwag_model_cache),
        CHINWAG_SKILLS__DIALOGUE__MAX_NEW_TOKENS="400",
        CHINWAG_SKILLS__DIALOGUE__MAX_REPLY_CHARS="5000",
        CHINWAG_BOT__SHUTDOWN_TIMEOUT_S="15",
        CHINWAG_RATE_LIMIT__ENABLED="false",
        CHINWAG_TRAINERS__SCHEDULE="",
    )
    pool = ThreadPoolExecutor(6)
    try:
        until = time.monotonic() + 120
        while True:  # ready: started and the model loaded
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < until and proc.poll() is None, "never got ready"
                time.sleep(0.2)
        prompt = "Write a very long story about a dragon who learns to bake bread."
        chats = [pool.submit(_post, port, prompt, f"c{i}") for i in range(6)]
        while True:  # generation under way for all of them
            state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").read())
            if state["model"].get("running", 0) >= 1 and state["in_flight"] >= 6:
                break
            assert time.monotonic() < until, state
            time.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
        replies = [c.result(timeout=30)["replies"] for c in chats]
    finally:
        if proc.poll() is None:
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    assert code == 0 and took < 15
    notices = [r for rs in replies for r in rs if "restarting" in r["text"]]
    assert len(notices) == 6, replies
    db = sqlite3.connect(data / "chinwag.sqlite3")
    inbound = db.execute("select count(*) from messages where direction = 'in'").fetchone()[0]
    outbound = db.execute(
        "select count(*) from messages where direction = 'out' and text like '%restarting%'"
    ).fetchone()[0]
    assert (inbound, outbound) == (6, 6)


@pytest.mark.parametrize(
    ("child", "settings", "min_nice"),
    [
        ("the training schedule", {"CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING": "false"}, 0),
        (
            "the first sentiment training",
            {"CHINWAG_TRAINERS": '{"schedule": ""}'},
            15,  # [skills.sentiment] training_nice: replies come first
        ),
    ],
)
def test_a_trainer_child_does_not_outlive_a_killed_bot(tmp_path, child, settings, min_nice):
    """SIGKILL leaves no cleanup code running: the kernel ends the trainer process."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(settings)
    env.update(
        CHINWAG_DATA_DIR=str(tmp_path / "data"),
        CHINWAG_HTTP__ENABLED="true",
        CHINWAG_HTTP__PORT=str(_free_port()),
        CHINWAG_HTTP__TOKENS=json.dumps([TOKEN]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run"],
        env=env,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )

    def children() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
            except OSError:
                continue
            if pid.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                found.append(int(pid))
        return found

    try:
        until = time.monotonic() + 60
        while not (kids := children()):
            assert time.monotonic() < until and proc.poll() is None, f"no child for {child}"
            time.sleep(0.2)

        def nice(pid: int) -> int:
            with open(f"/proc/{pid}/stat") as fh:
                return int(fh.read().rsplit(")", 1)[1].split()[16])

        until = time.monotonic() + 10  # seen right after fork, it may not have reniced yet
        while min(nice(k) for k in kids) < min_nice and time.monotonic() < until:
            time.sleep(0.1)
        assert min(nice(k) for k in kids) >= min_nice
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        until = time.monotonic() + 15
        alive = list(kids)
        while alive and time.monotonic() < until:
            alive = [k for k in alive if os.path.exists(f"/proc/{k}")]
            for k in alive:  # reap it if we inherited it (we are not its parent: no zombie)
                with open(f"/proc/{k}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                        alive.remove(k)
            time.sleep(0.2)
        assert alive == [], f"{child} outlived the bot"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_enabling_the_api_without_a_token_is_a_configuration_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(CHINWAG_DATA_DIR=str(tmp_path / "data"), CHINWAG_HTTP__ENABLED="true")
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "http.tokens is empty" in result.stderr
