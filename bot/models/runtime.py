"""The model runtime the bot owns: every model-backed skill goes through it.

Skills call ``await runtime.generate(messages, adapter="qa")``;
no skill loads a model of its own. The base model loads on first use (so a bot without
model-backed skills never pays for it) in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.models.classifier import Classification, ClassifierPool
from bot.models.local import LocalBackend, _resolve
from bot.models.registry import AdapterRegistry
from bot.models.remote import RemoteBackend
from bot.models.types import (
    DEADLINE,
    ChatMessages,
    Generation,
    GenerationParams,
    Likelihood,
    ModelError,
    RuntimeBusy,
    ShuttingDown,
)
from bot.models.vllm_server import VLLMServer
from bot.process import abandonable_thread, stop_task

log = logging.getLogger(__name__)

Backend = LocalBackend | RemoteBackend


class ModelRuntime:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self.settings = settings
        self.config = settings.models
        self._backend = backend
        self.loaded_from_cache: bool | None = None
        #: Trained adapter versions and which one is in service (data_dir/adapters).
        self.registry = AdapterRegistry(
            self.config.registry_dir or AdapterRegistry.for_data_dir(settings.data_dir).root
        )
        #: Seconds between looks at the registry for promotions and rollbacks.
        self.follow_interval_s = 1.0
        self._follow: asyncio.Task[None] | None = None
        self._interrupted = False
        self._start_task: asyncio.Future[Backend] | None = None
        #: ``models.backend = "vllm"``: the server chinwag started, and the task watching it.
        self.server: VLLMServer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.classifiers = ClassifierPool(
            self.registry,
            device=self.config.device,
            max_batch=self.config.classify_max_batch,
            wait_ms=self.config.classify_wait_ms,
        )

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir or self.settings.data_dir / "models"

    async def start(self) -> Backend:
        """Load the base model (or connect to the server) and the configured adapters.

        Idempotent: the first call does the work, later ones wait for it or return at once. A
        caller that stops waiting (its deadline) does not stop the load for everyone else.
        """
        if self._interrupted:
            raise ShuttingDown("the bot is shutting down")
        if self._backend is not None and self._backend.running:
            return self._backend
        task = self._start_task
        if task is None or (task.done() and not self._backend_running()):  # first, or retry
            task = self._start_task = asyncio.ensure_future(self._start())
        return await asyncio.shield(task)

    def _backend_running(self) -> bool:
        return self._backend is not None and self._backend.running

    async def _start(self) -> Backend:
        # Only ever run as the one shared ``_start_task``: never twice at once.
        cfg = self.config
        if self._backend is None:
            self._backend = await self._create()
        if self._interrupted:
            raise ShuttingDown("the bot is shutting down")
        if not self._backend.running:
            if isinstance(self._backend, LocalBackend):
                self._backend.start()
            else:
                await self._backend.start()
            for name, adapter in cfg.adapters.items():
                await self._backend.load_adapter(name, adapter.path, adapter.version)
            # Then every generative adapter the trainers promoted (configured ones win).
            for name in self.registry.names():
                if name in cfg.adapters:
                    continue
                current = self.registry.current(name)
                if current is not None and current.kind == "generative":
                    await self._backend.load_adapter(name, current.path, current.version)
            self._follow = asyncio.create_task(self._follow_registry(), name="adapters")
        return self._backend

    async def _follow_registry(self) -> None:
        """Swap to the generative adapter version the registry has in service, without restart.

        A promotion (``chinwag train``, ``chinwag adapters promote``) or a rollback rewrites
        ``CURRENT``; within ``follow_interval_s`` the new version is loaded beside the old one,
        new requests use it, and requests already running finish on the version they started
        with. A version that fails to load is logged and the old one keeps serving.
        """
        failed: dict[str, str] = {}
        while True:
            await asyncio.sleep(self.follow_interval_s)
            for name in self.registry.names():
                if name in self.config.adapters or self._backend is None:
                    continue
                current = self.registry.current(name)  # one small file read
                if current is None or current.kind != "generative":
                    continue
                if self.adapters().get(name) == current.version or failed.get(name) == (
                    current.version
                ):
                    continue
                try:
                    await self._backend.load_adapter(name, current.path, current.version)
                    log.info("adapter %s: now serving %s", name, current.version)
                except Exception:
                    failed[name] = current.version
                    log.exception("adapter %s: could not load %s", name, current.version)

    async def _create(self) -> Backend:
        cfg = self.config
        if cfg.backend == "vllm":
            return await self._start_vllm()
        if cfg.backend == "remote":
            from bot.models.remote import RemoteBackend

            if not cfg.remote_url:
                raise ModelError("models.backend is 'remote' but models.remote_url is not set")
            key = cfg.remote_api_key.get_secret_value() if cfg.remote_api_key else None
            return RemoteBackend(
                cfg.remote_url,
                model=cfg.base_model,
                api_key=key,
                timeout_s=cfg.request_timeout_s,
                retries=cfg.remote_retries,
                admission=cfg.remote_admission,
            )
        from bot.models.loading import load_base

        try:
            model, tokenizer, name, cached = await _in_daemon_thread(
                load_base,
                cfg.base_model,
                device=cfg.device,
                dtype=cfg.dtype,
                cache_dir=self.cache_dir,
                implementation=cfg.implementation,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the base model {cfg.base_model!r}: {exc}") from None
        self.loaded_from_cache = cached
        threads = prefill_threads = None
        prepare_layers = None
        if str(next(model.parameters()).device) == "cpu":
            from bot.models.tuning import Neighbours, ThreadTuner, thread_candidates

            candidates = None if cfg.threads == "auto" else [int(cfg.threads)]
            # Both tuners follow what the kernel says other work takes of these CPUs.
            neighbours = Neighbours()
            threads = ThreadTuner(candidates, neighbours=neighbours)
            # Prefill and scoring passes are arithmetic-bound: start them on every core, look
            # at fewer soon (they are rarer than decode steps), and look again often enough
            # that a neighbour taking a core is noticed within a few questions — at once when
            # the decode steps noticed it first (the worker asks, ``look_now``). Not at the
            # second pass: the first passes of each shape build oneDNN's kernels, and judged
            # on those, two idle cores lost to one (0.6 against 0.4 ms a token).
            prefill_threads = ThreadTuner(
                candidates,
                start=max(candidates or thread_candidates()),
                explore_every=32,
                first_look=8,
                neighbours=neighbours,
            )
            from bot.models.cpu_linear import prepare

            def prepare_layers(cancelled: Callable[[], bool]) -> Callable[[], Any]:
                kernel = None
                if cfg.native_kernels and not cancelled():
                    from bot.models import kernels

                    # Compiled (when not yet) in a child at this thread's lower priority,
                    # stopped at once if the bot stops meanwhile. First: the layers use its
                    # linear kernel where it is faster than PyTorch's.
                    kernel = kernels.build(cancelled)
                install_layers = prepare(
                    backend.model,
                    int8=cfg.int8_decode,
                    max_rows=cfg.int8_max_rows,
                    fp16=cfg.fp16_weights,
                    cancelled=cancelled,
                    native=kernel,
                )

                def install() -> Any:
                    from bot.models.decoder import use_native

                    if kernel is not None:
                        use_native(kernel)
                    return install_layers()

                return install

        backend = LocalBackend(
            model,
            tokenizer,
            name,
            max_batch_size=cfg.max_batch_size,
            max_queue_wait_ms=cfg.max_queue_wait_ms,
            max_queue=cfg.max_queue,
            context_window=cfg.context_window,
            prefill_tokens=cfg.prefill_tokens,
            max_start_wait_s=cfg.max_start_wait_s,
            threads=threads,
            prefill_threads=prefill_threads,
            prefix_cache_tokens=cfg.prefix_cache_tokens,
            max_padding_mb=cfg.max_padding_mb,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
            # Faster CPU layers take seconds to prepare: built on a thread of their own from
            # the start and installed between two steps, so neither the start nor the first
            # reply waits, and a bot that is never idle still gets them.
            prepare_layers=prepare_layers,
        )
        return backend

    async def _start_vllm(self) -> RemoteBackend:
        """Start the vLLM server chinwag supervises, and the remote backend that talks to it."""
        from bot.models.loading import weights_for_server

        cfg, v = self.config, self.config.vllm
        try:
            weights, name = await _in_daemon_thread(
                weights_for_server, cfg.base_model, cache_dir=self.cache_dir
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot prepare the base model {cfg.base_model!r}: {exc}") from None
        if self.server is None:  # a retried start keeps the port
            self.server = VLLMServer(
                weights,
                python=v.python,
                served_name=name,
                host=v.host,
                port=v.port,
                dtype=None if cfg.dtype == "auto" else cfg.dtype,
                max_model_len=cfg.context_window,
                lora=(v.max_lora_rank, v.max_loras),
                args=v.args,
                env=v.env,
                log_file=self.settings.data_dir / "logs" / "vllm.log",
                restart_backoff_s=v.restart_backoff_s,
            )
        server = self.server
        await server.start(v.start_timeout_s)
        backend = RemoteBackend(
            server.url,
            model=name,
            timeout_s=cfg.request_timeout_s,
            retries=cfg.remote_retries,
            admission=cfg.remote_admission,
        )
        self._supervisor = asyncio.create_task(
            server.supervise(v.start_timeout_s, on_restart=backend.restore_adapters),
            name="vllm-supervisor",
        )
        return backend

    async def settled(self, within: float) -> bool:
        """Wait until the backend's faster layers are in (CPU: seconds of probing and
        packing beside serving, after the model loaded); ``False`` past ``within`` seconds.

        For measurements, as :meth:`bot.core.Bot.warmed` is: the first questions after a
        start run on the plain layers, and a benchmark that timed them would mistake the
        start for the bot's speed (the Python documentation's QA p95 7.52 s, 6.66 s without
        its first eight questions: docs/skills.md). Live traffic never waits for this.
        """
        ready = getattr(self._backend, "layers_ready", None)
        if ready is None:
            return True
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while not ready.is_set():
            if loop.time() >= until:
                return False
            await asyncio.sleep(0.05)
        return True

    async def interrupt(self) -> None:
        """Shutting down: fail every waiting and running generation with
        :class:`ShuttingDown` (within one decode step) and refuse new ones."""
        self._interrupted = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()  # a load still under way is abandoned
        backend = self._backend
        if isinstance(backend, LocalBackend):
            await asyncio.to_thread(backend.stop)
        elif backend is not None:
            backend.interrupt()

    async def stop(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._start_task
        await stop_task(self._follow)
        self._follow = None
        await self.classifiers.close()
        await stop_task(self._supervisor)
        self._supervisor = None
        if self._backend is not None:
            if isinstance(self._backend, LocalBackend):
                await asyncio.to_thread(self._backend.stop)
            else:
                await self._backend.stop()
        if self.server is not None:
            await self.server.stop()

    def _params(
        self, max_new_tokens: int | None, temperature: float, top_p: float, stop: Any
    ) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop or ()),
        )

    def deadline(self, within_s: float | None = None) -> float:
        """The ``time.monotonic()`` instant a request made now must finish by: the soonest of
        ``within_s``, the current skill's deadline (set by the core) and ``request_timeout_s``."""
        now = time.monotonic()
        options = [now + self.config.request_timeout_s]
        if within_s is not None:
            options.append(now + within_s)
        skill = DEADLINE.get()
        if skill is not None:
            options.append(skill)
        return min(options)

    async def generate(
        self,
        messages: ChatMessages,
        adapter: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: tuple[str, ...] | list[str] = (),
        within_s: float | None = None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Generation:
        """One reply. Raises :class:`RuntimeBusy` at once when it could not finish in time.

        ``on_text`` receives the text as it is generated (for platforms that stream). A reply
        that reaches its deadline comes back with what was ready (``finish_reason ==
        "deadline"``); cancelling the caller stops the generation within one decode step.
        """
        deadline = self.deadline(within_s)
        backend = await self._start_by(deadline)
        if self.server is not None and not self.server.serving:
            # The supervised vLLM died and is starting again: say so now rather than let the
            # request retry into its deadline.
            raise RuntimeBusy("the model server is restarting", retry_after_s=30.0)
        params = self._params(max_new_tokens, temperature, top_p, stop)
        # The backend ends the row at the deadline itself; this is the backstop.
        async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + 2.0):
            if on_text is None:
                return await backend.generate(messages, params, adapter, deadline=deadline)
            chunks: asyncio.Queue[str | None] = asyncio.Queue()
            task = asyncio.create_task(
                backend.generate(messages, params, adapter, stream=chunks, deadline=deadline)
            )
            try:
                while True:
                    getter = asyncio.ensure_future(chunks.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # refused or failed before any text
                        getter.cancel()
                        break
                    piece = getter.result()
                    if piece is None:
                        break
                    await on_text(piece)
                return await task
            finally:
                if not task.done():
                    task.cancel()

    async def score(
        self, requests: list[tuple[ChatMessages, str]], *, within_s: float | None = None
    ) -> list[Likelihood]:
        """How likely the base model finds each text as the reply to its prompt.

        Raises :class:`TimeoutError` past the deadline, :class:`RuntimeBusy` while the model
        is loading, and :class:`ModelError` on a backend that cannot score (a remote server):
        callers treat all three as "no scores" and go on without.
        """
        deadline = self.deadline(within_s)
        backend = await self._start_by(deadline)
        if not isinstance(backend, LocalBackend):
            raise ModelError("scoring texts needs the local model (not a model server)")
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await backend.score(requests, deadline=deadline)

    async def _start_by(self, deadline: float) -> Backend:
        """``start``, but a model still loading at the deadline is an honest "busy"."""
        if self._backend_running():
            return self._backend  # type: ignore[return-value]
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self.start()
        except TimeoutError:
            raise RuntimeBusy("the model is still loading", retry_after_s=10.0) from None

    async def stream(
        self,
        messages: ChatMessages,
        adapter: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: tuple[str, ...] | list[str] = (),
        within_s: float | None = None,
    ) -> AsyncIterator[str]:
        """Yield text as it is generated (batched with everyone else's requests).

        Leaving the loop early stops the generation. Use ``generate(on_text=...)`` to get
        the :class:`Generation` (provenance, finish reason) as well.
        """
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def put(piece: str) -> None:
            pieces.put_nowait(piece)

        task = asyncio.create_task(
            self.generate(
                messages,
                adapter,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stop,
                within_s=within_s,
                on_text=put,
            )
        )
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            await task  # surface errors
        finally:
            if not task.done():
                task.cancel()

    async def classify(
        self, texts: list[str], classifier: str = "sentiment"
    ) -> list[Classification]:
        """Label ``texts`` with the named classifier (batched with other chats' requests).

        Raises :class:`~bot.models.classifier.NoClassifier` when none is in service yet.
        """
        return await self.classifiers.classify(classifier, texts)

    def queue_depth(self) -> float:
        """Generation requests waiting or running — until the work really ends, not until its
        caller stops waiting (0 before the model is loaded)."""
        return float(getattr(self._backend, "_pending", 0) or 0)

    def load(self) -> dict[str, float]:
        """The local worker's queue and measured speed (empty for a remote backend)."""
        backend = self._backend
        return backend.load() if isinstance(backend, LocalBackend) else {}

    def estimate_start(self, max_new_tokens: int | None = None) -> tuple[float, float]:
        """Seconds until a new request would start and finish (0, 0 when unknown)."""
        backend = self._backend
        if not isinstance(backend, LocalBackend):
            return 0.0, 0.0
        return backend.estimate(self._params(max_new_tokens, 0.0, 1.0, ()))

    @property
    def loading(self) -> bool:
        """The base model is being loaded right now."""
        return self._start_task is not None and not self._start_task.done()

    @property
    def ready(self) -> bool:
        """The base model is loaded (or the server connected) and serving; with
        ``backend = "vllm"``, the server chinwag supervises is up (not restarting)."""
        if self.server is not None and not self.server.serving:
            return False
        return self._backend is not None and self._backend.running

    def adapter_for(self, name: str) -> str | None:
        """``name`` when that adapter is loaded, else ``None`` (the base model serves).

        Before the runtime has started nothing is loaded yet: use :meth:`resolve_adapter`.
        """
        return name if name in self.adapters() else None

    async def resolve_adapter(self, name: str, *, within_s: float | None = None) -> str | None:
        """Like :meth:`adapter_for`, after starting the runtime (which loads the adapters), so
        the first reply after a start uses the adapter too.

        Waits for a loading model only until the request's deadline (``within_s``, the
        skill's, the runtime's), then raises :class:`RuntimeBusy`: a message that arrives
        while a GGUF converts (~25 s on a first start) gets an honest "still loading" in
        time rather than an answer whenever the load is done."""
        await self._start_by(self.deadline(within_s))
        return self.adapter_for(name)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the base model (an estimate until the model is loaded)."""
        tokenizer = getattr(self._backend, "tokenizer", None)
        if tokenizer is None:
            return max(1, len(text) // 4)
        return len(tokenizer.encode(text, add_special_tokens=False))

    async def load_adapter(self, name: str, path: Path | str, version: str) -> None:
        """Load (or hot-swap to) ``version`` of adapter ``name`` from a peft adapter folder."""
        backend = await self.start()
        await backend.load_adapter(name, Path(path), version)

    async def unload_adapter(self, name: str) -> None:
        backend = await self.start()
        await backend.unload_adapter(name)

    def adapters(self) -> dict[str, str]:
        return self._backend.adapters() if self._backend is not None else {}


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread`` for work that must not hold up the process's exit: a model still
    loading (or converting a GGUF, ~25 s) when SIGTERM arrives is abandoned, where the default
    executor's threads are joined at interpreter exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            _resolve(future, loop, fn(*args, **kwargs))
        except BaseException as exc:
            _resolve(future, loop, exc=exc)

    abandonable_thread(run, name="chinwag-model-load")
    return await future
