"""The local backend: one worker thread per device owns the model and batches requests.

Requests from any number of conversations go into one queue. The worker takes the first,
waits up to ``max_queue_wait_ms`` for more (up to ``max_batch_size``), and generates them
together: left-padded, KV-cached, one ``generate`` call per set of sampling parameters — and
across adapters, since peft applies a different LoRA adapter to each row of one batch
(``adapter_names``). The event loop never waits on the model: results come back through
futures resolved from the worker thread.

Adapters are versioned. A request holds the adapter version current when it was submitted;
loading a new version makes it current for new requests while in-flight ones finish on the old
one, which is unloaded when its last request completes — hot-swap without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.models.types import (
    ChatMessages,
    Generation,
    GenerationParams,
    ModelError,
    RuntimeBusy,
    UnknownAdapter,
)

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(slots=True)
class _Job:
    messages: ChatMessages
    params: GenerationParams
    adapter: str | None
    internal: str | None
    version: str | None
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue[str | None] | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class _Control:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()


def _resolve(
    fut: asyncio.Future[Any],
    loop: asyncio.AbstractEventLoop,
    value: Any = None,
    exc: BaseException | None = None,
) -> None:
    def apply() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    loop.call_soon_threadsafe(apply)


class LocalBackend:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_name: str,
        *,
        max_batch_size: int = 16,
        max_queue_wait_ms: float = 5.0,
        max_queue: int = 256,
        context_window: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_wait = max_queue_wait_ms / 1000
        self.max_queue = max_queue
        self.context_window = context_window or int(
            getattr(model.config, "max_position_embeddings", 2048) or 2048
        )
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # adapter bookkeeping nests (load → delete old)
        self._adapters: dict[str, tuple[str, str]] = {}
        self._refs: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._pending = 0
        self._peft = False
        self.stats: Counter[str] = Counter()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="chinwag-model-worker", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    # -- requests ------------------------------------------------------------------------------

    async def generate(
        self,
        messages: ChatMessages,
        params: GenerationParams,
        adapter: str | None = None,
        stream: asyncio.Queue[str | None] | None = None,
    ) -> Generation:
        if self._thread is None:
            raise ModelError("the model worker is not running")
        with self._lock:
            if self._pending >= self.max_queue:
                raise RuntimeBusy(
                    f"the model is busy ({self._pending} requests waiting); try again shortly"
                )
            internal = version = None
            if adapter is not None:
                current = self._adapters.get(adapter)
                if current is None:
                    known = ", ".join(sorted(self._adapters)) or "none"
                    raise UnknownAdapter(
                        f"no adapter named {adapter!r} is loaded (loaded: {known})"
                    )
                internal, version = current
                self._refs[internal] += 1
            self._pending += 1
        loop = asyncio.get_running_loop()
        job = _Job(messages, params, adapter, internal, version, loop.create_future(), loop, stream)
        self._queue.put(job)
        try:
            return await job.future
        finally:
            self._release(job)

    def _release(self, job: _Job) -> None:
        with self._lock:
            self._pending -= 1
            if job.internal is None:
                return
            self._refs[job.internal] -= 1
            orphan = job.internal in self._retired and self._refs[job.internal] <= 0
        if orphan:
            self._queue.put(
                _Control(
                    lambda: self._delete_adapter(job.internal), job.loop.create_future(), job.loop
                )
            )

    async def control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between batches (model changes go through here)."""
        loop = asyncio.get_running_loop()
        ctl = _Control(fn, loop.create_future(), loop)
        self._queue.put(ctl)
        return await ctl.future

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path, version: str) -> None:
        internal = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}__v{version}")

        def load() -> None:
            from peft import PeftModel

            if not Path(path, "adapter_config.json").exists():
                raise ModelError(f"{path} is not a peft adapter folder (no adapter_config.json)")
            if isinstance(self.model, PeftModel):
                if internal in self.model.peft_config:
                    self.model.delete_adapter(internal)
                self.model.load_adapter(str(path), adapter_name=internal)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=internal)
            self._peft = True
            self.model.eval()
            with self._lock:
                old = self._adapters.get(name)
                self._adapters[name] = (internal, version)
                self._retired.discard(internal)
                if old is not None and old[0] != internal:
                    self._retired.add(old[0])
                    if self._refs[old[0]] <= 0:
                        self._delete_adapter(old[0])

        await self.control(load)

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            with self._lock:
                current = self._adapters.pop(name, None)
                if current is None:
                    raise UnknownAdapter(f"no adapter named {name!r} is loaded")
                self._retired.add(current[0])
                idle = self._refs[current[0]] <= 0
            if idle:
                self._delete_adapter(current[0])

        await self.control(unload)

    def _delete_adapter(self, internal: str) -> None:
        with self._lock:
            if internal not in self._retired or self._refs[internal] > 0:
                return
            self._retired.discard(internal)
        try:
            self.model.delete_adapter(internal)
        except Exception:
            log.warning("could not unload adapter %s", internal, exc_info=True)

    def adapters(self) -> dict[str, str]:
        with self._lock:
            return {name: version for name, (_, version) in self._adapters.items()}

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        deferred: list[Any] = []
        while True:
            item = deferred.pop(0) if deferred else self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, _Control):
                self._run_control(item)
                continue
            batch = [item]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is _STOP or isinstance(nxt, _Control):
                    deferred.append(nxt)
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_control(self, ctl: _Control) -> None:
        try:
            _resolve(ctl.future, ctl.loop, ctl.fn())
        except BaseException as exc:
            _resolve(
                ctl.future,
                ctl.loop,
                exc=exc if isinstance(exc, Exception) else ModelError(str(exc)),
            )

    def _run_batch(self, batch: list[_Job]) -> None:
        groups: dict[tuple[bool, float, float], list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.params.sampling_key, []).append(job)
        for jobs in groups.values():
            try:
                self._generate(jobs)
            except Exception as exc:  # OOM, bad input: fail these requests, keep serving
                log.exception("generation failed for a batch of %d", len(jobs))
                err = ModelError(f"generation failed: {type(exc).__name__}: {exc}")
                for job in jobs:
                    self._finish_stream(job)
                    _resolve(job.future, job.loop, exc=err)

    def _prompt(self, messages: ChatMessages, max_new: int) -> tuple[list[int], int]:
        """Token ids for the chat, oldest turns dropped until it fits the context window."""
        budget = self.context_window - max_new
        msgs = list(messages)
        trimmed = 0
        while True:
            ids = self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if len(ids) <= budget:
                return list(ids), trimmed
            first = 1 if msgs and msgs[0].get("role") == "system" else 0
            if len(msgs) - first <= 1:
                raise ModelError(
                    f"the message is longer than the model's context window "
                    f"({len(ids)} tokens, {budget} available)"
                )
            del msgs[first]
            trimmed += 1

    def _generate(self, jobs: list[_Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        started = time.perf_counter()
        tok = self.tokenizer
        prompts: list[list[int]] = []
        trims: list[int] = []
        ready: list[_Job] = []
        for job in jobs:
            if job.future.done():  # the caller gave up while the job waited in the queue
                self._finish_stream(job)
                continue
            try:
                ids, trimmed = self._prompt(job.messages, job.params.max_new_tokens)
            except ModelError as exc:
                self._finish_stream(job)
                _resolve(job.future, job.loop, exc=exc)
                continue
            prompts.append(ids)
            trims.append(trimmed)
            ready.append(job)
        jobs = ready
        if not jobs:
            return
        device = self.device
        enc = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
        prompt_len = enc["input_ids"].shape[1]
        limits = [j.params.max_new_tokens for j in jobs]
        stops = [j.params.stop for j in jobs]

        class RowStop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                n = input_ids.shape[1] - prompt_len
                # A row whose caller gave up (timeout, disconnect) stops costing compute.
                done = torch.tensor(
                    [n >= m or j.future.cancelled() for m, j in zip(limits, jobs, strict=True)],
                    device=input_ids.device,
                )
                for i, row_stops in enumerate(stops):
                    if row_stops and not done[i]:
                        tail = tok.decode(input_ids[i, prompt_len:][-16:], skip_special_tokens=True)
                        if any(s in tail for s in row_stops):
                            done[i] = True
                return done

        greedy, temperature, top_p = jobs[0].params.sampling_key
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(limits),
            "do_sample": not greedy,
            "pad_token_id": tok.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([RowStop()]),
        }
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=temperature, top_p=top_p)
        if self._peft:  # importing peft costs seconds: only once an adapter was loaded
            kwargs["adapter_names"] = [j.internal or BASE for j in jobs]
        if any(j.stream is not None for j in jobs):
            kwargs["streamer"] = _BatchStreamer(tok, jobs)
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        elapsed = time.perf_counter() - started
        eos = set(_as_list(self.model.generation_config.eos_token_id)) | {tok.eos_token_id}
        for i, job in enumerate(jobs):
            new = out[i, prompt_len:].tolist()[: limits[i]]
            finish = "length"
            for cut, token in enumerate(new):
                if token in eos:
                    new, finish = new[:cut], "stop"
                    break
            text = tok.decode(new, skip_special_tokens=True)
            for s in job.params.stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            self._finish_stream(job)
            self.stats["tokens"] += len(new)
            _resolve(
                job.future,
                job.loop,
                Generation(
                    text=text.strip(),
                    model=self.model_name,
                    adapter=job.adapter,
                    adapter_version=job.version,
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=len(new),
                    finish_reason=finish,  # type: ignore[arg-type]
                    trimmed_turns=trims[i],
                    timings={
                        "queue_s": started - job.submitted,
                        "generate_s": elapsed,
                        "batch_size": float(len(jobs)),
                    },
                ),
            )

    @staticmethod
    def _finish_stream(job: _Job) -> None:
        if job.stream is not None:
            job.loop.call_soon_threadsafe(job.stream.put_nowait, None)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [int(value)]


class _BatchStreamer:
    """A transformers streamer for a whole batch: hands each row's new text to its request."""

    def __init__(self, tokenizer: Any, jobs: list[_Job]) -> None:
        self.tokenizer = tokenizer
        self.jobs = jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent: list[int] = [0] * len(jobs)
        self.prompt_seen = False
        self.eos = tokenizer.eos_token_id

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        column = value.reshape(len(self.jobs), -1)[:, -1].tolist()
        for i, token in enumerate(column):
            job = self.jobs[i]
            if job.stream is None or token in (self.eos, self.tokenizer.pad_token_id):
                continue
            if len(self.tokens[i]) >= job.params.max_new_tokens:
                continue
            self.tokens[i].append(token)
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half a multi-byte character: wait for the rest
            delta = text[self.sent[i] :]
            if delta:
                self.sent[i] = len(text)
                job.loop.call_soon_threadsafe(job.stream.put_nowait, delta)

    def end(self) -> None:
        pass
