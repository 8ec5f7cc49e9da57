"""Generation benchmark: the runtime's batched path against one-at-a-time ``model.generate``.

For 1, 4 and 16 concurrent conversations, each asks its questions one after another (greedy,
up to ``--max-new-tokens``); we measure aggregate generated tokens/s and time to first token
(streamed) p50/p95. In the same run, on the same model object, the baseline generates the same
prompts sequentially with plain ``model.generate`` — what a bot holding a lock around one
``generate`` per request would do. Cold start is measured in fresh processes: process start to
first reply, with and without the converted-weights cache.

Last line: a JSON object with ``speedup_16`` (batched ÷ sequential tokens/s at 16),
``ttft_p95_s_16`` and ``cold_start_cached_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bot.config import load_settings
from bot.models import ModelRuntime

QUESTIONS = [
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "How do I boil an egg?",
    "What is a good name for a cat?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Suggest a quick breakfast.",
    "What does a plumber do?",
    "How do I reset a router?",
    "What is the tallest mountain?",
    "Tell me a fun fact about octopuses.",
    "How can I save money on groceries?",
    "What is photosynthesis?",
    "How do I write a polite complaint email?",
    "What is the boiling point of water?",
    "Recommend a board game for four people.",
]


def chat(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


async def batched(
    runtime: ModelRuntime, conversations: int, turns: int, max_new: int
) -> dict[str, float]:
    ttfts: list[float] = []
    tokens = 0

    async def conversation(c: int) -> None:
        nonlocal tokens
        for t in range(turns):
            q = QUESTIONS[(c + t * conversations) % len(QUESTIONS)]
            start = time.perf_counter()
            first = None
            pieces = []
            async for piece in runtime.stream(chat(q), max_new_tokens=max_new):
                if first is None:
                    first = time.perf_counter() - start
                pieces.append(piece)
            ttfts.append(first if first is not None else time.perf_counter() - start)
            tokens += len(
                runtime._backend.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(conversations)))
    elapsed = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p95_s": float(np.percentile(ttfts, 95)),
        "requests": len(ttfts),
    }


def sequential(runtime: ModelRuntime, prompts: list[str], max_new: int) -> float:
    backend = runtime._backend
    model, tok = backend.model, backend.tokenizer
    tokens = 0
    t0 = time.perf_counter()
    for q in prompts:
        enc = tok.apply_chat_template(
            chat(q), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        enc = enc.to(backend.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        tokens += len([t for t in new if t != tok.eos_token_id])
    return tokens / (time.perf_counter() - t0)


COLD = """
import asyncio, sys, time
from bot.config import load_settings
from bot.models import ModelRuntime
async def main():
    rt = ModelRuntime(load_settings(overrides={{"data_dir": {data!r}, "models": {{"device": {device!r}}}}}))
    await rt.generate([{{"role": "user", "content": "Hi!"}}], max_new_tokens=8)
    print(time.time(), flush=True)  # the first reply is in: the parent measures from spawn
    await rt.stop()
asyncio.run(main())
"""


def cold_start(data_dir: Path, device: str) -> float:
    """Seconds from spawning a fresh interpreter to its first generated reply."""
    code = COLD.format(data=str(data_dir), device=device)
    started = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        uncached = cold_start(data, args.device)  # converts and caches
        cached = cold_start(data, args.device)
        print(
            f"cold start: {uncached:.1f} s without the converted-weights cache, {cached:.1f} s with it"
        )
        result.update(
            cold_start_uncached_s=round(uncached, 2), cold_start_cached_s=round(cached, 2)
        )
        runtime = ModelRuntime(
            load_settings(
                overrides={
                    "data_dir": data,
                    "models": {"device": args.device, "max_batch_size": 16},
                }
            )
        )
        await runtime.start()
        print(f"device: {runtime._backend.device}")
        await runtime.generate(chat("warm up"), max_new_tokens=4)
        for n in (1, 4, 16):
            b = await batched(runtime, n, args.turns, args.max_new_tokens)
            prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(n * args.turns)]
            s = await asyncio.to_thread(sequential, runtime, prompts, args.max_new_tokens)
            speedup = b["tokens_per_s"] / s
            print(
                f"{n:>2} conversations: batched {b['tokens_per_s']:7.1f} tok/s, sequential {s:7.1f} tok/s, "
                f"speedup {speedup:5.2f}x | TTFT p50 {b['ttft_p50_s']:.3f} s, p95 {b['ttft_p95_s']:.3f} s"
            )
            result.update(
                {
                    f"batched_tokens_per_s_{n}": round(b["tokens_per_s"], 1),
                    f"sequential_tokens_per_s_{n}": round(s, 1),
                    f"speedup_{n}": round(speedup, 2),
                    f"ttft_p50_s_{n}": round(b["ttft_p50_s"], 3),
                    f"ttft_p95_s_{n}": round(b["ttft_p95_s"], 3),
                }
            )
        await runtime.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
