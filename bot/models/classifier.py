"""Named text classifiers (e.g. ``sentiment``): an encoder with a LoRA adapter and a head.

Every classifier is a version in the adapter registry (``kind: classifier``) and is served by
the runtime's ``classify``. Requests from all chats are gathered for a couple of milliseconds
and run as one batch on one worker thread, so a busy bot pays one forward pass per batch
rather than one per message. A promoted version is picked up on the next request (checked at
most once a second): requests already running finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bot.models.registry import AdapterRegistry, AdapterVersion
from bot.models.types import ModelError

log = logging.getLogger(__name__)


class NoClassifier(ModelError):
    """No version of this classifier is in service (train one first)."""


@dataclass(slots=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]
    model: str
    adapter: str
    adapter_version: str


def load_encoder_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    from bot.models.embedding import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(base_model))


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LoadedClassifier:
    """One adapter version, merged into its encoder for inference speed."""

    def __init__(self, entry: AdapterVersion, device: str = "auto") -> None:
        from peft import PeftModel

        from bot.models.embedding import resolve_model
        from bot.models.encoder_head import EncoderClassifier
        from bot.models.loading import LOAD_LOCK

        meta = entry.meta
        self.entry = entry
        self.labels: list[str] = list(meta["labels"])
        self.base_model = str(meta.get("base_model", "all-MiniLM-L6-v2"))
        self.max_length = int(meta.get("max_length", 128))
        self.device = _device(device)
        with LOAD_LOCK:
            base = EncoderClassifier(resolve_model(self.base_model), len(self.labels))
            model = PeftModel.from_pretrained(base, str(entry.path))
            self.model = model.merge_and_unload().to(self.device).eval()
            self.tokenizer = load_encoder_tokenizer(self.base_model)

    def predict(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(enc["input_ids"], enc["attention_mask"])["logits"]
            return torch.softmax(logits.float(), -1).cpu().numpy()


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[list[Classification]]


@dataclass(slots=True)
class _Served:
    name: str
    queue: asyncio.Queue[_Request] = field(default_factory=asyncio.Queue)
    loaded: LoadedClassifier | None = None
    stamp: float = -1
    checked: float = 0.0
    task: asyncio.Task[None] | None = None


class ClassifierPool:
    def __init__(
        self,
        registry: AdapterRegistry,
        *,
        device: str = "cpu",
        max_batch: int = 64,
        wait_ms: float = 2.0,
    ) -> None:
        self.registry = registry
        self.device = device
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000
        self._served: dict[str, _Served] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="chinwag-classify")
        self._load_lock = threading.Lock()
        #: Requests and forward passes so far: items / batches is the batching factor.
        self.stats = {"items": 0, "batches": 0}

    def available(self, name: str) -> bool:
        return self.registry.current(name) is not None

    def version(self, name: str) -> str | None:
        served = self._served.get(name)
        return served.loaded.entry.version if served and served.loaded else None

    async def classify(self, name: str, texts: list[str]) -> list[Classification]:
        if not texts:
            return []
        served = self._served.get(name)
        if served is None:
            served = self._served[name] = _Served(name)
        if served.task is None or served.task.done():
            served.task = asyncio.create_task(self._serve(served), name=f"classify:{name}")
        future: asyncio.Future[list[Classification]] = asyncio.get_running_loop().create_future()
        await served.queue.put(_Request(list(texts), future))
        return await future

    async def warm(self, name: str) -> bool:
        """Load the version in service now, so the first message does not pay for it
        (loading takes seconds; observers have a 2-second budget). ``False``: none exists."""
        served = self._served.get(name)
        if served is None:
            served = self._served[name] = _Served(name)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._current, served)
        except NoClassifier:
            return False
        return True

    def _current(self, served: _Served) -> LoadedClassifier:
        """Load or hot-swap to the version in service (runs on the worker thread)."""
        now = time.monotonic()
        if served.loaded is not None and now - served.checked < 1.0:
            return served.loaded
        served.checked = now
        stamp = self.registry.stamp(served.name)
        if served.loaded is None or stamp != served.stamp:
            entry = self.registry.current(served.name)
            if entry is None:
                raise NoClassifier(f"no {served.name!r} classifier is in service yet")
            if served.loaded is None or served.loaded.entry.version != entry.version:
                with self._load_lock:
                    t0 = time.perf_counter()
                    served.loaded = LoadedClassifier(entry, self.device)
                    log.info(
                        "classifier %s %s loaded in %.1fs",
                        served.name,
                        entry.version,
                        time.perf_counter() - t0,
                    )
            served.stamp = stamp
        return served.loaded

    def _run(self, served: _Served, texts: list[str]) -> tuple[LoadedClassifier, np.ndarray]:
        clf = self._current(served)
        return clf, clf.predict(texts)

    async def _serve(self, served: _Served) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await served.queue.get()
            batch = [first]
            size = len(first.texts)
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    req = await asyncio.wait_for(served.queue.get(), timeout)
                except TimeoutError:
                    break
                batch.append(req)
                size += len(req.texts)
            texts = [t for r in batch for t in r.texts]
            self.stats["items"] += len(texts)
            self.stats["batches"] += 1
            try:
                clf, probs = await loop.run_in_executor(self._executor, self._run, served, texts)
            except Exception as exc:
                error = exc if isinstance(exc, ModelError) else ModelError(str(exc))
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(error)
                continue
            at = 0
            for r in batch:
                rows = probs[at : at + len(r.texts)]
                at += len(r.texts)
                if not r.future.done():
                    r.future.set_result([self._result(clf, row) for row in rows])

    @staticmethod
    def _result(clf: LoadedClassifier, row: np.ndarray) -> Classification:
        best = int(row.argmax())
        return Classification(
            label=clf.labels[best],
            score=float(row[best]),
            scores={label: round(float(p), 4) for label, p in zip(clf.labels, row, strict=True)},
            model=clf.base_model,
            adapter=clf.entry.name,
            adapter_version=clf.entry.version,
        )

    async def close(self) -> None:
        for served in self._served.values():
            if served.task is not None:
                served.task.cancel()
        self._served.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def describe(result: Classification) -> dict[str, Any]:
    """The annotation stored with a message."""
    return {
        "label": result.label,
        "score": round(result.score, 4),
        "scores": result.scores,
        "adapter_version": result.adapter_version,
    }
