"""A local stand-in for the Telegram Bot API, for driving the real aiogram client in tests.

Serves ``/bot<token>/<method>`` like api.telegram.org: form-encoded parameters in (nested
objects as JSON strings, the way aiogram sends them), ``{"ok": true, "result": …}`` out. It
records every call, hands out queued updates to ``getUpdates`` (long polling), and can be told
to answer a method with a 429 (``retry_after``) or a 5xx a number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Chinwag", "username": "chinwag_bot"}
JSON_FIELDS = {"reply_markup", "reply_parameters", "commands", "entities", "allowed_updates"}


@dataclass
class FakeTelegram:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    acked: list[tuple[int, int]] = field(default_factory=list)
    _new: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    _update_ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- what tests do -----------------------------------------------------------------------

    def user_says(
        self,
        text: str | None,
        *,
        chat_id: int = 100,
        user_id: int = 7,
        chat_type: str = "private",
        reply_to_bot: bool = False,
        sticker: bool = False,
        update_id: int | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": next(self._ids),
            "date": int(time.time()),
            "chat": {
                "id": chat_id,
                "type": chat_type,
                "title": "Group" if chat_type != "private" else None,
            },
            "from": {"id": user_id, "is_bot": False, "first_name": "Ann"},
        }
        if text is not None:
            message["text"] = text
        if sticker:
            message["sticker"] = {
                "file_id": "s1",
                "file_unique_id": "u1",
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
            }
        if reply_to_bot:
            message["reply_to_message"] = {
                "message_id": 1,
                "date": int(time.time()),
                "chat": message["chat"],
                "from": BOT_USER,
                "text": "earlier reply",
            }
        update = {"update_id": update_id or next(self._update_ids), "message": message}
        self.updates.append(update)
        self._new.set()
        return update

    def user_edits(self, update: dict[str, Any], text: str) -> dict[str, Any]:
        message = dict(update["message"], text=text, edit_date=int(time.time()) + 1)
        edited = {"update_id": next(self._update_ids), "edited_message": message}
        self.updates.append(edited)
        self._new.set()
        return edited

    def user_presses(self, data: str, *, chat_id: int = 100, user_id: int = 7, message_id: int = 1):
        update = {
            "update_id": next(self._update_ids),
            "callback_query": {
                "id": f"cb{next(self._ids)}",
                "from": {"id": user_id, "is_bot": False, "first_name": "Ann"},
                "chat_instance": "ci",
                "data": data,
                "message": {
                    "message_id": message_id,
                    "date": int(time.time()),
                    "chat": {"id": chat_id, "type": "private"},
                    "from": BOT_USER,
                    "text": "x",
                },
            },
        }
        self.updates.append(update)
        self._new.set()
        return update

    def fail(self, method: str, status: int, times: int = 1, retry_after: int | None = None):
        """Answer ``method`` with ``status`` (0: drop the connection) the next ``times`` calls."""
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": f"fake {status}"}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
            body["description"] = f"Too Many Requests: retry after {retry_after}"
        self.failures.setdefault(method, []).extend([(status, body)] * times)

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    async def wait_for(self, method: str, count: int = 1, within: float = 30) -> list[dict]:
        deadline = time.monotonic() + within
        while len(self.sent(method)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} called {len(self.sent(method))}× (wanted {count})")
            await asyncio.sleep(0.02)
        return self.sent(method)

    # -- the server --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        form = await request.post()
        params: dict[str, Any] = {}
        for key, value in form.items():
            params[key] = json.loads(value) if key in JSON_FIELDS else value
        self.calls.append((method, params))
        bad = _bad_entities(params)
        if bad:  # what the real Bot API answers: the message is not sent
            body = {"ok": False, "error_code": 400, "description": f"Bad Request: {bad}"}
            return web.json_response(body, status=400)
        queued = self.failures.get(method)
        if queued:
            status, body = queued.pop(0)
            if status == 0:  # a dropped connection: no answer at all
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("dropped by the fake server")
            return web.json_response(body, status=status)
        result = await getattr(self, f"m_{method}", self.m_default)(params)
        return web.json_response({"ok": True, "result": result})

    async def m_default(self, params: dict[str, Any]) -> Any:
        return True

    async def m_getMe(self, params: dict[str, Any]) -> Any:
        return BOT_USER

    async def m_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset", 0) or 0)
        store = getattr(getattr(self, "bot", None), "store", None)
        if offset and store is not None:
            # What the bot had durably stored at the moment it acknowledged updates < offset.
            self.acked.append((offset, await store.count_messages("in")))
        timeout = min(float(params.get("timeout", 0) or 0), 1.0)
        pending = [u for u in self.updates if u["update_id"] >= offset]
        if not pending and timeout:
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), timeout)
            pending = [u for u in self.updates if u["update_id"] >= offset]
        return pending

    async def m_sendMessage(self, params: dict[str, Any]) -> Any:
        return {
            "message_id": next(self._ids),
            "date": int(time.time()),
            "chat": {"id": int(params["chat_id"]), "type": "private"},
            "from": BOT_USER,
            "text": params.get("text", ""),
        }


def _bad_entities(params: dict[str, Any]) -> str | None:
    """Telegram's check of message entities: known types, inside the text, counted in UTF-16
    code units; entities and a parse mode together are refused too."""
    entities = params.get("entities")
    if not entities:
        return None
    if params.get("parse_mode"):
        return "can't use entities with a parse mode"
    size = len(str(params.get("text", "")).encode("utf-16-le")) // 2
    for e in entities:
        if e.get("type") not in {"pre", "code", "bold", "italic", "text_link", "blockquote"}:
            return f"can't parse entities: unsupported type {e.get('type')!r}"
        if e["offset"] < 0 or e["length"] <= 0 or e["offset"] + e["length"] > size:
            return f"can't parse entities: entity beyond the end of the text at {e['offset']}"
    return None
