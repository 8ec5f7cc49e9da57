"""A small OpenAI-compatible chat server for tests (run as its own process).

Answers ``echo(<model>): <last user message>``; serves the base model and LoRA adapters loaded
through vLLM's runtime endpoints; ``POST /control`` sets failure modes: ``fail_next`` requests
answered with ``fail_status``, or ``die_mid_stream`` (the process exits after two streamed
pieces, as a crashed server would).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aiohttp import web

state = {"fail_next": 0, "fail_status": 503, "die_mid_stream": False, "requests": 0, "adapters": {}}


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
    prompt = body["messages"][-1]["content"]
    text = f"echo({model}): {prompt}"
    words = text.split(" ")
    if not body.get("stream"):
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
