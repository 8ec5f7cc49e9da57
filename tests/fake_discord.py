"""A local stand-in for Discord's gateway (WebSocket) and REST API, for driving real discord.py.

One aiohttp app serves both: ``/gateway`` speaks the gateway protocol (HELLO, IDENTIFY → READY
and GUILD_CREATE, heartbeats, RESUME after a dropped connection) as uncompressed JSON text
frames, which discord.py accepts beside its compressed stream; ``/api/v10/…`` answers the REST
calls the adapter makes (login, application info, command sync, messages, typing, reactions,
interaction callbacks and follow-ups) and records them. Tests play the users: they push
``MESSAGE_CREATE``, ``MESSAGE_REACTION_ADD`` and ``INTERACTION_CREATE`` events down the socket.
A route can be told to answer 429 (with ``retry_after``, as Discord does) a number of times.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

APP_ID = 5000
BOT_USER = {
    "id": "5001",
    "username": "chinwag",
    "discriminator": "0",
    "global_name": "Chinwag",
    "avatar": None,
    "bot": True,
}
HUMAN = {
    "id": "7001",
    "username": "ann",
    "discriminator": "0",
    "global_name": "Ann",
    "avatar": None,
}
GUILD_ID = 9000
GENERAL = 9001  # a text channel
THREAD = 9002  # a thread the bot started in #general
OTHER_THREAD = 9003  # a thread someone else started
DM = 9100


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _member(user: dict[str, Any] | None = None) -> dict[str, Any]:
    member: dict[str, Any] = {
        "roles": [],
        "joined_at": _now(),
        "deaf": False,
        "mute": False,
        "flags": 0,
    }
    if user is not None:
        member["user"] = user
    return member


def _thread(thread_id: int, owner: str) -> dict[str, Any]:
    return {
        "id": str(thread_id),
        "type": 11,
        "guild_id": str(GUILD_ID),
        "name": f"thread-{thread_id}",
        "parent_id": str(GENERAL),
        "owner_id": owner,
        "rate_limit_per_user": 0,
        "message_count": 0,
        "member_count": 2,
        "flags": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 1440,
            "archive_timestamp": _now(),
            "locked": False,
        },
    }


def guild_payload() -> dict[str, Any]:
    return {
        "id": str(GUILD_ID),
        "name": "Test guild",
        "icon": None,
        "owner_id": HUMAN["id"],
        "unavailable": False,
        "large": False,
        "member_count": 2,
        "joined_at": _now(),
        "roles": [
            {
                "id": str(GUILD_ID),
                "name": "@everyone",
                "permissions": "2248473465835073",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }
        ],
        "members": [_member(BOT_USER), _member(HUMAN)],
        "channels": [
            {
                "id": str(GENERAL),
                "type": 0,
                "guild_id": str(GUILD_ID),
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "rate_limit_per_user": 0,
            }
        ],
        "threads": [_thread(THREAD, BOT_USER["id"]), _thread(OTHER_THREAD, HUMAN["id"])],
        "emojis": [],
        "stickers": [],
        "features": [],
        "voice_states": [],
        "presences": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "system_channel_flags": 0,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "afk_timeout": 300,
    }


@dataclass
class FakeDiscord:
    #: ``(method, path, json body)`` for every REST call.
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    #: ``{(method, path prefix): [(status, retry_after), …]}`` answered before the real thing.
    failures: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    #: Every message the bot created (channel messages and interaction follow-ups).
    posted: list[dict[str, Any]] = field(default_factory=list)
    identified: int = 0
    resumed: int = 0
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    _ids: itertools.count = field(default_factory=lambda: itertools.count(100_000))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    base_url: str = ""

    # -- what tests do -----------------------------------------------------------------------

    async def user_says(
        self,
        content: str,
        *,
        channel_id: int = DM,
        mention: bool = False,
        reply_to: dict[str, Any] | None = None,
        attachments: int = 0,
    ) -> dict[str, Any]:
        """A human's message in ``channel_id`` (the DM by default; guild channels otherwise)."""
        data: dict[str, Any] = {
            "id": str(next(self._ids)),
            "channel_id": str(channel_id),
            "author": HUMAN,
            "content": (f"<@{BOT_USER['id']}> " + content) if mention else content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [BOT_USER] if mention else [],
            "mention_roles": [],
            "attachments": [
                {
                    "id": str(next(self._ids)),
                    "filename": "cat.png",
                    "size": 1234,
                    "url": "https://cdn.example/cat.png",
                    "proxy_url": "https://cdn.example/cat.png",
                    "content_type": "image/png",
                }
                for _ in range(attachments)
            ],
            "embeds": [],
            "pinned": False,
            "type": 19 if reply_to else 0,
            "flags": 0,
        }
        if channel_id != DM:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = _member()
        if reply_to is not None:
            data["message_reference"] = {
                "message_id": reply_to["id"],
                "channel_id": reply_to["channel_id"],
            }
            data["referenced_message"] = reply_to
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def user_reacts(self, message: dict[str, Any], emoji: str) -> None:
        data = {
            "user_id": HUMAN["id"],
            "channel_id": message["channel_id"],
            "message_id": message["id"],
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "type": 0,
        }
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
        await self.dispatch("MESSAGE_REACTION_ADD", data)

    async def user_runs(self, command: str, text: str | None = None, channel_id: int = GENERAL):
        """A slash command picked from Discord's menu (an ``INTERACTION_CREATE``)."""
        data: dict[str, Any] = {
            "id": str(next(self._ids)),
            "application_id": str(APP_ID),
            "type": 2,
            "token": f"itoken{next(self._ids)}",
            "version": 1,
            "channel_id": str(channel_id),
            "channel": {"id": str(channel_id), "type": 0, "guild_id": str(GUILD_ID)},
            "guild_id": str(GUILD_ID),
            "member": {**_member(HUMAN), "permissions": "2248473465835073"},
            "app_permissions": "2248473465835073",
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
            "context": 0,
            "attachment_size_limit": 8_388_608,
            "data": {
                "id": str(next(self._ids)),
                "name": command,
                "type": 1,
                "options": [] if text is None else [{"name": "text", "type": 3, "value": text}],
            },
        }
        await self.dispatch("INTERACTION_CREATE", data)
        return data

    def fail(self, method: str, path_prefix: str, status: int, times: int = 1, retry_after=0.5):
        self.failures.setdefault((method, path_prefix), []).extend([(status, retry_after)] * times)

    def sent(self, method: str = "POST", contains: str = "/messages") -> list[Any]:
        return [body for m, p, body in self.calls if m == method and contains in p]

    async def wait_for(
        self, method: str = "POST", contains: str = "/messages", count: int = 1, within: float = 30
    ) -> list[Any]:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.sent(method, contains)) >= count), within
            )
        return self.sent(method, contains)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.send_str(
                    json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data})
                )

    async def drop_connections(self) -> None:
        """Close every gateway socket the way a network drop or a Discord restart does."""
        for ws in list(self.sockets):
            await ws.close(code=4000, message=b"dropped")

    async def wait_identified(self, resumed: int = 0, within: float = 30) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.identified >= 1 and self.resumed >= resumed),
                within,
            )

    # -- the server --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/gateway", self.gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self.rest)
        return app

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            op = payload["op"]
            if op == 1:
                await ws.send_json({"op": 11})
            elif op == 2:
                shard = payload["d"].get("shard", [0, 1])
                await ws.send_json(
                    {
                        "op": 0,
                        "t": "READY",
                        "s": next(self._seq),
                        "d": {
                            "v": 10,
                            "user": BOT_USER,
                            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                            "session_id": "session-1",
                            "resume_gateway_url": f"{self.base_url.replace('http', 'ws')}/gateway",
                            "application": {"id": str(APP_ID), "flags": 0},
                            "shard": shard,
                        },
                    }
                )
                await ws.send_json(
                    {"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild_payload()}
                )
                self.identified += 1
                await self._notify()
            elif op == 6:
                await ws.send_json({"op": 0, "t": "RESUMED", "s": next(self._seq), "d": {}})
                self.resumed += 1
                await self._notify()
        self.sockets.remove(ws)
        return ws

    async def rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.json() if request.can_read_body else None
        for (method, prefix), queue in self.failures.items():
            if method == request.method and path.startswith(prefix) and queue:
                status, retry_after = queue.pop(0)
                self.calls.append((f"{request.method}!{status}", path, body))
                if status == 429:
                    return _json(
                        {
                            "message": "You are being rate limited.",
                            "retry_after": retry_after,
                            "global": False,
                        },
                        status=429,
                        headers={"Via": "1.1 google", "X-RateLimit-Scope": "user"},
                    )
                return _json({"message": "boom", "code": 0}, status=status)
        self.calls.append((request.method, path, body))
        await self._notify()
        return await self._answer(request.method, path, body or {})

    async def _answer(self, method: str, path: str, body: dict[str, Any]) -> web.Response:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return _json(BOT_USER)
        if path == "/oauth2/applications/@me":
            return _json(
                {
                    "id": str(APP_ID),
                    "name": "chinwag",
                    "description": "",
                    "icon": None,
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "owner": HUMAN,
                    "verify_key": "0" * 64,
                    "flags": 0,
                }
            )
        if path in ("/gateway", "/gateway/bot"):
            url = self.base_url.replace("http", "ws") + "/gateway"
            return _json(
                {
                    "url": url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 1000,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            )
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            return _json(
                [
                    {**c, "id": str(next(self._ids)), "application_id": str(APP_ID), "version": "1"}
                    for c in body
                ]
            )
        if parts[0] == "channels" and parts[-1] == "typing":
            return web.Response(status=204)
        if parts[0] == "channels" and "reactions" in parts:
            return web.Response(status=204)
        if parts[0] == "channels" and parts[-1] == "messages" and method == "POST":
            return _json(self._bot_message(parts[1], body))
        if parts[0] == "channels" and len(parts) == 4 and parts[2] == "messages":
            known = next((m for m in self.posted if m["id"] == parts[3]), None)
            if known is None:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            if method == "PATCH":
                known.update(content=body.get("content", known["content"]), edited_timestamp=_now())
                return _json(known)
            if method == "DELETE":
                self.posted.remove(known)
                return web.Response(status=204)
        if parts[0] == "interactions" and parts[-1] == "callback":
            return _json(
                {"interaction": {"id": parts[1], "type": 2, "response_message_loading": True}}
            )
        if parts[0] == "webhooks":
            return _json(self._bot_message(str(GENERAL), body))
        return _json({"message": f"not in the stand-in: {method} {path}"}, status=404)

    def _bot_message(self, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
        message = {
            "id": str(next(self._ids)),
            "channel_id": channel_id,
            "author": BOT_USER,
            "content": body.get("content", ""),
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 19 if body.get("message_reference") else 0,
            "flags": 0,
        }
        self.posted.append(message)
        return message


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Exactly ``application/json``, as Discord sends it (discord.py checks the header verbatim)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )
