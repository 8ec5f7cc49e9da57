"""Generation benchmark: chinwag's runtime against plain ``generate`` and against vLLM's CPU build.

Three engines answer the same chat prompts (greedy, up to ``--max-new-tokens``, natural stops):

- **chinwag**: the runtime with its defaults (continuous batching, dtype and threads chosen by
  measurement), 1 and 16 concurrent conversations, each asking ``--turns`` questions in turn;
- **sequential**: plain transformers ``model.generate`` on the same weights, dtype, threads and
  fast CPU layers, one request at a time — what a bot holding a lock around one ``generate``
  per request does;
- **vLLM**: its OpenAI-compatible server (CPU build, ``VLLM_PYTHON`` or ``.venv-vllm``) serving
  the same converted weights in bf16, driven through chinwag's remote backend — the engine a
  user would pick instead. Rounds interleave (chinwag, vLLM, chinwag, vLLM…) so a neighbour
  that comes and goes hits both alike, each turn starting after ``--settle`` quiet seconds.

Then the same rounds again beside a busy core (``--busy-rounds``; ``bench/neighbours.py``): the
machine users share. vLLM's CPU build pins its one compute thread to a core of its own and
leaves the other to its scheduler, so a neighbour barely moves it; chinwag's thread tuner
must find the thread count that the neighbour leaves it.

Tokens/s counts generated tokens over wall time; TTFT is from request to first streamed piece.
Cold start (fresh interpreter to first reply, converted-weights cache present) is measured too.

Last line: a JSON object with ``speedup_1`` and ``speedup_16`` (chinwag ÷ sequential),
``vs_vllm_single`` and ``vs_vllm_16`` (chinwag ÷ vLLM), the same with ``_busy`` beside a busy
core, ``cold_start_cached_s``, the load average, and the raw tokens/s behind every ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.neighbours import busy_core
from bot.config import load_settings
from bot.logs import quiet_libraries
from bot.models import ModelRuntime
from bot.models.vllm_server import VLLMServer

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars

ROOT = Path(__file__).resolve().parents[1]
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


async def concurrent(
    runtime: ModelRuntime, conversations: int, turns: int, max_new: int
) -> dict[str, float]:
    """``conversations`` chats at once, each asking ``turns`` questions one after another."""
    ttfts: list[float] = []
    tokens = 0

    async def conversation(c: int) -> None:
        nonlocal tokens
        for t in range(turns):
            q = QUESTIONS[(c + t * conversations) % len(QUESTIONS)]
            start = time.perf_counter()
            first: list[float] = []

            async def seen(_piece: str, start: float = start, first: list[float] = first) -> None:
                if not first:
                    first.append(time.perf_counter() - start)

            gen = await runtime.generate(chat(q), max_new_tokens=max_new, on_text=seen)
            ttfts.append(first[0] if first else time.perf_counter() - start)
            tokens += gen.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(conversations)))
    elapsed = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p95_s": float(np.percentile(ttfts, 95)),
    }


def plain_model(runtime: ModelRuntime, data: Path) -> tuple[object, object]:
    """transformers' own model and tokenizer on the same weights, dtype and fast CPU layers."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from bot.models.cpu_linear import convert

    backend = runtime._backend
    (folder,) = [p for p in (data / "models").iterdir() if (p / "config.json").exists()]
    dtype = next(backend.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(backend.device)
    if backend.device == "cpu":
        convert(
            model,
            int8=runtime.config.int8_decode,
            max_rows=runtime.config.int8_max_rows,
            fp16=runtime.config.fp16_weights,
        )
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


def sequential(
    runtime: ModelRuntime, plain: tuple[object, object], prompts: list[str], max_new: int
) -> float:
    """Plain ``model.generate``, one request at a time: what a hand-rolled bot would run."""
    backend = runtime._backend
    model, tok = plain
    if backend.threads is not None:
        torch.set_num_threads(backend.threads.current)  # the same threads chinwag settled on
    tokens = 0
    t0 = time.perf_counter()
    for q in prompts:
        enc = tok.apply_chat_template(
            chat(q), add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(backend.device)
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
from bot.models.vllm_server import VLLMServer
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
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(out.stdout.strip().splitlines()[-1]) - started


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


async def settle(at_least: float, *, quiet: float = 0.25, at_most: float = 15.0) -> float:
    """Wait ``at_least`` seconds, then until the CPUs are under ``quiet`` busy (at most
    ``at_most`` seconds in all): an engine's busy tail must not land on the next one's turn.
    Returns the seconds waited."""
    t0 = time.monotonic()
    await asyncio.sleep(at_least)
    if not os.path.exists("/proc/stat"):  # noqa: ASYNC240 - one stat, not a blocking read
        return time.monotonic() - t0
    while time.monotonic() - t0 < at_most:
        b0, t0_ = _cpu_busy()
        await asyncio.sleep(0.5)
        b1, t1 = _cpu_busy()
        if (b1 - b0) / max(t1 - t0_, 1.0) < quiet:
            break
    return time.monotonic() - t0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def interleaved(
    engines: dict[str, ModelRuntime],
    args: argparse.Namespace,
    figures: dict[tuple[str, int, str], list[dict[str, float]]],
    phase: str,
) -> None:
    """Rounds of 1 and 16 conversations, the engines taking turns (the order flips each
    round), each turn after the CPUs went quiet; ``phase`` "busy" runs beside a busy core."""
    rounds = args.rounds if phase == "alone" else args.busy_rounds
    quiet = 0.25 + (1 / (os.cpu_count() or 1) if phase == "busy" else 0.0)
    label = "" if phase == "alone" else " (beside a busy core)"
    for r in range(rounds):
        for n in (1, 16):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                # vLLM's engine process stays busy for a moment after its last reply;
                # without a pause that tail lands on whichever engine runs next.
                waited = await settle(args.settle, quiet=quiet)
                if waited > args.settle + 1:
                    print(f"  (waited {waited:.1f} s for the CPUs to go quiet)")
                f = await concurrent(engines[name], n, args.turns, args.max_new_tokens)
                figures.setdefault((name, n, phase), []).append(f)
                print(
                    f"round {r + 1} {name:>8} x{n:<2}: {f['tokens_per_s']:7.1f} tok/s, "
                    f"TTFT p50 {f['ttft_p50_s']:.3f} s p95 {f['ttft_p95_s']:.3f} s{label}"
                )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine")
    parser.add_argument(
        "--busy-rounds",
        type=int,
        default=2,
        help="interleaved rounds per engine beside a busy core, after the alone ones (0: none)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds of quiet before each engine's turn"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    logging.getLogger("bot.models.tuning").setLevel(logging.INFO)  # thread-count changes
    vllm_python = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    use_vllm = not args.no_vllm and os.path.exists(vllm_python)  # noqa: ASYNC240
    result: dict[str, object] = {"load_average_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        uncached = cold_start(data, args.device)  # converts and caches
        cached = cold_start(data, args.device)
        print(f"cold start: {uncached:.1f} s uncached, {cached:.1f} s with the cache")
        result.update(
            cold_start_uncached_s=round(uncached, 2), cold_start_cached_s=round(cached, 2)
        )
        runtime = ModelRuntime(
            load_settings(overrides={"data_dir": data, "models": {"device": args.device}})
        )
        await runtime.start()
        backend = runtime._backend
        # The faster layers and the native kernels are prepared beside serving: measured
        # before they are in, the first round would time the start, not the engine.
        settled = await runtime.settled(300)
        in_use = runtime.load()
        native = bool(in_use.get("native_kernels"))
        linear_rows = int(in_use.get("native_linear_rows", 0))
        result.update(native_kernels=native, native_linear_rows=linear_rows)
        print(
            f"chinwag: device {backend.device}, dtype {next(backend.model.parameters()).dtype}, "
            f"thread candidates {backend.threads.candidates if backend.threads else '-'}, "
            f"native kernels {'in use' if native else 'not in use'}"
            f" (linear layers up to {linear_rows} rows)"
            + ("" if settled else " (the faster layers were not ready after 300 s)")
        )
        await runtime.generate(chat("warm up"), max_new_tokens=8)
        engines: dict[str, ModelRuntime] = {"chinwag": runtime}
        server = None
        if use_vllm:
            (model_dir,) = [p for p in (data / "models").iterdir() if (p / "config.json").exists()]
            # Started the way chinwag's own ``backend = "vllm"`` starts it, without LoRA (so
            # its compiled graph is on, as a user serving the base model would run it).
            server = VLLMServer(
                model_dir,
                python=vllm_python,
                served_name="smollm2",
                dtype="bfloat16",
                max_model_len=2048,
                lora=None,
                env={"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
                log_file=data / "vllm.log",
            )
            server.start_blocking(300)
            remote = ModelRuntime(
                load_settings(
                    overrides={
                        "data_dir": data / "remote",
                        "models": {"backend": "remote", "remote_url": server.url},
                    }
                )
            )
            await remote.generate(chat("warm up"), max_new_tokens=8)
            engines["vllm"] = remote
            print(f"vLLM: {server.url}")
        else:
            print("vLLM: not installed (make vllm) or --no-vllm: no vLLM figures")
        figures: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        try:
            await interleaved(engines, args, figures, "alone")
            if args.busy_rounds:
                # The neighbour holds one core whole; "quiet" then means nothing busy beyond it.
                with busy_core():
                    await interleaved(engines, args, figures, "busy")
            seq = {}
            plain = plain_model(runtime, data)
            for n in (1, 16):
                prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(min(n * args.turns, 6))]
                seq[n] = await asyncio.to_thread(
                    sequential, runtime, plain, prompts, args.max_new_tokens
                )
                print(f"sequential plain generate ({len(prompts)} prompts): {seq[n]:.1f} tok/s")
        finally:
            for rt in engines.values():
                await rt.stop()
            if server is not None:
                server.stop_blocking()

    def best(name: str, n: int, phase: str, key: str = "tokens_per_s") -> float:
        return float(np.median([f[key] for f in figures[(name, n, phase)]]))

    for n in (1, 16):
        ours = best("chinwag", n, "alone")
        result[f"chinwag_tokens_per_s_{n}"] = round(ours, 1)
        result[f"sequential_tokens_per_s_{n}"] = round(seq[n], 1)
        result[f"speedup_{n}"] = round(ours / seq[n], 2)
        result[f"ttft_p95_s_{n}"] = round(best("chinwag", n, "alone", "ttft_p95_s"), 3)
        ratio = "vs_vllm_single" if n == 1 else f"vs_vllm_{n}"
        if use_vllm:
            theirs = best("vllm", n, "alone")
            result[f"vllm_tokens_per_s_{n}"] = round(theirs, 1)
            result[f"vllm_ttft_p95_s_{n}"] = round(best("vllm", n, "alone", "ttft_p95_s"), 3)
            result[ratio] = round(ours / theirs, 2)
        if args.busy_rounds:
            ours = best("chinwag", n, "busy")
            result[f"chinwag_tokens_per_s_{n}_busy"] = round(ours, 1)
            result[f"ttft_p95_s_{n}_busy"] = round(best("chinwag", n, "busy", "ttft_p95_s"), 3)
            if use_vllm:
                theirs = best("vllm", n, "busy")
                result[f"vllm_tokens_per_s_{n}_busy"] = round(theirs, 1)
                result[f"{ratio}_busy"] = round(ours / theirs, 2)
    result["load_average_end"] = load_average()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
