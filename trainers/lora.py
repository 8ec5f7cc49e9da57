"""LoRA fine-tuning of the base model on logged conversations, and the held-out loss the gate
compares.

transformers' ``Trainer`` with a peft LoRA adapter: loss on the rated reply's tokens only (the
context is input, not something to imitate — earlier bot turns were never rated), seeded,
bf16 mixed precision where the hardware runs it natively (see ``mixed_bf16``), checkpoints every
``save_steps`` so an interrupted run resumes where it stopped. The result is saved in peft's own
format, which vLLM's ``--lora-modules`` loads as is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers import threads
from trainers.dataset import Example

Progress = Callable[[str, int, int], None]


log = logging.getLogger(__name__)


class LoraConfig(BaseModel):
    """``[trainers.lora]``: the adapter's shape and how it is trained."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=256)
    alpha: int = Field(32, ge=1)
    #: Off by default: on CPU drawing the dropout mask over every adapted layer's input
    #: (``bernoulli_``) was a quarter of a training step — 150 → 245–297 tokens/s without it
    #: (100-token examples, bf16, 2 cores). The gate's held-out loss guards against
    #: overfitting; raise it (0.05 is peft's usual value) if adapters start to.
    dropout: float = Field(0.0, ge=0, lt=1)
    #: ``all-linear`` (peft's shorthand) or a list of module names.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    #: Stop after this many optimiser steps (overrides ``epochs``); for smoke runs and tests.
    max_steps: int | None = Field(None, ge=1)
    max_length: int = Field(512, ge=32)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(2, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    save_steps: int = Field(50, ge=1)
    seed: int = 13
    #: ``auto``: bf16 mixed precision where the hardware runs bf16 natively — CUDA with bf16,
    #: CPUs with AMX/AVX512-BF16 where a bf16 matmul measures faster (1.4–1.6× the fp32
    #: training step on the project's 2-core machine) — else fp32. The frozen base weights are
    #: then stored in bf16; the LoRA parameters and their optimiser state stay fp32, and the
    #: matmuls run in bf16 (autocast).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: Below this many training examples the cycle skips the adapter (too little to learn).
    min_examples: int = Field(20, ge=1)


def encode(
    messages: Sequence[dict[str, str]], tokenizer: Any, max_length: int
) -> dict[str, list[int]]:
    """Token ids of the whole conversation and labels that are -100 except the final reply.

    Truncation drops the oldest context first: the reply being learned is never cut.
    """
    prompt = tokenizer.apply_chat_template(
        list(messages[:-1]), add_generation_prompt=True, tokenize=False
    )
    reply = messages[-1]["content"].strip() + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"][:max_length]
    keep = max(0, max_length - len(reply_ids))
    prompt_ids = prompt_ids[-keep:] if keep else []
    return {
        "input_ids": prompt_ids + reply_ids,
        "labels": [-100] * len(prompt_ids) + reply_ids,
    }


def _collate(tokenizer: Any) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids, labels, mask = [], [], []
        for b in batch:
            n = len(b["input_ids"])
            ids.append(b["input_ids"] + [pad] * (width - n))
            labels.append(b["labels"] + [-100] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    return collate


def _reply_token_loss(model: Any, batch: dict[str, Any], reduction: str = "sum") -> Any:
    """Cross-entropy on the labelled (reply) tokens, projecting only those onto the vocabulary.

    The vocabulary projection is a fifth of a small model's compute per token, and most tokens
    are context whose logits nobody needs: projecting only reply positions made a 256-token
    training step 1.6× faster on CPU. Falls back to the model's own loss for architectures
    without the usual ``.model`` / ``.lm_head`` split.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"]
    decoder, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if decoder is None or head is None:
        if reduction == "none":
            logits = model(**batch).logits[:, :-1]
            keep = labels[:, 1:] != -100
            return torch.nn.functional.cross_entropy(
                logits[keep].float(), labels[:, 1:][keep], reduction="none"
            )
        out = model(**batch)
        return out.loss * (int((labels[:, 1:] != -100).sum()) if reduction == "sum" else 1)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(
        logits.float(), labels[:, 1:][keep], reduction=reduction
    )


def reply_loss(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int, batch_size: int = 8
) -> dict[str, Any]:
    """Token-weighted mean loss (and perplexity) on the examples' replies, and each example's
    own mean loss (``per_example``, for the gate's paired comparison)."""
    import torch

    encoded = [encode(e.messages, tokenizer, max_length) for e in examples]
    collate = _collate(tokenizer)
    total, tokens = 0.0, 0
    per_example: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            threads.adjust(model.device)
            batch = collate(encoded[start : start + batch_size])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            rows = _reply_token_loss(model, batch, "none")
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
            # The flat per-token losses, row by row (the labelled positions are row-major).
            for chunk, n in zip(torch.split(rows, counts.tolist()), counts.tolist(), strict=True):
                per_example.append(float(chunk.mean()) if n else float("nan"))
            total += float(rows.sum())
            tokens += int(counts.sum())
    mean = total / tokens if tokens else float("nan")
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50)),
        "tokens": tokens,
        "per_example": per_example,
    }


def mixed_bf16(precision: str, cuda: bool) -> bool:
    """Whether to train with bf16 autocast (see ``LoraConfig.precision``)."""
    import torch

    if precision == "fp32":
        return False
    if cuda:
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            log.warning("trainers.lora.precision = bf16, but this GPU has no bf16: fp32")
        return supported
    if precision == "bf16":
        return True
    from bot.models.tuning import choose_cpu_dtype

    return choose_cpu_dtype() is torch.bfloat16


def load_for_training(
    base_model: str, cache_dir: Path, device: str = "auto", precision: str = "auto"
) -> tuple[Any, Any]:
    """A private copy of the base model (the serving one is never touched).

    The frozen base weights are stored in bf16 whenever training runs mixed precision (see
    ``mixed_bf16``), on CPU as on CUDA: under autocast every matmul would otherwise cast its fp32
    weight to bf16 on each forward and backward pass — a tenth to a quarter of a training step
    on the 2-core machine (342 → 376–427 tokens/s, 4 × 100 tokens). Only the LoRA parameters
    are trained, and peft keeps those (and so the optimiser's updates) in fp32.
    """
    from bot.models.loading import load_base, pick_device

    dev = pick_device(device)
    dtype = "bfloat16" if mixed_bf16(precision, dev.startswith("cuda")) else "float32"
    # transformers' model: peft trains it (chinwag's serving decoder has no backward pass).
    model, tokenizer, _name, _cached = load_base(
        base_model, device=dev, dtype=dtype, cache_dir=cache_dir, implementation="transformers"
    )
    tokenizer.padding_side = "right"
    return model, tokenizer


def train_lora(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    config: LoraConfig,
    checkpoint_dir: Path,
    *,
    progress: Progress | None = None,
) -> tuple[Any, list[dict[str, float]], dict[str, Any]]:
    """Fit a LoRA adapter on ``train``; returns the peft model, the loss curve and throughput.

    Checkpoints go to ``checkpoint_dir``; when it holds one from an interrupted run of the same
    cycle, training resumes from it.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    set_seed(config.seed)
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    encoded = [encode(e.messages, tokenizer, config.max_length) for e in train]

    class _Data(Dataset):
        def __len__(self) -> int:
            return len(encoded)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return encoded[i]

    curve: list[dict[str, float]] = []

    class _Watch(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curve.append({"step": state.global_step, "loss": float(logs["loss"])})

        def on_step_begin(self, args, state, control, **kwargs):
            threads.adjust(model.device)  # see trainers/threads.py

        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress("train", state.global_step, state.max_steps)

    cuda = torch.cuda.is_available() and str(model.device).startswith("cuda")
    seen = {"tokens": 0}
    bf16 = mixed_bf16(config.precision, cuda)
    per_step = config.batch_size * config.gradient_accumulation
    total = config.max_steps or math.ceil(math.ceil(len(encoded) / per_step) * config.epochs)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        warmup_steps=int(total * config.warmup_ratio),
        logging_steps=1,
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        bf16=bf16,
        # The model is where load_for_training put it: never moved to a GPU behind our back.
        use_cpu=not cuda,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        # Batches of similar length: less padding computed for nothing.
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
    )

    class _ReplyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen["tokens"] += int(inputs["attention_mask"].sum())
            # Explicit autocast: the reply-only loss calls the decoder and the head directly,
            # past the wrapped forward through which the Trainer would apply it.
            with (
                torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=bf16),
                _attention_kernel(cuda, inputs["input_ids"].shape[-1]),
            ):
                if num_items_in_batch:  # token-weighted across gradient-accumulation steps
                    loss = _reply_token_loss(model, inputs, "sum") / num_items_in_batch
                else:
                    loss = _reply_token_loss(model, inputs, "mean")
            return (loss, None) if return_outputs else loss

    trainer = _ReplyTrainer(
        model=peft_model,
        args=args,
        train_dataset=_Data(),
        data_collator=_collate(tokenizer),
        callbacks=[_Watch()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the curve and progress callbacks report instead
    resume = last_complete_checkpoint(checkpoint_dir)
    if resume is not None and progress:
        progress("resume", 1, 1)
    started = time.perf_counter()
    # Under autocast every matmul already runs in bf16: peft's own cast of each adapted layer's
    # input to the adapter's fp32 (and autocast's cast back) was a tenth of a training step on
    # CPU (398 → 453 tokens/s). Only while training: scoring runs without autocast and needs it.
    with disable_input_dtype_casting(peft_model, active=bf16):
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    peft_model.eval()
    # Tokens this run put through the model (padding excluded), counted batch by batch: an
    # estimate from the mean length misjudges short runs, which start with the longest batch.
    stats = {
        "train_steps": out.global_step,
        "train_tokens": seen["tokens"],
        "train_tokens_per_s": round(seen["tokens"] / seconds, 1) if seconds else 0.0,
        "peak_memory_mb": round(_peak_memory_mb(cuda), 1),
        "precision": "bf16" if bf16 else "fp32",
    }
    return peft_model, curve, stats


#: Below this many positions a CPU training batch runs attention with SDPA's matmul ("math")
#: kernel, above it with the flash kernel: on the 2-core machine (bf16, 4 rows) math was 1.14×
#: the flash kernel's tokens/s at 100 positions and 1.10× at 160, even at 200, and 0.91× at 250
#: and 0.62× at 450 — chat examples are mostly short (a 60-conversation log: mean 100, max 406).
MATH_ATTENTION_MAX_POSITIONS = 192


def _attention_kernel(cuda: bool, positions: int) -> Any:
    """The SDPA kernel for one training batch (see ``MATH_ATTENTION_MAX_POSITIONS``)."""
    import contextlib

    if cuda or positions > MATH_ATTENTION_MAX_POSITIONS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _peak_memory_mb(cuda: bool) -> float:
    """Peak GPU memory allocated on CUDA; otherwise the process's peak resident memory."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint a killed run finished writing; half-written ones are removed.

    ``Trainer`` writes the weights first and ``trainer_state.json`` last, and writes that file
    in place, so a kill in between (or during it) leaves a folder its own resume logic would
    pick and then fail on with a ``JSONDecodeError``: only a state file that parses counts.
    """
    import shutil

    found = sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if _state_is_whole(p / "trainer_state.json")]
    for p in found:
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def _state_is_whole(path: Path) -> bool:
    """Whether a checkpoint's ``trainer_state.json`` was written to the end."""
    import json

    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False
