"""The remote backend: any OpenAI-compatible chat completions server.

vLLM (``--enable-lora``) is the one to name for users who outgrow one machine; TGI and
llama.cpp's server speak the same protocol. The adapter is the request's ``model`` field.
Adapters are loaded at runtime through vLLM's ``/v1/load_lora_adapter`` (the server needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under a versioned name, so a hot-swap never changes
the weights behind a request already in flight — the same contract as the local backend.

Transient failures (connection refused or reset, timeouts, 429, 5xx) are retried with
exponential backoff and jitter (tenacity); a stream that breaks after its first token is not
retried (the user has already seen part of the answer) and fails with a clear error. Replies
are always streamed from the server, so one that reaches its deadline keeps the text that
arrived. Against vLLM, its ``/metrics`` drive admission control (bot/models/server_load.py):
what it could not finish in time is refused at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from bot.models.server_load import LoadWatch
from bot.models.types import (
    ChatMessages,
    Generation,
    GenerationParams,
    ModelError,
    RuntimeBusy,
    ShuttingDown,
    UnknownAdapter,
)
from bot.process import stop_task

log = logging.getLogger(__name__)


#: The server's finish reasons, as :class:`Generation` names them ("deadline": ours).
_FINISH: dict[str, Literal["stop", "length", "deadline"]] = {
    "length": "length",
    "deadline": "deadline",
}


class _Transient(Exception):
    """Worth retrying."""


class RemoteBackend:
    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        admission: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model_name = model
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self.retries = retries
        self.backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None
        self._adapters: dict[str, tuple[str, str]] = {}
        self._paths: dict[str, Path] = {}  # served name → adapter folder, to reload it
        self._inflight: set[asyncio.Task[Any]] = set()
        self._interrupted = False
        #: The server's own load figures (vLLM's /metrics), for refusing at once what it
        #: cannot finish in time (bot/models/server_load.py); None when switched off.
        self.load: LoadWatch | None = None
        if admission:
            metrics = self.url[: -len("/v1")] + "/metrics"
            self.load = LoadWatch(metrics, lambda: self._session)
        self._watch: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)
        if self.load is not None and self._watch is None:
            self._watch = asyncio.create_task(self.load.run(), name="model-server-load")

    async def stop(self) -> None:
        await stop_task(self._watch)
        self._watch = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def adapters(self) -> dict[str, str]:
        return {name: version for name, (_, version) in self._adapters.items()}

    def _served_name(self, adapter: str | None) -> tuple[str, str | None]:
        if adapter is None:
            return self.model_name, None
        current = self._adapters.get(adapter)
        if current is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapter(f"no adapter named {adapter!r} is loaded (loaded: {known})")
        return current

    def _retrying(self, deadline: float | None = None) -> AsyncRetrying:
        stop: Any = stop_after_attempt(self.retries + 1)
        if deadline is not None:
            stop = stop | stop_after_delay(max(0.0, deadline - time.monotonic()))
        return AsyncRetrying(
            stop=stop,
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=10 * self.backoff_s),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )

    async def _post(
        self, path: str, payload: dict[str, Any], deadline: float | None = None
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        kwargs: dict[str, Any] = {}
        if deadline is not None:
            left = max(0.05, deadline - time.monotonic())
            kwargs["timeout"] = aiohttp.ClientTimeout(total=left, sock_connect=min(10.0, left))
        try:
            response = await self._session.post(f"{self.url}{path}", json=payload, **kwargs)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        if response.status == 429 or response.status >= 500:
            body = await response.text()
            response.release()
            raise _Transient(f"HTTP {response.status}: {body[:200]}")
        if response.status >= 400:
            body = await response.text()
            response.release()
            if response.status in (400, 404) and "does not exist" in body.lower():
                raise UnknownAdapter(
                    f"the server does not serve {payload.get('model')!r}: {body[:200]}"
                )
            if response.status == 404 and "model" in body.lower():
                raise UnknownAdapter(
                    f"the server does not serve {payload.get('model')!r}: {body[:200]}"
                )
            raise ModelError(
                f"the model server refused the request (HTTP {response.status}): {body[:300]}"
            )
        return response

    def interrupt(self) -> None:
        """Shutting down: cancel the requests in flight (they fail with ShuttingDown)."""
        self._interrupted = True
        for task in list(self._inflight):
            task.cancel()

    async def generate(
        self,
        messages: ChatMessages,
        params: GenerationParams,
        adapter: str | None = None,
        stream: asyncio.Queue[str | None] | None = None,
        *,
        deadline: float | None = None,
    ) -> Generation:
        """One completion; ``deadline`` (``time.monotonic()``) bounds it, retries included."""
        if self._interrupted:
            raise ShuttingDown("the bot is shutting down")
        if self.load is not None and self.load.available:
            retry = self.load.refuse(deadline, params.max_new_tokens)
            if retry is not None:
                raise RuntimeBusy(
                    "the model server is too busy to finish this reply in time",
                    retry_after_s=retry,
                )
            self.load.sent()
        inner = asyncio.ensure_future(self._generate(messages, params, adapter, stream, deadline))
        self._inflight.add(inner)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller gave up: so do we
                inner.cancel()
                raise
            raise ShuttingDown("the bot is shutting down") from None
        finally:
            self._inflight.discard(inner)
            if stream is not None and not inner.done():
                stream.put_nowait(None)

    async def _generate(
        self,
        messages: ChatMessages,
        params: GenerationParams,
        adapter: str | None,
        stream: asyncio.Queue[str | None] | None,
        deadline: float | None,
    ) -> Generation:
        await self.start()
        try:
            return await self._generate_once(messages, params, adapter, stream, deadline)
        except UnknownAdapter:
            # vLLM restarted (and forgot its adapters) or another worker sharing the server
            # unloaded this version: load it again by path, once.
            if adapter is None or not await self._reload(adapter):
                raise
            return await self._generate_once(messages, params, adapter, stream, deadline)

    async def _reload(self, adapter: str) -> bool:
        current = self._adapters.get(adapter)
        path = self._paths.get(current[0]) if current else None
        if current is None or path is None:
            return False
        log.warning("the model server lost adapter %s; loading it again", current[0])
        await self._register(current[0], path)
        return True

    async def _generate_once(
        self,
        messages: ChatMessages,
        params: GenerationParams,
        adapter: str | None,
        stream: asyncio.Queue[str | None] | None,
        deadline: float | None,
    ) -> Generation:
        served, version = self._served_name(adapter)
        payload: dict[str, Any] = {
            "model": served,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        started = time.perf_counter()
        try:
            if deadline is not None and deadline <= time.monotonic():
                raise RuntimeBusy("no time left for this reply", retry_after_s=5.0)
            # Always streamed from the server, even when the caller wants the whole reply:
            # a reply the deadline cuts short then ends with the text it has (as the local
            # backend's rows do) instead of being lost whole.
            out: asyncio.Queue[str | None] = stream if stream is not None else asyncio.Queue()
            text, finish, usage = await self._stream(payload, out, deadline)
        except _Transient as exc:
            if deadline is not None and time.monotonic() >= deadline - 0.05:
                raise RuntimeBusy(
                    f"the model server did not answer in time: {exc}", retry_after_s=5.0
                ) from None
            raise ModelError(
                f"the model server at {self.url} is unavailable after "
                f"{self.retries + 1} attempts: {exc}"
            ) from None
        finally:
            if stream is not None:
                stream.put_nowait(None)
        return Generation(
            text=text.strip(),
            model=self.model_name,
            adapter=adapter,
            adapter_version=version,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=_FINISH.get(finish, "stop"),
            timings={"generate_s": time.perf_counter() - started},
            extra={"served_model": served},
        )

    async def _stream(
        self, payload: dict[str, Any], out: asyncio.Queue[str | None], deadline: float | None
    ) -> tuple[str, str, dict[str, Any]]:
        pieces: list[str] = []
        finish = "stop"
        usage: dict[str, Any] = {}
        payload = {**payload, "stream_options": {"include_usage": True}}
        async for attempt in self._retrying(deadline):
            with attempt:
                response = await self._post("/chat/completions", payload, deadline)
                try:
                    if response.content_type == "application/json":
                        # A server that ignores "stream" answers with the whole reply.
                        data = await response.json()
                        choice = data["choices"][0]
                        text = choice["message"]["content"] or ""
                        if text:
                            out.put_nowait(text)
                        usage = data.get("usage") or {}
                        return text, choice.get("finish_reason") or "stop", usage
                    async for raw in response.content:
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            usage.setdefault("completion_tokens", len(pieces))
                            return "".join(pieces), finish, usage
                        event = json.loads(data)
                        usage = event.get("usage") or usage
                        choice = (event.get("choices") or [{}])[0]
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            pieces.append(delta)
                            out.put_nowait(delta)
                        finish = choice.get("finish_reason") or finish
                except TimeoutError as exc:
                    # The reply's deadline, mid-stream: what arrived is the reply.
                    if pieces:
                        usage.setdefault("completion_tokens", len(pieces))
                        return "".join(pieces), "deadline", usage
                    raise _Transient(f"no token before the deadline: {exc}") from exc
                except (
                    aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError,
                    ConnectionResetError,
                ) as exc:
                    if pieces:
                        raise ModelError(
                            f"the model server dropped the stream after {len(pieces)} pieces: {exc}"
                        ) from None
                    raise _Transient(f"stream broken before the first token: {exc}") from exc
                finally:
                    response.release()
                if pieces:
                    raise ModelError(
                        "the model server ended the stream without [DONE] after "
                        f"{len(pieces)} pieces"
                    )
                raise _Transient("the stream ended before any token")
        raise AssertionError("unreachable")

    async def _register(self, served: str, path: Path) -> None:
        """Load ``path`` on the server as ``served``; "already loaded" is success, since the
        versioned name always means the same weights (a restart of ours, or a second worker
        sharing the server, loaded it first)."""
        async for attempt in self._retrying():
            with attempt:
                try:
                    response = await self._post(
                        "/load_lora_adapter", {"lora_name": served, "lora_path": str(path)}
                    )
                except ModelError as exc:
                    if "already been loaded" in str(exc) or "already loaded" in str(exc):
                        log.info("the model server already has adapter %s", served)
                        self._paths[served] = path
                        return
                    raise
                response.release()
        self._paths[served] = path

    async def restore_adapters(self) -> None:
        """Load every adapter in service into a server that restarted and forgot them (a
        request would reload its own adapter anyway; this spares the first one the wait)."""
        for served, _ in list(self._adapters.values()):
            path = self._paths.get(served)
            if path is not None:
                await self._register(served, path)
                log.info("the model server has adapter %s again", served)

    async def load_adapter(self, name: str, path: Path, version: str) -> None:
        await self.start()
        served = f"{name}-v{version}"
        await self._register(served, path)
        old = self._adapters.get(name)
        self._adapters[name] = (served, version)
        if old is not None and old[0] != served:
            # Requests already sent carry the old name; the server finishes them first.
            try:
                response = await self._post("/unload_lora_adapter", {"lora_name": old[0]})
                response.release()
            except (ModelError, _Transient) as exc:
                log.warning("could not unload %s from the model server: %s", old[0], exc)

    async def unload_adapter(self, name: str) -> None:
        current = self._adapters.pop(name, None)
        if current is None:
            raise UnknownAdapter(f"no adapter named {name!r} is loaded")
        response = await self._post("/unload_lora_adapter", {"lora_name": current[0]})
        response.release()
