"""Router throughput and per-message overhead through ``Bot.handle`` with real SQLite logging.

Two phases per concurrency level (1, 16 and 256 chats):

* **throughput** — closed loop: each chat sends its next message as soon as the previous one is
  answered; messages per second over the whole run.
* **overhead** — open loop: the same chats send at a fixed aggregate rate (Poisson arrivals,
  ``--rate`` messages/s, well under capacity) and we record each message's time in
  ``Bot.handle`` minus the time spent inside the skill — what the core adds (logging both
  directions durably, routing, bookkeeping). Under a closed loop at saturation that figure would
  just be queueing delay (Little's law), which says nothing about the core's cost.

The last line is a JSON object with the figures; ``msgs_per_s`` and ``p99_overhead_ms`` are the
256-chat values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot import Context, Message, Reply, Skill, hookimpl
from bot.core import Bot
from bot.logs import quiet_libraries
from bot.testing import chinwag_test_settings

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars


class Trivial(Skill):
    name = "trivial"
    description = "Answers instantly."

    async def score(self, message: Message, ctx: Context) -> float:
        return 1.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        return Reply("ok")


class Plugin:
    @hookimpl
    def register_skills(self, register):
        register(Trivial())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def closed_loop(bot: Bot, chats: int, total: int) -> float:
    per_chat = max(1, total // chats)
    run = f"{chats}-{total}-{time.perf_counter_ns()}"

    async def chat(c: int) -> None:
        for i in range(per_chat):
            await bot.handle(
                Message("bench", f"c{c}", f"u{c}", "hello", message_id=f"{run}-{c}-{i}")
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(chat(c) for c in range(chats)))
    return per_chat * chats / (time.perf_counter() - t0)


async def open_loop(bot: Bot, chats: int, rate: float, seconds: float) -> list[float]:
    run = f"{chats}-{rate}"
    overheads: list[float] = []
    rng = random.Random(7)
    tasks = []

    async def one(c: int, i: int) -> None:
        t0 = time.perf_counter()
        m = Message("bench", f"o{c}", f"u{c}", "hello", message_id=f"{run}-{c}-{i}")
        replies = await bot.handle(m)
        total = (time.perf_counter() - t0) * 1000
        if not replies:
            raise RuntimeError(f"no reply to {m.dedup_key}")
        overheads.append(total - replies[0].metadata.get("skill_ms", 0.0))

    start = time.perf_counter()
    next_at = start
    i = 0
    while next_at - start < seconds:
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rng.randrange(chats), i)))
        i += 1
    await asyncio.gather(*tasks)
    return overheads


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="open-loop msgs/s (at most 25%% of capacity)"
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = chinwag_test_settings(Path(tmp))
        async with Bot(settings, plugins=[Plugin()]) as bot:
            await closed_loop(bot, 16, 2000)  # warm-up: caches, SQLite pages
            for chats in (1, 16, 256):
                total = args.messages if chats > 1 else args.messages // 4
                rate = await closed_loop(bot, chats, total)
                # Light load, so the figure is the core's cost and not saturation queueing.
                offered = min(args.rate, 0.25 * rate)
                over = await open_loop(bot, chats, offered, args.seconds)
                p50, p99 = pct(over, 0.50), pct(over, 0.99)
                results[f"msgs_per_s_{chats}"] = round(rate, 1)
                results[f"p50_overhead_ms_{chats}"] = round(p50, 3)
                results[f"p99_overhead_ms_{chats}"] = round(p99, 3)
                print(
                    f"{chats:>4} chats: {rate:8.0f} msgs/s closed loop | open loop at "
                    f"{offered:.0f}/s: overhead p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                    f"mean {statistics.fmean(over):.2f} ms ({len(over)} msgs)"
                )
            stored = await bot.store.count_messages()
    results["msgs_per_s"] = results["msgs_per_s_256"]
    results["p99_overhead_ms"] = results["p99_overhead_ms_256"]
    results["rows_logged"] = stored
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
