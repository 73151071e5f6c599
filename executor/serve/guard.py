"""What every request passes before anything reads it: the API key, then a size limit on
its body; and what every response carries: the security headers.

A plain ASGI middleware, so it runs before FastAPI parses a body: a request without the key
is refused without its body being read (a 400 MB POST to a server bound to 0.0.0.0 costs
nothing), and a body larger than the route takes stops being read at the limit.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_LIMIT = 64 * 1024  # a batch create is a few hundred bytes; 16 metadata pairs < 10 KB
UPLOAD_SLACK = 64 * 1024  # multipart framing and the purpose field around the file
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
}


class BodyTooLarge(Exception):
    """A request body grew past the route's limit while it was read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the {limit:,}-byte limit")
        self.limit = limit


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def authorized(header: str, key: str) -> bool:
    """The key as a bearer token, or as Basic auth's password (a browser), compared in
    constant time."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            value = ""
    elif scheme.lower() != "bearer":
        value = ""
    return hmac.compare_digest(value.strip().encode(), key.encode())


class Guard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, upload_limit: int) -> None:
        self.app = app
        self.api_key = api_key
        self.upload_limit = upload_limit + UPLOAD_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not authorized(
            headers.get("authorization", ""), self.api_key
        ):
            await _answer(
                send,
                401,
                error_body(
                    "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
                ),
                {"WWW-Authenticate": 'Basic realm="executor"'},
            )
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"
        limit = self.upload_limit if upload else JSON_LIMIT
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status, message = (
                (413, str(BodyTooLarge(limit)))
                if length.isdigit()
                else (400, "Content-Length is not a number")
            )
            await _answer(send, status, error_body(message))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (k.lower().encode(), v.encode()) for k, v in HEADERS.items()
                ]
            await send(message)

        await self.app(scope, counted, with_headers)


async def _answer(
    send: Send, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in {**HEADERS, **(extra or {})}.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
