"""The remote backend against a local OpenAI-compatible server process.

The stand-in server (tests/fake_openai_server.py) runs as a separate process on a real socket
and speaks the chat-completions protocol the way vLLM does, including runtime LoRA loading; it
can be told to fail, to be slow, or to die in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bot.models import ModelError, UnknownAdapter
from bot.models.remote import RemoteBackend
from bot.models.types import GenerationParams

SERVER = Path(__file__).with_name("fake_openai_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    url = f"http://127.0.0.1:{port}"

    def control(**settings):
        req = urllib.request.Request(
            f"{url}/control", data=json.dumps(settings).encode(), method="POST"
        )
        return json.loads(urllib.request.urlopen(req).read())

    yield url, control, proc
    proc.kill()
    proc.wait()


def ask(text):
    return [{"role": "user", "content": text}]


P = GenerationParams(max_new_tokens=16)


async def test_chat_completion_with_the_adapter_as_the_model_name(server, tmp_path):
    url, control, _ = server
    backend = RemoteBackend(url, model="smollm2", retries=0)
    try:
        plain = await backend.generate(ask("hello"), P)
        assert plain.text == "echo(smollm2): hello"
        assert (plain.model, plain.adapter, plain.completion_tokens) == ("smollm2", None, 2)
        await backend.load_adapter("qa", tmp_path / "qa-7", "7")
        tuned = await backend.generate(ask("hello"), P, "qa")
        assert tuned.text == "echo(qa-v7): hello"
        assert (tuned.adapter, tuned.adapter_version) == ("qa", "7")
        await backend.load_adapter("qa", tmp_path / "qa-8", "8")  # hot-swap
        assert (await backend.generate(ask("x"), P, "qa")).text == "echo(qa-v8): x"
        assert control()["adapters"] == {"qa-v8": str(tmp_path / "qa-8")}
        with pytest.raises(UnknownAdapter, match="loaded: qa"):
            await backend.generate(ask("x"), P, "dialogue")
    finally:
        await backend.stop()


async def test_streaming_yields_pieces_then_the_whole_reply(server):
    url, _, _ = server
    backend = RemoteBackend(url, model="smollm2", retries=0)
    pieces: asyncio.Queue = asyncio.Queue()
    try:
        result = await backend.generate(ask("one two three"), P, stream=pieces)
    finally:
        await backend.stop()
    got = []
    while (piece := pieces.get_nowait()) is not None:
        got.append(piece)
    assert len(got) > 1
    assert "".join(got).strip() == result.text == "echo(smollm2): one two three"


async def test_rate_limits_and_server_errors_are_retried_with_backoff(server):
    url, control, _ = server
    control(fail_next=3, fail_status=503)
    backend = RemoteBackend(url, model="smollm2", retries=3, backoff_s=0.01)
    try:
        assert (await backend.generate(ask("hi"), P)).text == "echo(smollm2): hi"
        control(fail_next=1, fail_status=429)
        assert (await backend.generate(ask("again"), P)).text == "echo(smollm2): again"
        control(fail_next=10, fail_status=500)
        with pytest.raises(ModelError, match="unavailable after 4 attempts"):
            await backend.generate(ask("hi"), P)
    finally:
        await backend.stop()


async def test_a_bad_request_is_not_retried_and_says_why(server):
    url, control, _ = server
    control(fail_next=1, fail_status=400)
    backend = RemoteBackend(url, model="smollm2", retries=3, backoff_s=0.01)
    try:
        with pytest.raises(ModelError, match="HTTP 400"):
            await backend.generate(ask("hi"), P)
        assert control()["requests"] == 1
    finally:
        await backend.stop()


async def test_a_server_that_is_down_is_a_clear_error():
    backend = RemoteBackend(
        f"http://127.0.0.1:{free_port()}", model="smollm2", retries=1, backoff_s=0.01
    )
    try:
        started = time.perf_counter()
        with pytest.raises(ModelError, match="unavailable after 2 attempts"):
            await backend.generate(ask("hi"), P)
        assert time.perf_counter() - started < 10
    finally:
        await backend.stop()


async def test_a_server_dying_mid_stream_fails_that_request_clearly(server):
    url, control, proc = server
    control(die_mid_stream=True)
    backend = RemoteBackend(url, model="smollm2", retries=2, backoff_s=0.01)
    pieces: asyncio.Queue = asyncio.Queue()
    try:
        with pytest.raises(ModelError, match="dropped the stream after 2 pieces"):
            await backend.generate(ask("a b c d e f"), P, stream=pieces)
    finally:
        await backend.stop()
    assert pieces.get_nowait() is not None  # the user saw the start of the answer
    proc.wait(timeout=10)  # the server process really died


async def test_the_runtime_uses_the_remote_backend_from_configuration(server, tmp_path):
    from bot.config import load_settings
    from bot.models import ModelRuntime

    url, _, _ = server
    settings = load_settings(
        overrides={
            "data_dir": tmp_path,
            "models": {"backend": "remote", "remote_url": url, "base_model": "smollm2"},
        }
    )
    runtime = ModelRuntime(settings)
    try:
        assert (await runtime.generate(ask("hi"))).text == "echo(smollm2): hi"
        assert (
            "".join([p async for p in runtime.stream(ask("a b"))]).strip() == "echo(smollm2): a b"
        )
    finally:
        await runtime.stop()


async def test_a_saturated_server_refuses_at_once_what_it_cannot_finish_in_time(server):
    """Past its capacity a vLLM server queues; a reply that would wait past its deadline is
    refused at once, from the server's own /metrics, rather than after the user waited it
    out — and the replies that are admitted arrive in time."""
    from bot.models import RuntimeBusy

    url, control, _ = server
    control(slots=1, delay_s=0.4)  # one request at a time, 0.4 s each: 2.5 a second
    backend = RemoteBackend(url, model="smollm2", retries=0)
    backend.load.interval_s, backend.load.min_window_s = 0.1, 1.0
    try:
        await backend.start()
        # A busy spell with time to spare: everything is served, and the figures fill in.
        await asyncio.gather(*(backend.generate(ask(f"warm {i}"), P) for i in range(6)))

        async def one(i: int) -> tuple[str, float, float]:
            t0 = time.monotonic()
            try:
                await backend.generate(ask(f"q{i}"), P, deadline=t0 + 2.0)
                return "answer", time.monotonic() - t0, 0.0
            except RuntimeBusy as exc:
                return "busy", time.monotonic() - t0, exc.retry_after_s

        outcomes = await asyncio.gather(*(one(i) for i in range(12)))
        answered = [t for kind, t, _ in outcomes if kind == "answer"]
        refused = [t for kind, t, _ in outcomes if kind == "busy"]
        assert all(retry >= 1 for kind, _, retry in outcomes if kind == "busy")
        assert len(answered) >= 2 and len(refused) >= 5, outcomes
        assert max(refused) < 0.5  # at once, not at the deadline
        assert max(answered) < 2.0  # admitted replies made it
    finally:
        await backend.stop()


async def test_a_server_without_vllm_metrics_is_not_watched(tmp_path):
    """TGI, llama.cpp's server or a proxy: no admission figures, requests go as before."""
    from aiohttp import web

    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend = RemoteBackend(f"http://127.0.0.1:{port}", model="m", retries=0)
    try:
        await backend.start()
        await backend.load.poll()
        assert backend.load.available is False
    finally:
        await backend.stop()
        await runner.cleanup()


def test_the_admission_estimate_follows_the_servers_queue():
    from bot.models.server_load import LoadWatch, Sample

    watch = LoadWatch("http://x/metrics", lambda: None, interval_s=1.0, min_window_s=2.0)

    def sample(at, waiting, running, finished):
        return Sample(at, waiting, running, finished, inference_sum=finished * 2.0,
                      inference_count=finished)  # fmt: skip

    watch.samples.extend([sample(0, 0, 1, 0)])
    assert watch.estimate(now=0.5) == (0.0, 0.0)  # an idle server: start at once
    # Full: 4 running (its slots) and a queue; 2 requests finish a second, 2 s each.
    watch.samples.extend(sample(t, 6, 4, 2 * t) for t in (1, 2, 3, 4))
    wait, service = watch.estimate(now=4.5)
    assert service == 2.0 and wait == 6 / 2
    watch.sent()
    watch.sent()
    assert watch.estimate(now=4.5)[0] == 8 / 2  # ours, not yet in its figures, count too
    assert watch.estimate(now=20) is None  # stale figures say nothing


async def test_a_reply_the_deadline_cuts_short_keeps_what_arrived(server):
    """As the local backend's rows do: the user gets the words generated in time, marked as
    cut by the deadline, not an error — also when the caller did not ask for a stream."""
    url, control, _ = server
    control(piece_delay_s=0.25)
    backend = RemoteBackend(url, model="smollm2", retries=0)
    try:
        t0 = time.monotonic()
        gen = await backend.generate(
            ask("one two three four five six seven eight nine ten"), P, deadline=t0 + 1.0
        )
        assert time.monotonic() - t0 < 1.5
        assert gen.finish_reason == "deadline"
        assert gen.text.startswith("echo(smollm2): one") and "ten" not in gen.text
    finally:
        await backend.stop()


def test_a_batching_server_that_shares_its_tokens_too_thinly_refuses_long_replies():
    """vLLM runs every request it can at once: overload shows as each reply getting a thinner
    share of the token rate, not as a queue. A reply that could not finish in time on that
    share is refused at once; a short one, or one with time enough, is sent."""
    from bot.models.server_load import LoadWatch, Sample

    watch = LoadWatch("http://x/metrics", lambda: None, interval_s=1.0, min_window_s=2.0)
    now = time.monotonic()

    def second(t: int) -> Sample:  # 10 running, 100 tokens/s between them, 60-token replies
        return Sample(
            now - 4 + t,
            waiting=0,
            running=10,
            finished=t,
            inference_sum=6.0 * t,
            inference_count=t,
            generated=100.0 * t,
            reply_tokens_sum=60.0 * t,
            reply_count=t,
        )

    watch.samples.extend(second(t) for t in range(5))
    wait, service = watch.estimate(now=now)
    assert wait == 0.0 and service == 60 * 11 / 100  # shared 11 ways with ours
    assert watch.estimate(now=now, max_tokens=20)[1] == 20 * 11 / 100
    assert watch.refuse(now + 5.0) is not None  # 6.6 s (x1.25) cannot fit in 5
    assert watch.refuse(now + 10.0) is None
    assert watch.refuse(now + 5.0, max_tokens=20) is None  # 2.2 s does


async def test_a_server_that_ignores_streaming_still_answers(server):
    """Replies are asked for as a stream; a server that sends the whole JSON reply instead
    (some OpenAI-compatible proxies do) still works, streamed callers included."""
    url, control, _ = server
    control(ignore_stream=True)
    backend = RemoteBackend(url, model="smollm2", retries=0)
    try:
        whole = await backend.generate(ask("hi there"), P)
        assert whole.text == "echo(smollm2): hi there" and whole.finish_reason == "stop"
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        streamed = await backend.generate(ask("hi there"), P, stream=pieces)
        assert streamed.text == whole.text and pieces.get_nowait() == whole.text
    finally:
        await backend.stop()
