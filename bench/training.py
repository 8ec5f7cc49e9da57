"""Training: LoRA throughput and peak memory on the embedded model, and what a training cycle
does to the running bot's reply latency — measured side by side in one run.

1. A simulated log: users from chitchat-dataset talk to a scripted skill, every reply rated.
2. ``chinwag train --now`` alone with the default training configuration (rank 16, all-linear,
   batch 4 × 2 accumulation, max length 512, one epoch of the log; ``--steps N`` stops after N
   steps) → tokens/s (real tokens counted batch by batch) and peak memory; then the same
   beside a busy core (``bench/neighbours.py``), as on a shared machine.
3. The bot (real dialogue skill, SmolLM2) answers ``--messages`` messages one after another,
   idle → p50/p95.
4. The same messages while a second cycle trains in its own (niced) process → p50/p95.

Last line: JSON with ``train_tokens_per_s`` and ``reply_p95_ratio_during_training``.

    .venv/bin/python bench/training.py [--steps N] [--messages 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bot.logs import quiet_libraries

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_env(data_dir: Path, cache: Path, trainers: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(data_dir),
        CHINWAG_MODELS__CACHE_DIR=str(cache),
        CHINWAG_BOT__FALLBACK="fallback",
        CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING="false",
        CHINWAG_TRAINERS=json.dumps(trainers),
    )
    return env


async def simulate_log(data_dir: Path, cache: Path, chats: int) -> None:
    from bot import Reply, Skill, hookimpl
    from bot.core import Bot
    from bot.simulation.chat import ChatUser
    from bot.simulation.users import chitchat_conversations
    from bot.testing import chinwag_test_settings

    script: dict[str, str] = {}

    class Companion(Skill):
        name = "companion"

        async def score(self, message, ctx):
            return 1.0

        async def handle(self, message, ctx):
            return Reply(script.get(message.text, "ok"), rateable=True, model="m")

    class Plugin:
        @hookimpl
        def register_skills(self, register):
            register(Companion())

    settings = chinwag_test_settings(data_dir, {"bot": {"fallback": "fallback"}}, cache)
    settings.data_dir = data_dir
    talks = ([text for _, text in conv] for conv in chitchat_conversations())
    conversations = [t for t in talks if len(t) >= 6][:chats]
    async with Bot(settings, plugins=[Plugin()]) as bot:
        for i, blocks in enumerate(conversations):
            user = ChatUser(bot, chat_id=f"c{i}", user_id=f"u{i}")
            for said, answer in zip(blocks[0:6:2], blocks[1:7:2], strict=False):
                script[said] = answer
                (reply,) = await user.send(said)
                await bot.store.add_feedback(reply.id, "test", f"u{i}", 1)
        await bot.store.flush()


async def reply_latencies(data_dir: Path, cache: Path, prompts: list[str]) -> list[float]:
    from bot.core import Bot
    from bot.simulation.chat import ChatUser
    from bot.testing import chinwag_test_settings

    settings = chinwag_test_settings(
        data_dir, {"skills": {"dialogue": {"max_new_tokens": 32}}}, cache
    )
    async with Bot(settings) as bot:
        await bot.warmed()
        await ChatUser(bot, chat_id="warm").send("hello")  # loads the model
        out = []
        for i, text in enumerate(prompts):
            started = time.perf_counter()
            await ChatUser(bot, chat_id=f"bench-{i}-{time.time()}").send(text)
            out.append((time.perf_counter() - started) * 1000)
        return out


def train_once(data_dir: Path, log_dir: Path, cache: Path, trainers: dict) -> dict:
    """One ``chinwag train --now`` on a copy of the log; its report's figures for the adapter."""
    shutil.copytree(log_dir, data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "train", "--now"],
        env=child_env(data_dir, cache, trainers),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        # The cycle says why on its output; a bench that hides it leaves nothing to act on.
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise SystemExit(f"the training cycle failed (exit {done.returncode}):\n{tail}")
    (report_path,) = (data_dir / "trainers" / "reports").glob("*/report.json")
    result = json.loads(report_path.read_text())["adapters"]["companion"]
    print(
        f"  {result['train_tokens_per_s']:.0f} tokens/s, peak memory "
        f"{result['peak_memory_mb']:.0f} MB, {result['train_steps']} steps "
        f"({result['decision']}), load average {os.getloadavg()[0]:.2f}"
    )
    return result


def p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--steps", type=int, default=None, help="stop after this many steps (default: one epoch)"
    )
    parser.add_argument("--messages", type=int, default=12)
    parser.add_argument("--chats", type=int, default=60)
    args = parser.parse_args()

    from bench.neighbours import busy_core
    from bot.simulation.users import _chitchat

    load_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="chinwag-bench-training-"))
    cache = Path(tempfile.gettempdir()) / "chinwag-model-cache"
    log_dir = work / "log"
    print(f"simulating {args.chats} rated conversations …", flush=True)
    asyncio.run(simulate_log(log_dir, cache, args.chats))
    lora: dict = {"min_examples": 10}
    if args.steps:
        lora["max_steps"] = args.steps
    trainers = {"adapters": ["companion"], "lora": lora}

    length = f"{args.steps} steps" if args.steps else "one epoch"
    print(f"training alone ({length}, default LoRA shape) …", flush=True)
    result = train_once(work / "alone", log_dir, cache, trainers)
    print(f"training beside a busy core ({length}) …", flush=True)
    with busy_core():
        beside = train_once(work / "beside", log_dir, cache, trainers)

    prompts = [c[0] for c in _chitchat()[200 : 200 + args.messages]]
    print(f"reply latency, idle ({len(prompts)} messages) …", flush=True)
    idle = asyncio.run(reply_latencies(work / "serve-idle", cache, prompts))

    busy_dir = work / "busy"
    shutil.copytree(log_dir, busy_dir)
    long_run = {**trainers, "lora": {**trainers["lora"], "max_steps": 10_000}}
    child = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "train", "--now"],
        env=child_env(busy_dir, cache, long_run),
        stdout=subprocess.DEVNULL,
        stderr=(work / "busy-train.log").open("w"),
    )
    try:
        checkpoints = busy_dir / "trainers" / "checkpoints"
        deadline = time.monotonic() + 300
        while not any(checkpoints.rglob("*")) and time.monotonic() < deadline:
            time.sleep(0.5)  # until training proper has started
        time.sleep(5)
        print("reply latency, during training …", flush=True)
        busy = asyncio.run(reply_latencies(work / "serve-busy", cache, prompts))
        still_training = child.poll() is None
    finally:
        child.kill()
        child.wait()
    figures = {
        "load_average_start": load_start,
        "train_tokens_per_s": result["train_tokens_per_s"],
        "train_steps": result["train_steps"],
        "train_tokens_per_s_beside_busy_core": beside["train_tokens_per_s"],
        "train_peak_memory_mb": result["peak_memory_mb"],
        "reply_p50_ms_idle": round(statistics.median(idle), 1),
        "reply_p95_ms_idle": round(p95(idle), 1),
        "reply_p50_ms_during_training": round(statistics.median(busy), 1),
        "reply_p95_ms_during_training": round(p95(busy), 1),
        "reply_p95_ratio_during_training": round(p95(busy) / p95(idle), 2),
        "training_ran_throughout": still_training,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "targets": {"train_tokens_per_s": ">= 400", "reply_p95_ratio_during_training": "<= 1.3"},
    }
    for k, v in figures.items():
        if k != "targets":
            print(f"  {k}: {v}")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
