"""A small OpenAI-compatible chat server for tests (run as its own process).

Answers ``echo(<model>): <last user message>``; serves the base model and LoRA adapters loaded
through vLLM's runtime endpoints; ``POST /control`` sets failure modes: ``fail_next`` requests
answered with ``fail_status``, or ``die_mid_stream`` (the process exits after two streamed
pieces, as a crashed server would), ``piece_delay_s`` between streamed pieces, or
``ignore_stream`` (whole JSON replies, as some proxies send). With ``slots`` set it serves
that many requests at once, each taking ``delay_s``, the rest waiting their turn — a
saturated server — and publishes vLLM's load figures on ``GET /metrics`` (waiting, running,
finished, inference time).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from aiohttp import web

state = {
    "fail_next": 0,
    "fail_status": 503,
    "die_mid_stream": False,
    "requests": 0,
    "adapters": {},
    "slots": None,
    "delay_s": 0.0,
    "piece_delay_s": 0.0,
    "ignore_stream": False,
}
load = {"waiting": 0, "running": 0, "finished": 0, "inference_sum": 0.0}
_slots: list[asyncio.Semaphore] = []


async def _serve_in_turn() -> None:
    """Wait for a slot, then take ``delay_s`` in it (only when ``slots`` is set)."""
    if not state["slots"]:
        return
    if not _slots:
        _slots.append(asyncio.Semaphore(int(state["slots"])))
    load["waiting"] += 1
    try:
        await _slots[0].acquire()
    finally:
        load["waiting"] -= 1
    load["running"] += 1
    started = time.monotonic()
    try:
        await asyncio.sleep(float(state["delay_s"]))
    finally:
        load["running"] -= 1
        load["finished"] += 1
        load["inference_sum"] += time.monotonic() - started
        _slots[0].release()


async def metrics(request: web.Request) -> web.Response:
    body = (
        f"# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="smollm2"}} {load["waiting"]}\n'
        f"# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="smollm2"}} {load["running"]}\n'
        f"# TYPE vllm:request_success counter\n"
        f'vllm:request_success_total{{finished_reason="stop"}} {load["finished"]}\n'
        f"# TYPE vllm:request_inference_time_seconds histogram\n"
        f'vllm:request_inference_time_seconds_bucket{{le="+Inf"}} {load["finished"]}\n'
        f"vllm:request_inference_time_seconds_count {load['finished']}\n"
        f"vllm:request_inference_time_seconds_sum {load['inference_sum']}\n"
    )
    return web.Response(text=body, content_type="text/plain")


async def control(request: web.Request) -> web.Response:
    if request.can_read_body:
        state.update(await request.json())
    return web.json_response(state)


async def chat(request: web.Request) -> web.StreamResponse:
    state["requests"] += 1
    if state["fail_next"] > 0:
        state["fail_next"] -= 1
        return web.json_response(
            {"error": {"message": "injected failure"}}, status=state["fail_status"]
        )
    body = await request.json()
    model = body["model"]
    if model != "smollm2" and model not in state["adapters"]:
        return web.json_response(
            {"error": {"message": f"The model `{model}` does not exist."}}, status=404
        )
    await _serve_in_turn()
    prompt = body["messages"][-1]["content"]
    text = f"echo({model}): {prompt}"
    words = text.split(" ")
    if not body.get("stream") or state["ignore_stream"]:
        return web.json_response(
            {
                "choices": [
                    {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words)},
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        event = {"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await asyncio.sleep(float(state["piece_delay_s"]))  # a slow, busy server
        if state["die_mid_stream"] and i == 1:
            os._exit(1)
    await response.write(b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n')
    await response.write(b"data: [DONE]\n\n")
    return response


async def load_lora(request: web.Request) -> web.Response:
    body = await request.json()
    state["adapters"][body["lora_name"]] = body["lora_path"]
    return web.Response(text="ok")


async def unload_lora(request: web.Request) -> web.Response:
    body = await request.json()
    state["adapters"].pop(body["lora_name"], None)
    return web.Response(text="ok")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/load_lora_adapter", load_lora)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora)
    app.router.add_post("/control", control)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # Only now is the socket listening: a "ready" printed from on_startup would race the bind.
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
