"""What every request passes before a route sees it (a plain ASGI middleware, so that no route,
the 404s and the OpenAPI pages included, is left out): HTTP basic auth when `--api-auth` is
given, and the body size limit."""

from __future__ import annotations

import base64
import binascii
import json
import secrets

from ldm_cli.core.errors import UserError


def parse_credentials(text: str) -> list[tuple[str, str]]:
    """`--api-auth USER:PASS[,USER:PASS...]` as (user, password) pairs."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UserError("--api-auth must be USER:PASSWORD (several separated by commas)")
        pairs.append((user, password))
    return pairs


class Guard:
    def __init__(self, app, credentials: list[tuple[str, str]] | None, max_body: int):
        self.app = app
        self.credentials = credentials or []
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and self.credentials:
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.credentials and not self._allowed(headers.get(b"authorization", b"")):
            await _json(
                send, 401, "Incorrect username or password", [(b"www-authenticate", b"Basic")]
            )
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _json(send, 413, f"the request body is over the limit of {self.max_body} bytes")
            return
        received = 0
        started = refused = False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_body:  # a body sent without Content-Length
                    refused = True
                    if not started:
                        await _json(send, 413, too_large)
                    return {"type": "http.disconnect"}  # the app stops reading and answering
            return message

        async def watched_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        too_large = f"the request body is over the limit of {self.max_body} bytes"
        await self.app(scope, counted_receive, watched_send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        ok = False
        for known_user, known_password in self.credentials:  # every pair compared: no early out
            same_user = secrets.compare_digest(user.encode(), known_user.encode())
            same_password = secrets.compare_digest(password.encode(), known_password.encode())
            ok |= bool(sep) and same_user and same_password
        return ok


async def _json(send, status: int, detail: str, headers=()) -> None:
    body = json.dumps({"error": "HTTPException", "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), *headers],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": body})
