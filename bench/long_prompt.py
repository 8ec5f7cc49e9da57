"""A long prompt among short chats: what it costs the others, in memory and in pauses.

A user pastes a log (a skill builds a long context) while 15 others are streaming replies.
The bot's model runtime (the embedded SmolLM2, in process) serves 15 short chats of 128 new
tokens; 0.3 s in, a prompt of ``--words`` words (~2.8 tokens each) arrives. Measured per
configuration, each in a process of its own (RSS is per process):

* the process's peak RSS over its warm level while the round runs;
* the short replies' time (p50, max) and the pauses between their streamed pieces (p99,
  max): a prompt prefilled whole stops every running reply for as long as it takes;
* the long prompt's own time to its reply.

Configurations, side by side in one run: ``one batch`` — every running row in one
left-padded cache, prompts prefilled whole (chinwag before 2026-12-08:
``max_padding_mb`` and ``prefill_chunk_tokens`` set out of reach) — against the defaults
(cohorts of like lengths, 256-token chunks). The last line is a JSON object with both and
the ratios ``memory_ratio`` and ``max_pause_ratio`` (one batch over defaults), per size.
``--busy`` runs it all beside a busy core. ``--pasters 2 --late 4``: two long prompts come
together and four of the chats are short messages sent after them, whose time to a first
token is reported (a long prompt waiting for another's chunks held them up until
2026-12-08).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.neighbours import busy_core  # noqa: E402

CONFIGS = {
    "one_batch": {"models": {"max_padding_mb": 1e9, "prefill_chunk_tokens": 1_000_000}},
    "defaults": {},
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


async def child(
    words: int, overrides: dict, data_dir: str, pasters: int = 1, late: int = 0
) -> dict:
    from bot.config import load_settings
    from bot.models import ModelRuntime

    peak = [0.0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    runtime = ModelRuntime(load_settings(overrides={"data_dir": data_dir, **overrides}))
    await runtime.start()
    await runtime.settled(180)
    await runtime.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)
    base = rss_mb()
    peak[0] = base
    pasted = "Summarise this for me: " + " ".join(f"word{i % 50}" for i in range(words))
    tokens = len(
        runtime._backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": pasted}], add_generation_prompt=True, tokenize=True
        )
    )
    pauses: list[float] = []
    durations: list[float] = []

    async def short(i: int) -> None:
        last = [time.monotonic()]
        started = last[0]

        async def on_text(_: str) -> None:
            now = time.monotonic()
            pauses.append(now - last[0])
            last[0] = now

        await runtime.generate(
            [{"role": "user", "content": f"Tell me a long story about a cat called number {i}."}],
            max_new_tokens=128,
            on_text=on_text,
        )
        durations.append(time.monotonic() - started)

    async def long(n: int) -> float:
        await asyncio.sleep(0.3 + 0.05 * n)
        started = time.monotonic()
        text = pasted if n == 0 else pasted.replace("word", f"item{n}-")
        await runtime.generate([{"role": "user", "content": text}], max_new_tokens=64)
        return time.monotonic() - started

    firsts: list[float] = []

    async def late_chat(i: int) -> None:
        # Sent after every long prompt: how long until its reply starts.
        await asyncio.sleep(0.3 + 0.05 * pasters + 0.1)
        started = time.monotonic()
        seen: list[float] = []

        async def on_text(_: str) -> None:
            if not seen:
                seen.append(time.monotonic() - started)

        await runtime.generate(
            [{"role": "user", "content": f"thanks, that helps ({i})"}],
            max_new_tokens=32,
            on_text=on_text,
        )
        firsts.extend(seen)

    t0 = time.monotonic()
    results = await asyncio.gather(
        *(short(i) for i in range(15 - late)),
        *(late_chat(i) for i in range(late)),
        *(long(n) for n in range(pasters)),
    )
    round_s = time.monotonic() - t0
    await runtime.stop()
    pauses.sort()
    return {
        "prompt_tokens": tokens,
        "peak_rss_over_warm_mb": round(peak[0] - base),
        "short_reply_p50_s": round(statistics.median(durations), 2),
        "short_reply_max_s": round(max(durations), 2),
        "pause_p99_ms": round(pauses[int(len(pauses) * 0.99)] * 1000),
        "pause_max_ms": round(pauses[-1] * 1000),
        "long_reply_s": round(results[-1], 2),
        "round_s": round(round_s, 2),
    } | (
        {
            "late_first_token_p50_s": round(statistics.median(firsts), 2),
            "late_first_token_max_s": round(max(firsts), 2),
        }
        if firsts
        else {}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", default="350,1400", help="long prompt sizes, in words")
    parser.add_argument("--busy", action="store_true", help="beside a busy core (a neighbour)")
    parser.add_argument(
        "--pasters", type=int, default=1, help="long prompts arriving together (0.05 s apart)"
    )
    parser.add_argument(
        "--late",
        type=int,
        default=0,
        help="of the 15 chats, this many short ones sent after the long prompts (their time "
        "to a first token is reported)",
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="which configurations, comma-separated"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        out = asyncio.run(
            child(spec["words"], spec["overrides"], spec["data_dir"], spec["pasters"], spec["late"])
        )
        print(json.dumps(out))
        return
    result: dict[str, object] = {
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "beside_a_busy_core": args.busy,
    }
    with tempfile.TemporaryDirectory() as data_dir, busy_core(args.busy):
        for words in (int(w) for w in args.words.split(",")):
            row: dict[str, dict] = {}
            for name in args.configs.split(","):
                spec = json.dumps(
                    {
                        "words": words,
                        "overrides": CONFIGS[name],
                        "data_dir": data_dir,
                        "pasters": args.pasters,
                        "late": args.late,
                    }
                )
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", spec],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    sys.exit(f"{name}: the child failed:\n{proc.stderr[-2000:]}")
                row[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{words} words, {name:>9}: {row[name]}", flush=True)
            result[f"words_{words}"] = row
            if "one_batch" in row and "defaults" in row:
                one, ours = row["one_batch"], row["defaults"]
                row["memory_ratio"] = round(
                    one["peak_rss_over_warm_mb"] / max(ours["peak_rss_over_warm_mb"], 1), 2
                )
                row["max_pause_ratio"] = round(
                    one["pause_max_ms"] / max(ours["pause_max_ms"], 1), 2
                )
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
