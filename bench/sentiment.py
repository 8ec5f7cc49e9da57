"""Sentiment: held-out quality of the adapter in service and labelling latency per message.

Trains the default adapter first when the registry has none (``--train``, minutes), then
measures classify latency one message at a time and for N chats at once (the observer's
batching). Last line: JSON.

    .venv/bin/python bench/sentiment.py --registry DIR [--train] [--chats 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path


async def main() -> None:
    from bot.config import load_settings
    from bot.models import ModelRuntime
    from bot.models.registry import AdapterRegistry
    from trainers.sentiment import (
        SentimentTrainConfig,
        load_rotten_tomatoes,
        split_by_group,
        train_sentiment,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--epochs", type=float, default=SentimentTrainConfig().epochs)
    parser.add_argument("--chats", type=int, default=64)
    args = parser.parse_args()
    registry = AdapterRegistry(args.registry)
    if registry.current("sentiment") is None or args.train:

        def show(stage: str, done: int, total: int) -> None:
            if stage != "train" or done % 50 == 0 or done == total:
                print(f"  {stage} {done}/{total}", flush=True)

        train_sentiment(registry, SentimentTrainConfig(epochs=args.epochs), progress=show)
    entry = registry.current("sentiment")
    metrics = entry.meta["metrics"]
    _, held_out = split_by_group(load_rotten_tomatoes(), 0.1)
    texts = [e.text for e in held_out]
    settings = load_settings(
        overrides={
            "data_dir": args.registry.parent / "bench-data",
            "models": {"registry_dir": args.registry, "device": "cpu"},
        }
    )
    runtime = ModelRuntime(settings)
    await runtime.classify(texts[:4])  # load
    single = []
    for t in texts[:100]:
        t0 = time.perf_counter()
        await runtime.classify([t])
        single.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    batch = texts[: args.chats]
    await asyncio.gather(*(runtime.classify([t]) for t in batch))
    burst_ms = (time.perf_counter() - t0) * 1000
    await runtime.stop()
    result = {
        "adapter_version": entry.version,
        "held_out_accuracy": round(metrics["accuracy"], 4),
        "held_out_macro_f1": round(metrics["macro_f1"], 4),
        "held_out_roc_auc": round(metrics["roc_auc"], 4),
        "held_out_n": metrics["n"],
        "train_runtime_s": entry.meta.get("train_runtime_s"),
        "single_p50_ms": round(statistics.median(single), 2),
        "single_p95_ms": round(sorted(single)[94], 2),
        "chats_at_once": args.chats,
        "burst_ms_per_message": round(burst_ms / len(batch), 2),
    }
    print(
        f"held-out accuracy {result['held_out_accuracy']:.3f}  macro-F1 "
        f"{result['held_out_macro_f1']:.3f}  ROC-AUC {result['held_out_roc_auc']:.3f} "
        f"(n={metrics['n']}, target accuracy ≥ 0.85)"
    )
    print(
        f"one message at a time: p50 {result['single_p50_ms']} ms, p95 {result['single_p95_ms']} ms"
    )
    print(f"{args.chats} chats at once: {result['burst_ms_per_message']} ms per message")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
