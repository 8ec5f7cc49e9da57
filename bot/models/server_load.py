"""Admission control for a model server chinwag does not run in-process (vLLM), from its own
load figures.

The local backend refuses a reply at once when its measured step time says it cannot finish
in time. Against a remote server chinwag cannot see the batch, but vLLM publishes what is
needed on ``/metrics`` (Prometheus text): requests running and waiting, requests finished and
tokens generated (counters), reply lengths and inference time. :class:`LoadWatch` reads it
about once a second and estimates a new request's start (the requests queued ahead of it clear
at the rate requests finished while the server was busy) and its duration (a batching server
shares its token rate among the requests it runs: about ``rate / (running + 1)`` tokens a
second for the reply length seen lately). When start plus duration, with the local backend's
margin, lands past the request's deadline the skill hears :class:`RuntimeBusy` at once —
instead of the user waiting out the deadline for the same answer. The figures are the
server's, so several chinwag workers sharing one server see each other's load.

It says nothing (admits) while its figures are stale, missing or too young to give a rate. A
server without vLLM's metrics (TGI, llama.cpp's server, a proxy) is not watched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from bot.models.local import SAFETY  # the local backend's margin: both admit alike

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    waiting: float
    running: float
    finished: float  # requests finished since the server started (a counter)
    inference_sum: float  # seconds of inference, over ``inference_count`` requests
    inference_count: float
    generated: float = 0.0  # tokens generated since the server started (a counter)
    reply_tokens_sum: float = 0.0  # tokens per finished request, over ``reply_count``
    reply_count: float = 0.0


def parse(text: str, at: float) -> Sample | None:
    """vLLM's figures from a ``/metrics`` page, summed over its label sets; None when the
    page is not vLLM's."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "vllm:num_requests_waiting": "waiting",
        "vllm:num_requests_running": "running",
        "vllm:request_success_total": "finished",
        "vllm:request_inference_time_seconds_sum": "inference_sum",
        "vllm:request_inference_time_seconds_count": "inference_count",
        "vllm:generation_tokens_total": "generated",
        "vllm:request_generation_tokens_sum": "reply_tokens_sum",
        "vllm:request_generation_tokens_count": "reply_count",
    }
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = wanted.get(sample.name)
                if key is not None:
                    found[key] = found.get(key, 0.0) + float(sample.value)
    except ValueError:
        return None
    if "waiting" not in found or "finished" not in found:
        return None
    return Sample(
        at=at,
        waiting=found["waiting"],
        running=found.get("running", 0.0),
        finished=found["finished"],
        inference_sum=found.get("inference_sum", 0.0),
        inference_count=found.get("inference_count", 0.0),
        generated=found.get("generated", 0.0),
        reply_tokens_sum=found.get("reply_tokens_sum", 0.0),
        reply_count=found.get("reply_count", 0.0),
    )


class LoadWatch:
    """The server's load over the last ``window_s`` seconds, polled every ``interval_s``."""

    def __init__(
        self,
        metrics_url: str,
        session: Callable[[], aiohttp.ClientSession | None],
        *,
        interval_s: float = 1.0,
        window_s: float = 15.0,
        min_window_s: float = 3.0,
    ) -> None:
        self.metrics_url = metrics_url
        self._session = session
        self.interval_s = interval_s
        self.window_s = window_s
        self.min_window_s = min_window_s
        self.samples: deque[Sample] = deque()
        #: False once the server showed it has no vLLM metrics: nothing more is asked.
        self.available = True
        self._sent_since: list[float] = []  # our requests sent after the last sample

    async def run(self) -> None:
        while self.available:
            await self.poll()
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> None:
        session = self._session()
        if session is None:
            return
        try:
            timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.interval_s))
            async with session.get(self.metrics_url, timeout=timeout) as response:
                if response.status == 404:
                    self._give_up("the server has no /metrics")
                    return
                if response.status != 200:
                    return
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return  # down or slow: the figures go stale and say nothing
        sample = parse(text, time.monotonic())
        if sample is None:
            self._give_up("its /metrics are not vLLM's")
            return
        self.samples.append(sample)
        self._sent_since = [t for t in self._sent_since if t > sample.at]
        while self.samples and sample.at - self.samples[0].at > self.window_s:
            self.samples.popleft()

    def _give_up(self, why: str) -> None:
        self.available = False
        log.info("remote admission control off: %s", why)

    def sent(self) -> None:
        """A request of ours went to the server (it shows in the figures from the next poll)."""
        self._sent_since.append(time.monotonic())

    def estimate(
        self, now: float | None = None, max_tokens: int | None = None
    ) -> tuple[float, float] | None:
        """``(seconds until a new request would start, seconds it would then take)``, or
        None when the figures cannot say.

        Start: requests ahead of a new one — those waiting at the server plus ours sent since
        the last look, or, once the server has been seen full (requests waiting beside
        ``running`` ones: that many slots), everything beyond its slots — clear at the rate
        requests finished while the server was busy. Duration: a batching server shares its
        token rate among the requests running, so a new one gets about ``rate / (running +
        1)`` tokens a second for the reply length seen lately (at most ``max_tokens``); before
        any token rate is known, the recent mean inference time.
        """
        if not self.samples:
            return None
        now = time.monotonic() if now is None else now
        last = self.samples[-1]
        if now - last.at > 5 * self.interval_s + 2:
            return None  # stale: the server stopped answering /metrics
        first = self.samples[0]
        full = [s.running for s in self.samples if s.waiting > 0]
        ours = len(self._sent_since)
        slots = max(full) if full else None
        if slots is not None:
            ahead = max(0.0, last.running + last.waiting + ours - slots)
        else:
            ahead = last.waiting + ours if last.waiting > 0 else 0.0
        busy = done = made = 0.0
        for before, after in zip(self.samples, list(self.samples)[1:], strict=False):
            if before.running + before.waiting > 0 and after.finished >= before.finished:
                busy += after.at - before.at
                done += after.finished - before.finished
                made += max(0.0, after.generated - before.generated)
        known = busy >= self.min_window_s
        service = self._service_s(first, last, made / busy if known else 0.0, max_tokens, slots)
        if ahead <= 0:
            return 0.0, service or 0.0
        if not known or done <= 0 or service is None:
            return None  # too little seen to know the rate (or nothing finished yet)
        return ahead / (done / busy), service

    def _service_s(
        self,
        first: Sample,
        last: Sample,
        token_rate: float,
        max_tokens: int | None,
        slots: float | None,
    ) -> float | None:
        count = last.reply_count - first.reply_count
        if count > 0:
            tokens = (last.reply_tokens_sum - first.reply_tokens_sum) / count
        elif last.reply_count > 0:
            tokens = last.reply_tokens_sum / last.reply_count
        else:
            tokens = 0.0
        if max_tokens:
            tokens = min(tokens, float(max_tokens))
        if token_rate > 0 and tokens > 0:
            sharing = last.running + len(self._sent_since) + 1
            if slots is not None:
                sharing = min(sharing, slots)
            return tokens * sharing / token_rate
        return self._inference_s(first, last)

    @staticmethod
    def _inference_s(first: Sample, last: Sample) -> float | None:
        count = last.inference_count - first.inference_count
        if count > 0:
            return (last.inference_sum - first.inference_sum) / count
        if last.inference_count > 0:
            return last.inference_sum / last.inference_count
        return None

    def refuse(self, deadline: float | None, max_tokens: int | None = None) -> float | None:
        """Seconds to suggest waiting before trying again, when a request due by ``deadline``
        (``time.monotonic()``) cannot finish by then; None to send it."""
        if deadline is None:
            return None
        now = time.monotonic()
        est = self.estimate(now, max_tokens)
        if est is None:
            return None
        wait, service = est
        if now + SAFETY * (wait + service) <= deadline:
            return None
        return max(1.0, wait + service - (deadline - now))
