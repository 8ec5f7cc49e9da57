"""The HTTP API: web chat widgets, load tests and other services talk to the bot over HTTP.

    POST /v1/messages          {"chat_id", "user_id", "text", "user_name"?, "message_id"?,
                                "chat_kind"?}  →  {"replies": [...]}
    POST /v1/messages/stream   same body → Server-Sent Events: ``token`` events with generated
                               text as it is produced, then one ``reply`` event per reply, then
                               ``done``
    POST /v1/feedback          {"reply_id", "user_id", "rating": 1 | -1, "comment"?}
    GET  /healthz              liveness and what is loaded (no auth: for load balancers)
    GET  /readyz               readiness (no auth): 200 when the bot is started, the model
                               loaded and the model queue not saturated, else 503 with why
    GET  /metrics              Prometheus exposition (messages, latency per skill, errors,
                               in-flight messages, model queue depth)

Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` with a token from
``[http] tokens``; anything else is a 401. Bodies are validated (pydantic) and a bad one is a 400
naming the field, never a crash.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from bot.config import ConfigError
from bot.core import Bot
from bot.messages import Message, Reply
from bot.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)
PLATFORM = "http"
BOT_KEY: web.AppKey[Bot] = web.AppKey("bot", Bot)


_Body = TypeVar("_Body", bound=BaseModel)


class MessageIn(BaseModel):
    model_config = {"extra": "forbid"}

    chat_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    text: str
    user_name: str = Field("", max_length=256)
    message_id: str | None = Field(None, max_length=128)
    chat_kind: Literal["private", "group"] = "private"


class FeedbackIn(BaseModel):
    model_config = {"extra": "forbid"}

    reply_id: int = Field(ge=1, le=2**63 - 1)  # the store's ids are signed 64-bit
    user_id: str = Field(min_length=1, max_length=128)
    rating: Literal[-1, 1]
    comment: str | None = Field(None, max_length=4000)


def reply_json(reply: Reply) -> dict[str, Any]:
    return {
        "id": reply.id,
        "text": reply.text,
        "skill": reply.skill,
        "kind": reply.kind,
        "rateable": reply.rateable,
        "sources": [
            {"title": s.title, "location": s.location, "score": s.score} for s in reply.sources
        ],
        "model": reply.model,
        "adapter": reply.adapter,
        "adapter_version": reply.adapter_version,
        "latency_ms": round(reply.latency_ms or 0.0, 2),
        # The model was stopped before it finished (its deadline, or the user's newer
        # message): the text is the whole sentences it had written by then.
        "cut_short": bool({"deadline", "superseded"} & set(reply.metadata.get("cleaned") or ())),
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request, model: type[_Body]) -> _Body | web.Response:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the body must be JSON")
    except RecursionError:
        return _error(400, "the body is nested too deeply")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, f"{where}: {first['msg']}")


def _message(body: MessageIn) -> Message:
    return Message(
        PLATFORM,
        body.chat_id,
        body.user_id,
        body.text,
        message_id=body.message_id,
        user_name=body.user_name,
        chat_kind=body.chat_kind,
    )


def make_app(bot: Bot, tokens: list[str]) -> web.Application:
    if not tokens:
        raise ConfigError("http.tokens is empty: the HTTP API needs at least one bearer token")
    secrets = [t.encode() for t in tokens]

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:].encode() if header.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(given, s) for s in secrets):
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    app = web.Application(middlewares=[auth], client_max_size=1024 * 1024)
    app[BOT_KEY] = bot
    app.router.add_post("/v1/messages", post_message)
    app.router.add_post("/v1/messages/stream", stream_message)
    app.router.add_post("/v1/feedback", post_feedback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def post_message(request: web.Request) -> web.Response:
    body = await _body(request, MessageIn)
    if isinstance(body, web.Response):
        return body
    replies = await request.app[BOT_KEY].handle(_message(body))
    return web.json_response({"replies": [reply_json(r) for r in replies]})


async def stream_message(request: web.Request) -> web.StreamResponse:
    body = await _body(request, MessageIn)
    if isinstance(body, web.Response):
        return body
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def event(name: str, data: Any) -> None:
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    async def on_token(piece: str) -> None:
        await event("token", {"text": piece})

    replies = await request.app[BOT_KEY].handle(_message(body), on_token=on_token)
    for r in replies:
        await event("reply", reply_json(r))
    await event("done", {})
    await response.write_eof()
    return response


async def post_feedback(request: web.Request) -> web.Response:
    body = await _body(request, FeedbackIn)
    if isinstance(body, web.Response):
        return body
    bot = request.app[BOT_KEY]
    feedback_id = await bot.record_feedback(
        PLATFORM, body.user_id, body.rating, reply_id=body.reply_id, comment=body.comment
    )
    if feedback_id is None:
        return _error(404, f"no reply {body.reply_id} from this API")
    return web.json_response({"id": feedback_id}, status=201)


async def healthz(request: web.Request) -> web.Response:
    bot = request.app[BOT_KEY]
    return web.json_response({"status": "ok", "skills": [e.name for e in bot.skills if e.enabled]})


async def readyz(request: web.Request) -> web.Response:
    """For load balancers: send traffic here only while this worker can answer it."""
    bot = request.app[BOT_KEY]
    state = bot.readiness()
    return web.json_response(state, status=200 if state["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[BOT_KEY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class HttpServer:
    """Runs the API inside the bot's event loop (``chinwag run`` with ``[http] enabled``)."""

    platform = PLATFORM
    #: An API client is reached only when it asks: nothing to push to.
    pushes = False

    def __init__(self, bot: Bot, host: str, port: int, tokens: list[str]) -> None:
        self.app = make_app(bot, tokens)
        self.shutdown_timeout_s = bot.settings.bot.shutdown_timeout_s / 3
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # A client that disconnects cancels its handler, so the model stops working for it.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("HTTP API listening on http://%s:%s", self.host, self.port)

    async def push(self, chat_id: str, reply: Reply) -> None:
        """Never called (``pushes`` is false); the protocol's method, for completeness."""
        raise LookupError("the HTTP API cannot send a message nobody asked for")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
