"""The model runtime the bot owns: every model-backed skill goes through it.

Skills call ``await runtime.generate(messages, adapter="qa")`` and ``await runtime.embed(texts)``;
no skill loads a model of its own. The base model loads on first use (so a bot without
model-backed skills never pays for it) in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from bot.config import Settings
from bot.models.classifier import Classification, ClassifierPool
from bot.models.embedding import Embedder
from bot.models.local import LocalBackend
from bot.models.registry import AdapterRegistry
from bot.models.remote import RemoteBackend
from bot.models.types import ChatMessages, Generation, GenerationParams, ModelError

log = logging.getLogger(__name__)

Backend = LocalBackend | RemoteBackend


class ModelRuntime:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self.settings = settings
        self.config = settings.models
        self._backend = backend
        self._starting = asyncio.Lock()
        self._embedder: Embedder | None = None
        self.loaded_from_cache: bool | None = None
        #: Trained adapter versions and which one is in service (data_dir/adapters).
        self.registry = AdapterRegistry(
            self.config.registry_dir or AdapterRegistry.for_data_dir(settings.data_dir).root
        )
        #: Seconds between looks at the registry for promotions and rollbacks.
        self.follow_interval_s = 1.0
        self._follow: asyncio.Task[None] | None = None
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

        Idempotent: the first call does the work, later ones return at once.
        """
        if self._backend is not None and self._backend.running:
            return self._backend
        async with self._starting:
            cfg = self.config
            if self._backend is None:
                self._backend = await self._create()
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
            )
        from bot.models.loading import load_base

        try:
            model, tokenizer, name, cached = await asyncio.to_thread(
                load_base,
                cfg.base_model,
                device=cfg.device,
                dtype=cfg.dtype,
                cache_dir=self.cache_dir,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the base model {cfg.base_model!r}: {exc}") from None
        self.loaded_from_cache = cached
        return LocalBackend(
            model,
            tokenizer,
            name,
            max_batch_size=cfg.max_batch_size,
            max_queue_wait_ms=cfg.max_queue_wait_ms,
            max_queue=cfg.max_queue,
            context_window=cfg.context_window,
        )

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        await self.classifiers.close()
        if self._backend is None:
            return
        if isinstance(self._backend, LocalBackend):
            await asyncio.to_thread(self._backend.stop)
        else:
            await self._backend.stop()

    def _params(
        self, max_new_tokens: int | None, temperature: float, top_p: float, stop: Any
    ) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop or ()),
        )

    async def generate(
        self,
        messages: ChatMessages,
        adapter: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: tuple[str, ...] | list[str] = (),
    ) -> Generation:
        backend = await self.start()
        params = self._params(max_new_tokens, temperature, top_p, stop)
        async with asyncio.timeout(self.config.request_timeout_s):
            return await backend.generate(messages, params, adapter)

    async def stream(
        self,
        messages: ChatMessages,
        adapter: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: tuple[str, ...] | list[str] = (),
    ) -> AsyncIterator[str]:
        """Yield text as it is generated (batched with everyone else's requests)."""
        backend = await self.start()
        params = self._params(max_new_tokens, temperature, top_p, stop)
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.create_task(backend.generate(messages, params, adapter, stream=chunks))
        try:
            while True:
                piece = await chunks.get()
                if piece is None:
                    break
                yield piece
            await task  # surface errors
        finally:
            if not task.done():
                task.cancel()

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            self._embedder = Embedder(
                self.settings.knowledge.model, device=self.settings.knowledge.device
            )
        return await asyncio.to_thread(self._embedder.encode, texts)

    async def classify(
        self, texts: list[str], classifier: str = "sentiment"
    ) -> list[Classification]:
        """Label ``texts`` with the named classifier (batched with other chats' requests).

        Raises :class:`~bot.models.classifier.NoClassifier` when none is in service yet.
        """
        return await self.classifiers.classify(classifier, texts)

    def describe(self, text: str, adapter: str | None) -> Generation:
        """Provenance for streamed text (``stream`` yields text only)."""
        name = getattr(self._backend, "model_name", None) or self.config.base_model
        return Generation(
            text=text.strip(),
            model=name,
            adapter=adapter,
            adapter_version=self.adapters().get(adapter) if adapter else None,
            prompt_tokens=0,
            completion_tokens=self.count_tokens(text) if text else 0,
            finish_reason="stop",
        )

    def queue_depth(self) -> float:
        """Generation requests waiting or running (0 before the model is loaded)."""
        return float(getattr(self._backend, "_pending", 0) or 0)

    def adapter_for(self, name: str) -> str | None:
        """``name`` when that adapter is loaded, else ``None`` (the base model serves)."""
        return name if name in self.adapters() else None

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
