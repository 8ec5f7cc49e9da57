"""Overload benchmark: the real ``chinwag run`` over its HTTP API, past its model capacity.

The bot runs as its own process (defaults, HTTP API on the loopback, no training schedule).
First its model capacity is measured: ``--capacity-chats`` chats in a closed loop, replies per
second. Then, for each load level (0.5×, 1×, 2× and 4× that capacity, ``--seconds`` each), new
chats arrive open-loop (Poisson) and each sends one message over ``/v1/messages/stream``; a
steady stream of ``/help`` requests from other users runs beside them. Clients are bounded
(``--max-clients``) and give up at the reply deadline plus a grace second.

Per level it prints goodput (model answers finished within the deadline, per second; an
answer the deadline cut short counts as a reply but not as goodput, ``cut_share``), the share
of honest "busy" replies, the share of messages that got any reply within the deadline, p50/p95
time to first token and to the full reply, ``/help`` p99, and RSS. At the end it sends SIGTERM
while a 4× load is in flight and measures how long the process takes to exit.

Last line: a JSON object with ``help_p99_ms_at_4x``, ``replied_within_deadline_at_4x``,
``goodput_ratio_4x_vs_1x``, ``rss_after_over_warm``, ``sigterm_exit_s`` and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from bench.neighbours import cpu_limited, join  # noqa: E402

TOKEN = "bench-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
MESSAGES = [
    "Hi! How are you today?",
    "Can you give me a tip for sleeping better?",
    "What should I cook for dinner tonight?",
    "Tell me a fun story about octopuses.",
    "I had a rough day at work.",
    "How do I stay focused while studying?",
    "What's a good way to start running?",
    "Any ideas for a rainy weekend?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Outcome:
    kind: str  # answer | busy | notice | error | timeout | refused | failed
    total_s: float
    ttft_s: float | None = None


@dataclass
class Level:
    name: str
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)
    help_ms: list[float] = field(default_factory=list)
    dropped: int = 0  # arrivals refused by the client bound


async def one_chat(
    session: aiohttp.ClientSession, url: str, chat: str, text: str, deadline_s: float
) -> Outcome:
    t0 = time.perf_counter()
    ttft = None
    kind = "failed"
    try:
        async with asyncio.timeout(deadline_s + 1.0):
            body = {"chat_id": chat, "user_id": chat, "text": text}
            async with session.post(
                f"{url}/v1/messages/stream", json=body, headers=HEADERS
            ) as resp:
                event = None
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "token" and ttft is None:
                        ttft = time.perf_counter() - t0
                    elif line.startswith("data:") and event == "reply":
                        reply = json.loads(line[5:])
                        kind = reply["kind"] if reply["kind"] != "answer" or reply["text"] else kind
                        if kind == "answer" and reply.get("cut_short"):
                            kind = "cut"  # whole sentences, but the model had not finished
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                    elif event == "done":
                        break
    except TimeoutError:
        kind = "timeout"
    except aiohttp.ClientConnectorError:
        kind = "refused"  # nothing listening: the bot had closed its port (shutting down)
    except aiohttp.ClientError:
        kind = "failed"
    return Outcome(kind, time.perf_counter() - t0, ttft)


async def help_stream(
    session: aiohttp.ClientSession, url: str, rate: float, stop: asyncio.Event, out: list[float]
) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        try:
            body = {"chat_id": f"help-{i}", "user_id": f"help-{i}", "text": "/help"}
            async with session.post(f"{url}/v1/messages", json=body, headers=HEADERS) as resp:
                await resp.read()
            out.append((time.perf_counter() - t0) * 1000)
        except aiohttp.ClientError:
            out.append(float("inf"))
        await asyncio.sleep(1 / rate)


async def run_level(
    url: str, level: Level, seconds: float, deadline_s: float, max_clients: int, help_rate: float
) -> None:
    rng = random.Random(hash(level.name))
    stop = asyncio.Event()
    tasks: set[asyncio.Task[Outcome]] = set()
    connector = aiohttp.TCPConnector(limit=max_clients + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        helper = asyncio.create_task(help_stream(session, url, help_rate, stop, level.help_ms))
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            await asyncio.sleep(rng.expovariate(level.rate))
            n += 1
            if len(tasks) >= max_clients:
                level.dropped += 1
                continue
            chat = f"{level.name}-{n}"
            task = asyncio.create_task(
                one_chat(session, url, chat, MESSAGES[n % len(MESSAGES)], deadline_s)
            )
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), level.outcomes.append(t.result())))
        if tasks:
            await asyncio.wait(tasks)
        stop.set()
        await helper


def summary(level: Level, seconds: float, deadline_s: float) -> dict[str, float]:
    o = level.outcomes
    n = max(1, len(o))
    answers = [x for x in o if x.kind == "answer" and x.total_s <= deadline_s]
    busy = [x.total_s for x in o if x.kind == "busy"]
    cut = [x for x in o if x.kind == "cut" and x.total_s <= deadline_s]
    replied = [
        x for x in o if x.kind in ("answer", "cut", "busy", "notice") and x.total_s <= deadline_s
    ]
    ttft = [x.ttft_s for x in answers if x.ttft_s is not None]
    full = [x.total_s for x in answers]
    helps = [h for h in level.help_ms if h != float("inf")]

    def pct(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)), 3) if xs else float("nan")

    return {
        "offered_per_s": round(level.rate, 3),
        "messages": len(o),
        "goodput_per_s": round(len(answers) / seconds, 3),
        # Answers the deadline cut (whole sentences kept): replies, but not goodput.
        "cut_share": round(len(cut) / n, 3),
        "busy_share": round(len(busy) / n, 3),
        "busy_p50_s": pct(busy, 50),  # how long a user waited to hear "busy"
        "busy_p95_s": pct(busy, 95),
        "replied_within_deadline": round(len(replied) / n, 3),
        "timeouts": sum(x.kind in ("timeout", "failed") for x in o),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "full_p50_s": pct(full, 50),
        "full_p95_s": pct(full, 95),
        "help_p99_ms": pct(helps, 99) if len(helps) == len(level.help_ms) else float("inf"),
        "help_requests": len(level.help_ms),
        "client_dropped": level.dropped,
    }


async def capacity(url: str, chats: int, seconds: float, deadline_s: float) -> float:
    """Replies per second with ``chats`` chats in a closed loop (each waits for its reply)."""
    done = 0
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:

        async def loop(c: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < end:
                i += 1
                out = await one_chat(
                    session, url, f"cap-{c}-{i}", MESSAGES[(c + i) % len(MESSAGES)], deadline_s
                )
                if out.kind == "answer":
                    done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(loop(c) for c in range(chats)))
        return done / (time.monotonic() - t0)


def start_bot(
    data: Path, port: int, models: str = "", cgroup: Path | None = None
) -> subprocess.Popen[bytes]:
    config = data / "chinwag.toml"
    config.write_text(
        f"""data_dir = "{data}"
{models}
[http]
enabled = true
port = {port}
[trainers]
schedule = ""
[skills.sentiment]
train_if_missing = false
[rate_limit]
enabled = false
"""
    )
    env = dict(os.environ, CHINWAG_HTTP__TOKENS=json.dumps([TOKEN]))
    log = (data / "bot.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "--config", str(config), "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=None if cgroup is None else functools.partial(join, cgroup),
    )


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    until = time.monotonic() + 300
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            if proc.poll() is not None:
                raise RuntimeError("the bot exited during start")
            try:
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the bot did not get ready")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--levels", default="0.5,1,2,4")
    parser.add_argument("--capacity-chats", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=30)
    parser.add_argument("--deadline", type=float, default=30.0, help="the dialogue skill's")
    parser.add_argument("--help-rate", type=float, default=5.0)
    parser.add_argument("--max-clients", type=int, default=512)
    parser.add_argument(
        "--backend",
        choices=["local", "vllm"],
        default="local",
        help="vllm: the bot starts and supervises vLLM's server (VLLM_PYTHON or .venv-vllm)",
    )
    parser.add_argument(
        "--no-admission", action="store_true", help="vllm: no admission from its /metrics"
    )
    parser.add_argument(
        "--cpu-limit",
        type=float,
        default=None,
        help="run the bot in a control group limited to this many cores' CPU time, as a "
        "container's --cpus does (root, Linux)",
    )
    args = parser.parse_args()
    models = ""
    if args.backend == "vllm":
        python = os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
        models = (
            f'[models]\nbackend = "vllm"\nremote_admission = {str(not args.no_admission).lower()}'
            f'\n[models.vllm]\npython = "{python}"\nargs = ["--max-model-len", "2048"]\n'
        )
    result: dict[str, object] = {
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "backend": args.backend + (" (no admission)" if args.no_admission else ""),
    }
    if args.cpu_limit is not None:
        result["cpu_limit"] = args.cpu_limit
    with contextlib.ExitStack() as stack:
        cgroup = None
        if args.cpu_limit is not None:
            cgroup = stack.enter_context(cpu_limited(args.cpu_limit))
            if cgroup is None:
                parser.error("--cpu-limit: no cpu control group can be made here")
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        await _run(args, result, Path(tmp), models, cgroup)
    print(json.dumps(result))


async def _run(
    args: argparse.Namespace,
    result: dict[str, object],
    data: Path,
    models: str,
    cgroup: Path | None,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_bot(data, port, models, cgroup)
    try:
        await wait_ready(url, proc)
        # A first burst, then a quiet moment: the runtime prepares its faster CPU layers
        # and settles its thread count when it first idles — capacity is measured after.
        await capacity(url, args.capacity_chats, 10, args.deadline)
        await asyncio.sleep(3)
        cap = await capacity(url, args.capacity_chats, args.capacity_seconds, args.deadline)
        warm = rss_mb(proc.pid)
        print(f"capacity: {cap:.2f} replies/s ({args.capacity_chats} chats); RSS {warm:.0f} MB")
        result.update(capacity_per_s=round(cap, 3), rss_warm_mb=round(warm))
        levels = {}
        for factor in [float(x) for x in args.levels.split(",")]:
            level = Level(f"x{factor:g}", cap * factor)
            await run_level(
                url, level, args.seconds, args.deadline, args.max_clients, args.help_rate
            )
            s = summary(level, args.seconds, args.deadline)
            s["rss_mb"] = round(rss_mb(proc.pid))
            levels[factor] = s
            print(f"{level.name:>5}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        await asyncio.sleep(10)  # idle: what the process keeps
        after = rss_mb(proc.pid)
        print(f"RSS after the run and 10 s idle: {after:.0f} MB ({after / warm:.2f}x warm)")
        # SIGTERM with a 4x load in flight.
        level = Level("sigterm", cap * 4)
        load = asyncio.create_task(
            run_level(url, level, 8, args.deadline, args.max_clients, args.help_rate)
        )
        await asyncio.sleep(6)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - t0 < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        exit_s = time.monotonic() - t0
        await load
        kinds = {k: sum(o.kind == k for o in level.outcomes) for k in ("answer", "busy")}
        kinds["shutdown_notice"] = sum(o.kind == "notice" for o in level.outcomes)
        kinds["refused_after_close"] = sum(o.kind == "refused" for o in level.outcomes)
        kinds["cut"] = sum(o.kind in ("failed", "timeout") for o in level.outcomes)
        print(f"SIGTERM under load: exited in {exit_s:.1f} s (code {proc.returncode}); {kinds}")
        # What the bot logged while stopping (each step's time): why a slow stop was slow.
        lines = (data / "bot.log").read_text(errors="replace").splitlines()
        start = max((i for i, x in enumerate(lines) if "stopping (signal" in x), default=0)
        for line in lines[start:][-12:]:
            print(f"  | {line[:160]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    top = max(levels)
    one = levels.get(1.0) or levels[min(levels, key=lambda f: abs(f - 1))]
    result.update(
        levels={f"x{k:g}": v for k, v in levels.items()},
        help_p99_ms_at_4x=levels[top]["help_p99_ms"],
        replied_within_deadline_at_4x=levels[top]["replied_within_deadline"],
        goodput_ratio_4x_vs_1x=round(
            levels[top]["goodput_per_s"] / max(one["goodput_per_s"], 1e-9), 3
        ),
        rss_after_over_warm=round(after / warm, 3),
        sigterm_exit_s=round(exit_s, 2),
        sigterm_outcomes=kinds,
        load_average_end=[round(x, 2) for x in os.getloadavg()],
    )


if __name__ == "__main__":
    asyncio.run(main())
