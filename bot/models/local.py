"""The local backend: one worker thread owns the model and decodes every request together.

Continuous batching: the worker keeps one batch of running sequences and one KV cache for
them, and advances all of them by one token per step. Between steps it drops rows whose
caller stopped waiting (timeout, disconnect, shutdown) and rows that finished, and admits
waiting requests into the free slots (their prompts prefilled together, then merged into the
running cache). So a request never waits for the longest reply of a batch it is not in, a
request nobody is waiting for stops costing compute within one step, and LoRA adapters mix
in one batch (one adapter per row).

The worker drives a *decoder* (see bot/models/transformers_decoder.py for the interface):
chinwag's own for Llama-family models (bot/models/decoder.py), any transformers model
otherwise.

Admission control: every request carries a deadline. From its measured step time, prefill
speed and reply lengths the worker knows roughly when a new request would start and finish;
one that cannot finish in time is refused at once with :class:`RuntimeBusy` (and a
``retry_after_s``), so the skill can answer "busy" honestly instead of letting the user wait
for an apology. A running row that reaches its deadline ends with what it has
(``finish_reason="deadline"``), and so does one whose user has sent a newer message
(``"superseded"``: the core sets ``types.SUPERSEDED``; one not started yet is dropped).

Adapters are versioned. A request holds the adapter version current when it was submitted;
loading a new version makes it current for new requests while in-flight ones finish on the old
one, which is unloaded when its last request completes — hot-swap without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.models.prefix_cache import PrefixCache
from bot.models.tuning import Neighbours, ThreadTuner
from bot.models.types import (
    SUPERSEDED,
    ChatMessages,
    Generation,
    GenerationParams,
    Likelihood,
    ModelError,
    RuntimeBusy,
    ShuttingDown,
    Superseded,
    UnknownAdapter,
)
from bot.process import glibc

log = logging.getLogger(__name__)

#: Admission compares deadlines with this multiple of the estimated time to finish.
SAFETY = 1.25
#: Prompt batches are left-padded to a multiple of this many tokens (see ``_prefill``).
PREFILL_ALIGN = 32
#: A prompt this long, prefilled whole and alone, is not padded to PREFILL_ALIGN nor seeded
#: with a short cached prefix: unpadded and from its first token its attention takes SDPA's
#: causal path, which skips the blocks above the diagonal (on 2 cores, per layer: 768 tokens
#: 8.4 → 6.2 ms, 2,048 62 → 36, 4,096 248 → 129; under ~600 tokens no gain).
CAUSAL_PROMPT_TOKENS = 768
#: Scoring requests share a forward pass when each is at least this share of the longest one's
#: length, and at most this many. Since prefills are packed (decoder._Packed) padding costs
#: only attention; one pass for everything measured 0.66 s against 0.69 s for a QA re-rank
#: (four passages and the baseline, 2026-12-07): within noise, so the grouping stays.
SCORE_BATCH_LENGTHS = 0.7
SCORE_BATCH_ROWS = 8
#: Seconds without work before the worker tidies up (frees memory, prepares faster layers).
IDLE_S = 1.0
#: At most this many cohorts run side by side (see ``_merge``): each costs a forward pass a step.
MAX_COHORTS = 4


def _padding(rows_a: int, len_a: int, rows_b: int, len_b: int) -> int:
    """Cached positions of padding that one left-padded cache for both groups holds beyond
    what two caches of their own would."""
    return (rows_a + rows_b) * max(len_a, len_b) - rows_a * len_a - rows_b * len_b


@dataclass(slots=True, eq=False)
class _Job:
    messages: ChatMessages
    params: GenerationParams
    adapter: str | None
    internal: str | None
    version: str | None
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue[str | None] | None = None
    deadline: float | None = None  # time.monotonic()
    cut: Any = None  # threading.Event: the user sent a newer message (see types.SUPERSEDED)
    submitted: float = field(default_factory=time.monotonic)
    estimated_start: float = 0.0  # admission's estimate of the wait, before calibration (s)
    chars: int = 0  # the prompt's characters, counted in the queue's until it starts
    partial: Any = None  # a long prompt's keys and values so far, chunk by chunk (_Chunked)
    chunk: int = 0  # the next chunk's tokens (0: ``prefill_chunk_tokens``)
    chunk_budget_s: float = 0.0  # what its first chunk took: the pause every chunk keeps to
    # Filled in by the worker.
    prompt: list[int] = field(default_factory=list)
    trimmed: int = 0
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    started: float = 0.0
    first_token: float = 0.0
    batch_sizes: int = 0
    finished: bool = False  # completed normally (not failed or abandoned)
    released: bool = False  # its slot and adapter reference are given back (exactly once)


@dataclass(slots=True)
class _Chunked:
    """A long prompt's cache between its chunks: the next chunk appends to it in place.

    Until 2026-12-08 the keys and values were copied out after each chunk and into a new
    cache before the next: three copies of the whole prompt so far, per chunk (by estimate
    ~5 GB of copying for a 4,000-token prompt in ~40 chunks; 150–200 MB more at the peak)."""

    cache: Any  # the decoder's cache, one row, no padding
    tokens: int  # the prompt tokens in it


@dataclass(slots=True)
class _Control:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True, eq=False)
class _Chore:
    """Work for the worker between steps that nobody awaits (installing prepared layers)."""

    fn: Callable[[], Any]


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

    # A closed loop means nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(apply)


class _Batch:
    """A cohort of running rows, their KV cache and attention mask (all left-padded to one
    length). The worker runs up to ``MAX_COHORTS`` of them, one forward pass each a step."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, L] 1 where a cached position is real
        self.last: Any = None  # [B, 1] the token each row feeds next

    def __len__(self) -> int:
        return len(self.jobs)


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
        prefill_tokens: int = 2048,
        prefill_chunk_tokens: int = 256,
        max_start_wait_s: float | None = None,
        threads: ThreadTuner | None = None,
        prefill_threads: ThreadTuner | None = None,
        prefix_cache_tokens: int = 4096,
        prepare_layers: Callable[[Callable[[], bool]], Callable[[], Any]] | None = None,
        max_padding_mb: float = 256.0,
    ) -> None:
        if not hasattr(model, "new_cache"):  # a transformers model as it is
            from bot.models.transformers_decoder import TransformersDecoder

            model = TransformersDecoder(model)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_wait = max_queue_wait_ms / 1000
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._chunking: _Job | None = None  # the long prompt being prefilled a chunk a step
        self.max_start_wait_s = max_start_wait_s
        self.context_window = context_window or model.max_positions
        self.threads = threads
        self.prefill_threads = prefill_threads
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._prepare_layers = prepare_layers
        self._preparing: threading.Thread | None = None
        #: Set once the faster layers are in (or there are none to prepare, or preparing them
        #: failed or was cancelled): measurements wait for it, live traffic never does.
        self.layers_ready = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # adapter bookkeeping nests (load → delete old)
        self._adapters: dict[str, tuple[str, str]] = {}
        self._refs: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._pending = 0  # submitted and not yet finished (waiting or running)
        self._running = 0
        self._queued_chars = 0  # prompt characters of requests not started yet
        self._waiting: deque[_Job] = deque()
        self._batches: list[_Batch] = []  # the running cohorts
        self.max_padding_mb = max_padding_mb
        self._kv_token_bytes = 0  # one cached position of one row, all layers (learnt)
        self._stopping = False
        self._eos: set[int] = set()
        # Measured while serving (exponential moving averages), for admission control.
        self.step_s: float | None = None
        self.prefill_tok_s: float | None = None
        self.reply_tokens: float | None = None
        #: Actual over estimated wait for a slot, learnt from admitted requests: the estimate
        #: assumes the rows ahead finish evenly, and under 4x load it ran ~20 % short (users
        #: admitted under a 10 s limit waited 11.2 s at the median; docs/performance.md).
        self.wait_ratio = 1.0
        self.stats: Counter[str] = Counter()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            eos = self.tokenizer.eos_token_id
            self._eos = self.model.eos_token_ids | ({eos} if eos is not None else set())
            self._thread = threading.Thread(
                target=self._run, name="chinwag-model-worker", daemon=True
            )
            self._thread.start()
            for neighbours in self._neighbours():
                neighbours.follow()
            if self._prepare_layers is None:
                self.layers_ready.set()
            else:
                prepare, self._prepare_layers = self._prepare_layers, None
                # Not a daemon: a thread killed inside a torch kernel at interpreter exit
                # aborts the process ("terminate called without an active exception", exit
                # -6 on SIGTERM). stop() cancels it; it notices within a kernel or two.
                self._preparing = threading.Thread(
                    target=self._prepare, args=(prepare,), name="chinwag-fast-layers"
                )
                self._preparing.start()

    def _prepare(self, prepare: Callable[[Callable[[], bool]], Callable[[], Any]]) -> None:
        """Build the faster layers beside serving, then have the worker install them.

        Not on the worker, and not only when it is idle: a bot that always had a question in
        hand never got them (docs/performance.md, 2026-12-07). At a lower CPU priority, so
        replies being generated meanwhile keep the cores; ``prepare`` is told to stop when
        the backend stops.
        """
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own nice
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))

        def stopped() -> bool:
            return self._stopping or self._thread is None

        try:
            install = prepare(stopped)
        except Exception:
            log.exception("could not prepare the faster CPU layers")
            self.layers_ready.set()
            return
        if stopped():
            self.layers_ready.set()
            return

        def chore() -> None:
            try:
                install()
            finally:
                self.layers_ready.set()

        self._queue.put(_Chore(chore))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail every waiting and running request (``ShuttingDown``) and end the worker.

        The worker checks between decode steps, so this returns within one step.
        """
        if self._thread is not None:
            with self._lock:  # no request slips in behind the stop unseen
                self._stopping = True
                self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not stop within %.0fs", timeout or 0)
            self._thread = None
        if self._preparing is not None:
            self._preparing.join(timeout)
            self._preparing = None
        for neighbours in self._neighbours():
            neighbours.close()
        self.layers_ready.set()  # nothing more will arrive: nobody waits for it

    def _neighbours(self) -> list[Neighbours]:
        """What the thread tuners read of other work on these CPUs (one shared account)."""
        found = {
            id(t.neighbours): t.neighbours
            for t in (self.threads, self.prefill_threads)
            if t is not None and t.neighbours is not None
        }
        return list(found.values())

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def load(self) -> dict[str, float]:
        """What the worker is doing now: requests waiting and running, and its measured speed."""
        with self._lock:
            return {
                "pending": float(self._pending),
                "running": float(self._running),
                "waiting": float(self._pending - self._running),
                # Cohorts of rows decoded side by side, each its own cache length.
                "cohorts": float(len(self._batches)),
                "step_s": self.step_s or 0.0,
                "capacity": float(self.max_batch_size),
                "wait_ratio": self.wait_ratio,
                # 1: decode steps run on the kernels compiled for this CPU (kernels.py).
                "native_kernels": float(_native_in_use(self.model)),
                # Up to how many rows the linear layers run on chinwag's own kernel (0: none).
                "native_linear_rows": float(_native_linear_rows(self.model)),
            }

    # -- requests ------------------------------------------------------------------------------

    def estimate(self, params: GenerationParams, prompt_chars: int = 400) -> tuple[float, float]:
        """Seconds until a new request would start, and until it would finish (0, 0 unknown)."""
        wait, work = self._estimate(params, prompt_chars)
        start = wait * self.wait_ratio
        return start, start + work

    def _estimate(self, params: GenerationParams, prompt_chars: int) -> tuple[float, float]:
        """The wait for a slot before calibration (what ``wait_ratio`` learns against), and
        the request's own prefill and generation time."""
        step = self.step_s
        if step is None:
            return 0.0, 0.0
        slots = self.max_batch_size
        reply = self.reply_tokens or params.max_new_tokens / 2
        mine = min(params.max_new_tokens, max(reply, 1.0))
        rate = self.prefill_tok_s or 2000.0
        prefill = (prompt_chars / 4) / rate
        busy = self._pending
        if busy < slots:
            # A slot is free: what stands ahead is the prefill of the prompts queued before
            # this one, their own lengths (until 2026-12-08 this prompt's length times their
            # number: a long message behind 15 short ones was told "busy, about 16 s").
            wait = (self._queued_chars / 4) / rate
        else:
            # Rows finish at about ``slots`` per reply length; we start once those ahead did.
            ahead = busy - slots + 1
            wait = ahead * reply * step / slots
        return wait, prefill + mine * step

    async def generate(
        self,
        messages: ChatMessages,
        params: GenerationParams,
        adapter: str | None = None,
        stream: asyncio.Queue[str | None] | None = None,
        *,
        deadline: float | None = None,
    ) -> Generation:
        """Generate a reply; ``deadline`` is a ``time.monotonic()`` instant it must be done by."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the bot is shutting down")
            if self._thread is None:
                raise ModelError("the model worker is not running")
            if self._pending >= self.max_queue:
                raise RuntimeBusy(
                    f"the model is busy ({self._pending} requests waiting); try again shortly",
                    retry_after_s=self._retry_after(params),
                )
            wait, work = self._estimate(params, sum(len(m.get("content", "")) for m in messages))
            start = wait * self.wait_ratio
            finish = start + work
            now = time.monotonic()
            # Estimates come from averages and the batch may grow meanwhile: keep a margin.
            if deadline is not None and finish and now + SAFETY * finish > deadline:
                raise RuntimeBusy(
                    f"the model cannot answer in time (about {finish:.0f}s needed, "
                    f"{max(0.0, deadline - now):.0f}s left)",
                    retry_after_s=max(1.0, start),
                )
            if self.max_start_wait_s is not None and start > self.max_start_wait_s:
                raise RuntimeBusy(
                    f"the model is busy (a reply would start in about {start:.0f}s)",
                    retry_after_s=start,
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
            chars = sum(len(m.get("content", "")) for m in messages)
            self._queued_chars += chars
            loop = asyncio.get_running_loop()
            job = _Job(
                messages,
                params,
                adapter,
                internal,
                version,
                loop.create_future(),
                loop,
                stream,
                deadline,
                SUPERSEDED.get(),
                estimated_start=wait,
                chars=chars,
            )
            self._queue.put(job)
        # Cancelling the caller cancels ``job.future``; the worker sees that before its next
        # step and drops the row. The slot counts as busy until then: it really is.
        return await job.future

    def _learn_wait(self, job: _Job) -> None:
        """Calibrate the wait estimate against the wait the job had (see ``wait_ratio``).

        Only waits the estimate expected to be noticeable count: a sub-second wait is mostly
        batching delay, and dividing by a near-zero estimate says nothing.
        """
        if job.estimated_start < 0.5:
            return
        ratio = min(3.0, max(0.5, (job.started - job.submitted) / job.estimated_start))
        self.wait_ratio = 0.9 * self.wait_ratio + 0.1 * ratio

    def _retry_after(self, params: GenerationParams) -> float:
        start, _ = self.estimate(params)
        return max(1.0, start)

    def _dequeued(self, job: _Job) -> None:
        """The job's prompt no longer stands in the queue (it started, or left unstarted)."""
        with self._lock:
            self._queued_chars -= job.chars
            job.chars = 0

    def _done(self, job: _Job) -> None:
        """Bookkeeping when a request leaves the worker (finished, failed or dropped)."""
        self._dequeued(job)
        with self._lock:
            if job.released:
                return
            job.released = True
            self._pending -= 1
            if job.internal is None:
                return
            self._refs[job.internal] -= 1
            orphan = job.internal in self._retired and self._refs[job.internal] <= 0
        if orphan:
            self._delete_adapter(job.internal)

    async def control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between steps (model changes go through here)."""
        if self._thread is None:
            return fn()
        loop = asyncio.get_running_loop()
        ctl = _Control(fn, loop.create_future(), loop)
        self._queue.put(ctl)
        return await ctl.future

    async def score(
        self, requests: list[tuple[ChatMessages, str]], *, deadline: float | None = None
    ) -> list[Likelihood]:
        """How likely the base model finds each text as the reply to its chat prompt.

        While the model is generating for anyone, one request per turn of the worker, between
        decode steps: scoring five passages (~200 tokens each) holds up the conversations
        being generated by one short prefill at a time rather than by all five at once. With
        nobody waiting, the requests go as padded batches of like lengths, one forward pass
        each: four ~190-token passages cost 1.17 s in one pass against 1.47 s in four on 2
        cores (docs/performance.md). Past ``deadline`` it stops and raises
        :class:`TimeoutError` — the caller has a cheaper answer to fall back to.
        """
        with self._lock:
            if self._pending >= self.max_batch_size:
                # Every slot is taken and more may be queued: scoring now would hold up
                # replies people are waiting for, for a ranking the caller can do without.
                raise RuntimeBusy(
                    f"the model is busy ({self._pending} requests); not scoring",
                    retry_after_s=self._retry_after(GenerationParams()),
                )
        out: list[Likelihood] = []
        while len(out) < len(requests):
            if self._stopping:
                raise ShuttingDown("the bot is shutting down")
            if self._thread is None:
                raise ModelError("the model worker is not running")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            with self._lock:
                alone = self._pending == 0
            rest = requests[len(out) :] if alone else requests[len(out) : len(out) + 1]
            out += await self.control(functools.partial(self._likelihoods, rest))
        return out

    def _likelihoods(self, requests: list[tuple[ChatMessages, str]]) -> list[Likelihood]:
        """Log-probability of each text's tokens after its prompt (on the worker thread).

        Requests of like lengths share a forward pass (see ``SCORE_BATCH_LENGTHS``), keeping
        only the logits that predict the texts (the vocabulary projection
        of the prompts' hundreds of positions would cost a tenth of the pass), left-padded to
        a multiple of ``PREFILL_ALIGN`` as prefills are: one oneDNN kernel per width rather
        than one per passage length.
        """
        rows: list[tuple[list[int], list[int]]] = []
        for messages, text in requests:
            target = self.tokenizer.encode(text, add_special_tokens=False)[:256]
            prompt = self._prompt(messages, len(target))[0] if target else []
            rows.append((prompt + target[:-1], target))
        out: list[Likelihood] = [Likelihood(0.0, 0)] * len(rows)
        order = sorted((i for i, r in enumerate(rows) if r[1]), key=lambda i: -len(rows[i][0]))
        while order:
            # Longest first, so the requests within reach of the longest are a prefix.
            longest = len(rows[order[0]][0])
            n = sum(len(rows[i][0]) >= SCORE_BATCH_LENGTHS * longest for i in order)
            group, order = order[: min(n, SCORE_BATCH_ROWS)], order[min(n, SCORE_BATCH_ROWS) :]
            for i, likelihood in zip(
                group, self._score_pass([rows[i] for i in group]), strict=True
            ):
                out[i] = likelihood
        return out

    def _score_pass(self, rows: list[tuple[list[int], list[int]]]) -> list[Likelihood]:
        import torch

        width = -(-max(len(tokens) for tokens, _ in rows) // PREFILL_ALIGN) * PREFILL_ALIGN
        keep = max(len(target) for _, target in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (tokens, _) in enumerate(rows):
            ids[r, width - len(tokens) :] = torch.tensor(tokens)
            mask[r, width - len(tokens) :] = 1
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        threads = _use_threads(self.prefill_threads, width * len(rows))
        t0 = time.monotonic()
        logits = self.model(ids, mask, position, self.model.new_cache(), [None] * len(rows), keep)
        _record_pass(self.prefill_threads, threads, time.monotonic() - t0, width * len(rows))
        self.stats["score_passes"] += 1
        out = []
        for r, (_, target) in enumerate(rows):
            # Left-padded, every row ends at the last position: its text's predictions are
            # its last len(target) logits.
            logprobs = torch.log_softmax(logits[r, keep - len(target) :].float(), dim=-1)
            picked = logprobs.gather(1, torch.tensor(target, device=device)[:, None])
            out.append(Likelihood(float(picked.sum()), len(target)))
        return out

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path, version: str) -> None:
        internal = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}__v{version}")

        def load() -> None:
            if not Path(path, "adapter_config.json").exists():
                raise ModelError(f"{path} is not a peft adapter folder (no adapter_config.json)")
            if internal in self.model.adapter_names():
                with self._lock:
                    if self._refs[internal] > 0:  # same version again: already serving
                        self._adapters[name] = (internal, version)
                        return
                self.model.delete_adapter(internal)
            try:
                self.model.load_adapter(path, internal)
            except ValueError as exc:  # decoder.Unsupported: an adapter it cannot serve exactly
                raise ModelError(
                    f"cannot serve the adapter in {path}: {exc} (models.implementation = "
                    f"'transformers' serves every adapter peft can load)"
                ) from None
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
        if self.prefixes is not None:
            self.prefixes.drop_adapter(internal)
        try:
            self.model.delete_adapter(internal)
        except Exception:
            log.warning("could not unload adapter %s", internal, exc_info=True)

    def adapters(self) -> dict[str, str]:
        with self._lock:
            return {name: version for name, (_, version) in self._adapters.items()}

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        trim = _malloc_trim()
        worked = False
        with torch.inference_mode():
            while True:
                idle = not self._batches and not self._waiting and self._chunking is None
                if idle and worked:
                    # Housekeeping once the worker has been idle a moment (not between the
                    # turns of a conversation, where it would delay the next first token).
                    controls = self.stats["controls"]
                    if not self._take(block=True, within=IDLE_S):
                        self._shutdown()
                        return
                    if self._waiting or self.stats["controls"] != controls:
                        # A control (a scoring pass) is work too: a question being re-ranked
                        # has more passes coming; housekeeping waits for a real pause.
                        continue
                    # The KV caches of the last batch were freed; hand the memory back to the
                    # OS so RSS after a burst returns near its warm level (glibc keeps it).
                    trim()
                    worked = False
                    continue
                if not self._take(block=idle):
                    self._shutdown()
                    return
                self._expire()
                self._admit()
                if self._batches:
                    worked = True
                    self._step_all()

    def _take(self, *, block: bool, within: float | None = None) -> bool:
        """Move what arrived into the waiting line (controls run now); False on stop.

        ``block``: wait for the first item (at most ``within`` seconds).
        """
        first = True
        fill_until = None
        while True:
            try:
                if block and first:
                    item = self._queue.get(timeout=within)
                elif fill_until is not None:
                    remaining = fill_until - time.monotonic()
                    item = self._queue.get(timeout=remaining) if remaining > 0 else None
                    if item is None:
                        return True
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            if isinstance(item, _Control):
                self._run_control(item)
            elif isinstance(item, _Chore):
                try:
                    item.fn()
                except Exception:
                    log.exception("could not install the faster CPU layers")
            else:
                self._waiting.append(item)
                # Idle and a first request arrived: wait briefly for company, so a burst is
                # prefilled as one batch rather than one request per step.
                if block and first and self.max_wait > 0:
                    fill_until = time.monotonic() + self.max_wait
            first = False

    def _run_control(self, ctl: _Control) -> None:
        self.stats["controls"] += 1
        try:
            _resolve(ctl.future, ctl.loop, ctl.fn())
        except BaseException as exc:
            _resolve(
                ctl.future,
                ctl.loop,
                exc=exc if isinstance(exc, Exception) else ModelError(str(exc)),
            )

    def _expire(self) -> None:
        """Drop waiting requests nobody waits for, and refuse those that can no longer finish."""
        now = time.monotonic()
        if self._chunking is not None and self._dropped(self._chunking, now):
            self._chunking = None
        if not self._waiting:
            return
        self._waiting = deque(job for job in self._waiting if not self._dropped(job, now))

    def _dropped(self, job: _Job, now: float) -> bool:
        """Whether a request not yet decoding is let go: its caller stopped waiting, a newer
        message superseded it, or it can no longer finish by its deadline (then "busy")."""
        if job.future.done():
            self._finish_stream(job)
            self._done(job)
            return True
        if job.cut is not None and job.cut.is_set():
            self._fail(job, Superseded("the user sent a newer message"))
            return True
        step = self.step_s or 0.0
        if job.deadline is not None and step:
            need = SAFETY * min(job.params.max_new_tokens, self.reply_tokens or 1.0) * step
            if now + need > job.deadline:
                self._fail(job, RuntimeBusy("the model could not start this reply in time"))
                return True
        return False

    def _admit(self) -> None:
        """Prefill what joins this step: the next chunk of a long prompt, and a group of
        waiting requests, within ``prefill_tokens`` together."""
        tokens = 0
        if self._chunking is not None:
            tokens = self._prefill_chunk(self._chunking)
        free = self.max_batch_size - self._rows() - (self._chunking is not None)
        if free <= 0 or not self._waiting:
            return
        joining: list[_Job] = []
        longest = 0
        at = 0  # the queue's first job not passed over
        while at < len(self._waiting) and len(joining) < free:
            job = self._waiting[at]
            if not job.prompt:
                try:
                    job.prompt, job.trimmed = self._prompt(job.messages, job.params.max_new_tokens)
                except ModelError as exc:
                    del self._waiting[at]
                    self._fail(job, exc)
                    continue
            if len(job.prompt) > self.prefill_chunk_tokens and self._batches:
                # Beside running replies, a long prompt is prefilled a chunk a step, one at a
                # time, so they pause for a chunk rather than for all of it. With nothing
                # running it goes whole, with the others: chunks there only cost (QA p50
                # 0.82–0.85 against 0.96–1.05 s when every ~600-token answer prompt went in
                # chunks).
                if self._chunking is None and not joining and not tokens:
                    del self._waiting[at]
                    self._chunking = job
                    self._prefill_chunk(job)
                    break
                # Another long prompt holds the chunk slot: this one keeps its place at the
                # head of the long prompts, and the short ones behind it are not held up by
                # it (they were, until 2026-12-08, for all of the first prompt's chunks).
                at += 1
                continue
            # Bound the prefill per step so running rows keep moving (at least one joins).
            if (joining or tokens) and tokens + len(job.prompt) > self.prefill_tokens:
                break
            # Prompts too unlike in length to share one padded cache wait a step and come
            # in as a group of their own (a cohort, ``_merge``).
            if joining and self._too_much_padding(
                _padding(len(joining), longest, 1, len(job.prompt))
            ):
                break
            del self._waiting[at]
            joining.append(job)
            tokens += len(job.prompt)
            longest = max(longest, len(job.prompt))
        if not joining:
            return
        try:
            self._prefill(joining)
        except Exception as exc:
            log.exception("prefill failed for %d requests", len(joining))
            err = ModelError(f"generation failed: {type(exc).__name__}: {exc}")
            for job in joining:
                self._fail(job, err)

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

    def _forward(
        self, jobs: list[_Job], ids: Any, mask: Any, position: Any, cache: Any, last_only: bool
    ) -> Any:
        """Logits for the new tokens, each row through its own adapter."""
        adapters = [j.internal for j in jobs]
        return self.model(ids, mask, position, cache, adapters, last_only)

    def _prefill_chunk(self, job: _Job) -> int:
        """The next chunk of the long prompt being prefilled; its last one also samples the
        first token and joins the running rows. Returns the prompt tokens it prefilled."""
        try:
            started = time.monotonic()
            # The replies it was chunked for may all have finished: the rest goes at once.
            chunk = job.chunk or self.prefill_chunk_tokens
            total = self._prefill([job], chunk=chunk if self._batches else None)
            if job.partial is None:  # the last chunk: it runs with the others now
                self._chunking = None
            else:
                self._size_next_chunk(job, total, time.monotonic() - started)
            return total
        except Exception as exc:
            self._chunking = None
            log.exception("prefill failed for a long prompt (%d tokens)", len(job.prompt))
            self._fail(job, ModelError(f"generation failed: {type(exc).__name__}: {exc}"))
            return 0

    def _size_next_chunk(self, job: _Job, tokens: int, took: float) -> None:
        """Each chunk attends to every token before it, so a token costs more the further
        into the prompt it lies (SmolLM2 on 2 cores: 256 tokens 0.16 s at the start, 0.68 s
        after 3,840): with chunks of a fixed size the running replies' pauses grew with the
        prompt (longest 791 ms for a 3,957-token one). The next chunk gets as many tokens as
        fit the time the first one took, at the cost per token the last one showed; in
        multiples of ``PREFILL_ALIGN`` (the kernels' shapes), at least one."""
        per_token = took / max(tokens, 1)
        if not job.chunk_budget_s:
            job.chunk_budget_s = per_token * self.prefill_chunk_tokens
        fits = int(job.chunk_budget_s / max(per_token, 1e-9)) // PREFILL_ALIGN * PREFILL_ALIGN
        job.chunk = max(PREFILL_ALIGN, min(self.prefill_chunk_tokens, fits))

    def _prefill(self, jobs: list[_Job], chunk: int | None = None) -> int:
        """Prefill ``jobs``' prompts (reusing cached prefixes), sample each first token and
        join the running rows; returns the prompt tokens prefilled. With ``chunk`` (one job:
        a long prompt a chunk a step), only that many more of its tokens unless they are the
        last, kept in ``job.partial`` for the next."""
        import torch

        t0 = time.monotonic()
        device = self.device
        # The part of each prompt whose keys and values are at hand: the chunks prefilled so
        # far, or what a finished reply left behind.
        chunked = jobs[0].partial if len(jobs) == 1 else None
        reused: list[tuple[Any, int] | None] = [
            (j.partial, j.partial.tokens)
            if j.partial is not None
            else self.prefixes.match(j.internal, j.prompt)
            if self.prefixes is not None
            else None
            for j in jobs
        ]
        whole = (
            chunk is None
            and len(jobs) == 1
            and chunked is None
            and len(jobs[0].prompt) >= CAUSAL_PROMPT_TOKENS
        )
        if whole and reused[0] is not None and reused[0][1] * 8 < len(jobs[0].prompt):
            # A long prompt alone, prefilled whole: from its first token and unpadded, its
            # attention takes SDPA's causal path (2x faster at 4,096 tokens), which a short
            # reused prefix (a system prompt) would cost more than it saves.
            reused = [None]
        have = [m[1] if m else 0 for m in reused]
        upto = None
        if chunk is not None and len(jobs[0].prompt) - have[0] > chunk:
            upto = have[0] + chunk
        ends = [len(j.prompt) if upto is None else upto for j in jobs]
        past = max(have)
        # Widths rounded up to a multiple of PREFILL_ALIGN: oneDNN builds a kernel per matmul
        # shape on first use (~1 ms a layer); a handful of shapes instead of one per prompt
        # length keeps that off the time to first token.
        longest = max(e - h for e, h in zip(ends, have, strict=True))
        width = longest if whole else -(-longest // PREFILL_ALIGN) * PREFILL_ALIGN
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), past + width), dtype=torch.long)
        for i, (job, h, e) in enumerate(zip(jobs, have, ends, strict=True)):
            n = e - h
            ids[i, width - n :] = torch.tensor(job.prompt[h:e])
            mask[i, past + width - n :] = 1
            mask[i, past - h : past] = 1
        threads = _use_threads(self.prefill_threads, ids.numel())
        ids, mask = ids.to(device), mask.to(device)
        position = ((mask.cumsum(-1) - 1).clamp(min=0))[:, past:]
        if chunked is not None:
            cache = chunked.cache
        else:
            cache = self.model.new_cache(self._seed(reused, past) if past else None)
        if past and chunked is None:
            self.stats["prefix_tokens_reused"] += sum(have)
        logits = self._forward(jobs, ids, mask, position, cache, last_only=True)
        elapsed = time.monotonic() - t0
        total = int(mask.sum()) - sum(have)
        _record_pass(self.prefill_threads, threads, elapsed, ids.numel())
        rate = total / max(elapsed, 1e-6)
        old = self.prefill_tok_s
        self.prefill_tok_s = rate if old is None else 0.8 * old + 0.2 * rate
        for job in jobs:
            if not job.started:
                job.started = t0
                self._learn_wait(job)
                self._dequeued(job)
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += total
        if upto is not None:  # a chunk: keep the prompt's keys and values so far
            job = jobs[0]
            if bool(mask.all()):  # chunks are whole multiples of PREFILL_ALIGN: no padding
                job.partial = _Chunked(cache, upto)
            else:  # a chunk size that is no multiple of PREFILL_ALIGN came padded: drop that
                real = mask[0].nonzero().squeeze(1)
                one = [(layer.keys[:, :, real], layer.values[:, :, real]) for layer in cache.layers]
                job.partial = _Chunked(self.model.new_cache(one), upto)
            self.stats["prefill_chunks"] += 1
            return total
        first = self._sample(logits[:, -1, :], jobs)
        now = time.monotonic()
        for job in jobs:
            job.partial = None
        batch = self._rows() + len(jobs)
        column = first.squeeze(1).tolist()
        keep = [
            i
            for i, (job, token) in enumerate(zip(jobs, column, strict=True))
            if not self._consume(job, token, batch, now)
        ]
        if keep:
            if len(keep) != len(jobs):
                idx = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(idx)
                mask, first = mask[idx], first[idx]
            self._merge([jobs[i] for i in keep], cache, mask, first)
        with self._lock:
            self._running = self._rows()
        return total

    def _seed(self, reused: list[tuple[Any, int] | None], past: int) -> list[tuple[Any, Any]]:
        """Per layer, the reused keys and values of every row, right-aligned to ``past``."""
        entry = next(m[0] for m in reused if m)
        layers = []
        for li, (k0, v0) in enumerate(entry.layers):
            h, _, d = k0.shape
            keys = k0.new_zeros((len(reused), h, past, d))
            values = v0.new_zeros((len(reused), h, past, v0.shape[-1]))
            for row, m in enumerate(reused):
                if m:
                    k, v = m[0].layers[li]
                    keys[row, :, past - m[1] :] = k[:, : m[1]]
                    values[row, :, past - m[1] :] = v[:, : m[1]]
            layers.append((keys, values))
        return layers

    def _rows(self) -> int:
        return sum(len(b) for b in self._batches)

    def _too_much_padding(self, positions: int) -> bool:
        """Whether ``positions`` cached positions of padding (every layer's keys and values)
        would take more than ``max_padding_mb``."""
        if not self._kv_token_bytes:
            return False  # nothing cached yet to tell a position's size by
        return positions * self._kv_token_bytes > self.max_padding_mb * 2**20

    def _merge(self, jobs: list[_Job], cache: Any, mask: Any, first: Any) -> None:
        """Add freshly prefilled rows to the running cohort they pad least (left-padding the
        shorter side), or start a cohort of their own where joining any would cache more than
        ``max_padding_mb`` of padding.

        One batch for everyone padded every row to the longest: a 2,000-token message pasted
        among 15 short chats made their cache 16 × 2,000 positions (+1.9 GB for SmolLM2,
        against +0.17 GB for that message alone) and the round 1.5× slower. A cohort costs
        a forward pass a step (~7 ms for SmolLM2's one-row step on one core), so rows of
        similar lengths still share one.
        """
        import torch
        from torch.nn.functional import pad

        if not self._kv_token_bytes:
            self._kv_token_bytes = sum(
                2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
                for layer in cache.layers
            )
        new_len = mask.shape[1]
        best = min(
            self._batches,
            key=lambda c: _padding(len(c), c.mask.shape[1], len(jobs), new_len),
            default=None,
        )
        if best is None or (
            len(self._batches) < MAX_COHORTS
            and self._too_much_padding(_padding(len(best), best.mask.shape[1], len(jobs), new_len))
        ):
            fresh = _Batch()
            fresh.jobs, fresh.cache, fresh.mask, fresh.last = list(jobs), cache, mask, first
            self._batches.append(fresh)
            return
        b = best
        old_len = b.mask.shape[1]
        width = max(old_len, new_len)

        def widen(t: Any, have: int) -> Any:  # [B, H, L, D] → [B, H, width, D]
            return pad(t, (0, 0, width - have, 0)) if have < width else t

        layers = []
        for old, new in zip(b.cache.layers, cache.layers, strict=True):
            layers.append(
                (
                    torch.cat([widen(old.keys, old_len), widen(new.keys, new_len)]),
                    torch.cat([widen(old.values, old_len), widen(new.values, new_len)]),
                )
            )
        b.cache = self.model.new_cache(layers)
        b.mask = torch.cat([pad(b.mask, (width - old_len, 0)), pad(mask, (width - new_len, 0))])
        b.last = torch.cat([b.last, first])
        b.jobs.extend(jobs)

    def _step_all(self) -> None:
        """One decode step for every cohort; the step time the estimates use is all of them
        (each row waits for every cohort's pass before its next token)."""
        t0 = time.monotonic()
        for b in list(self._batches):
            try:
                self._step(b)
            except Exception as exc:  # OOM, a bad adapter: fail these rows, keep serving
                self._fail_batch(b, exc)
        elapsed = time.monotonic() - t0
        self.step_s = elapsed if self.step_s is None else 0.9 * self.step_s + 0.1 * elapsed
        self.stats["steps"] += 1
        self._batches = [b for b in self._batches if b.jobs]
        with self._lock:
            self._running = self._rows()

    def _step(self, b: _Batch) -> None:
        import torch

        threads = _use_threads(self.threads)
        t0 = time.monotonic()
        ones = torch.ones((len(b), 1), dtype=b.mask.dtype, device=b.mask.device)
        b.mask = torch.cat([b.mask, ones], dim=1)
        position = b.mask.sum(-1, keepdim=True) - 1
        logits = self._forward(b.jobs, b.last, b.mask, position, b.cache, last_only=False)
        nxt = self._sample(logits[:, -1, :], b.jobs)
        elapsed = time.monotonic() - t0
        if self.threads is not None and threads is not None:
            before = self.threads.current
            self.threads.record(threads, elapsed, len(b))
            if self.threads.current < before and self.prefill_threads is not None:
                # Decode steps, hundreds a minute, notice a neighbour first; prefills are few
                # (a 16-chat round has a handful) and would run slow until their own look.
                self.prefill_threads.look_now()
        self.stats["row_steps"] += len(b)
        self._accept(b, nxt, time.monotonic())

    def _sample(self, logits: Any, jobs: list[_Job]) -> Any:
        """Next token per row: greedy, or temperature + nucleus sampling, row by row."""
        import torch

        greedy = logits.max(-1).indices  # 3x faster than argmax on bf16 rows, same result
        sampled = [i for i, j in enumerate(jobs) if j.params.temperature > 0]
        if sampled:
            rows = logits[sampled].float()
            temps = torch.tensor(
                [jobs[i].params.temperature for i in sampled], device=rows.device
            ).unsqueeze(1)
            probs = torch.softmax(rows / temps, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            tops = torch.tensor([jobs[i].params.top_p for i in sampled], device=rows.device)
            keep = sorted_p.cumsum(-1) - sorted_p < tops.unsqueeze(1)
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
            picked = order.gather(-1, choice).squeeze(1)
            greedy[sampled] = picked
        return greedy.unsqueeze(1)

    def _consume(self, job: _Job, token: int, batch: int, now: float) -> bool:
        """Take one new token for ``job``; True when the row is finished (or abandoned)."""
        if job.future.done():  # the caller stopped waiting: free the slot now
            self._finish_stream(job)
            self._done(job)
            self.stats["abandoned"] += 1
            return True
        job.batch_sizes += batch
        finish: str | None = None
        if token in self._eos:
            finish = "stop"
        else:
            job.tokens.append(token)
            if not job.first_token:
                job.first_token = now
            self._stream_delta(job)
            full = len(job.prompt) + len(job.tokens) >= self.context_window
            if full or len(job.tokens) >= job.params.max_new_tokens:
                finish = "length"
            elif job.params.stop and self._hit_stop(job):
                finish = "stop"
            elif job.deadline is not None and now >= job.deadline:
                finish = "deadline"
            elif job.cut is not None and job.cut.is_set():
                finish = "superseded"
        if finish is None:
            return False
        self._complete(job, finish, now)
        return True

    def _accept(self, b: _Batch, tokens: Any, now: float) -> None:
        """Append each running row's new token; finish rows that are done, drop abandoned."""
        column = tokens.squeeze(1).tolist()
        rows = self._rows()
        keep = []
        for i, (job, token) in enumerate(zip(b.jobs, column, strict=True)):
            if not self._consume(job, token, rows, now):
                keep.append(i)
            elif job.finished and self.prefixes is not None:
                self._remember(b, i, job)
        if len(keep) == len(column):
            b.last = tokens
        else:
            self._select(b, keep)
            if keep:
                import torch

                b.last = tokens[torch.tensor(keep, device=tokens.device)]

    def _remember(self, b: _Batch, row: int, job: _Job) -> None:
        """Keep a finished row's keys and values for the conversation's next turn."""
        assert self.prefixes is not None
        import torch

        real = b.mask[row].nonzero().squeeze(1)
        seq = (job.prompt + job.tokens)[: len(real)]
        # One allocation per entry ([layers, 2, heads, tokens, dim]) rather than two per layer:
        # many small tensors kept for minutes fragment the heap (RSS that never comes back).
        kv = torch.stack(
            [torch.stack((layer.keys[row], layer.values[row])) for layer in b.cache.layers]
        )[:, :, :, real]
        layers = [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]
        self.prefixes.put(job.internal, seq, layers)

    def _select(self, b: _Batch, keep: list[int]) -> None:
        import torch

        if not keep:
            b.jobs, b.cache, b.mask, b.last = [], None, None, None
            return
        idx = torch.tensor(keep, device=b.mask.device)
        b.cache.batch_select_indices(idx)
        b.mask = b.mask[idx]
        b.jobs = [b.jobs[i] for i in keep]
        # Columns that are padding in every remaining row cost attention for nothing.
        real = b.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            b.mask = b.mask[:, start:]
            for layer in b.cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]

    def _hit_stop(self, job: _Job) -> bool:
        tail = self.tokenizer.decode(job.tokens[-16:], skip_special_tokens=True)
        return any(s and s in tail for s in job.params.stop)

    def _stream_delta(self, job: _Job) -> None:
        if job.stream is None:
            return
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a multi-byte character: wait for the rest
        delta = text[job.sent :]
        if delta:
            job.sent = len(text)
            self._put_stream(job, delta)

    def _complete(self, job: _Job, finish: str, now: float) -> None:
        job.finished = True
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for s in job.params.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        n = len(job.tokens)
        self.reply_tokens = n if self.reply_tokens is None else 0.9 * self.reply_tokens + 0.1 * n
        self.stats["requests"] += 1
        self.stats["tokens"] += n
        steps = max(1, n)
        self._finish_stream(job)
        self._done(job)
        _resolve(
            job.future,
            job.loop,
            Generation(
                text=text.strip(),
                model=self.model_name,
                adapter=job.adapter,
                adapter_version=job.version,
                prompt_tokens=len(job.prompt),
                completion_tokens=n,
                finish_reason=finish,  # type: ignore[arg-type]
                trimmed_turns=job.trimmed,
                timings={
                    "queue_s": job.started - job.submitted,
                    "ttft_s": (job.first_token or now) - job.submitted,
                    "generate_s": now - job.started,
                    "batch_size": job.batch_sizes / steps,
                },
            ),
        )

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._finish_stream(job)
        self._done(job)
        _resolve(job.future, job.loop, exc=exc)

    def _fail_batch(self, b: _Batch, exc: Exception) -> None:
        log.exception("generation failed for a batch of %d", len(b))
        err = ModelError(f"generation failed: {type(exc).__name__}: {exc}")
        for job in b.jobs:
            self._fail(job, err)
        b.jobs, b.cache, b.mask, b.last = [], None, None, None

    def _shutdown(self) -> None:
        err = ShuttingDown("the bot is shutting down")
        chunking = [self._chunking] if self._chunking is not None else []
        for job in [*(j for b in self._batches for j in b.jobs), *chunking, *self._waiting]:
            self._fail(job, err)
        self._batches = []
        self._chunking = None
        self._waiting.clear()
        while True:  # whatever raced in after the stop
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                self._fail(item, err)
            elif isinstance(item, _Control):
                _resolve(item.future, item.loop, exc=err)
        with self._lock:
            self._running = 0

    def _put_stream(self, job: _Job, piece: str | None) -> None:
        if job.stream is not None:
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(job.stream.put_nowait, piece)

    def _finish_stream(self, job: _Job) -> None:
        self._put_stream(job, None)


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` where there is one, else a no-op."""
    libc = glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


def _use_threads(tuner: ThreadTuner | None, tokens: int = 0) -> int | None:
    """Set the worker thread's torch threads to what ``tuner`` picks for its next pass.

    Per pass, not once: the worker alternates decode steps and prefill or scoring passes,
    and each kind has its own best count (tuning.ThreadTuner). A pass of more than
    ``PROBE_MAX_TOKENS`` is never the tuner's probe of another count: a 6,205-token prompt
    prefilled whole took 20 s on the one thread a probe tried, against 11 s on two."""
    if tuner is None:
        return None
    import torch

    threads = tuner.threads_for_next_step(probe=tokens <= PROBE_MAX_TOKENS)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


#: Passes up to this many tokens may be the prefill tuner's probes (a QA answer prompt is
#: ~600; a probe of the slower count costs its pass up to twice its time).
PROBE_MAX_TOKENS = 1024

#: A pass's fixed cost, in tokens' worth of work (kernel launches, the 30 layers' small ops):
#: 1×96, 1×160 and 1×224 tokens took 0.25, 0.37 and 0.48 s on the 2-core machine.
_PASS_OVERHEAD_TOKENS = 40


def _record_pass(
    tuner: ThreadTuner | None, threads: int | None, seconds: float, tokens: int
) -> None:
    """Tell ``tuner`` how long a prefill or scoring pass of ``tokens`` took, per token: passes
    of very different lengths are then comparable."""
    if tuner is not None and threads is not None:
        tuner.record(threads, seconds / (tokens + _PASS_OVERHEAD_TOKENS), batch=1)


def _native_in_use(model: Any) -> bool:
    from bot.models import decoder

    return isinstance(model, decoder.Decoder) and decoder._native is not None


def _native_linear_rows(model: Any) -> int:
    """The rows the model's linear layers serve on the native kernel (cpu_linear.FastLinear),
    read off its vocabulary projection (converted like every layer, last in the model)."""
    head = getattr(model, "lm_head", None)
    if getattr(head, "w_native", None) is None:
        return 0
    return int(getattr(head, "native_rows", 0))
