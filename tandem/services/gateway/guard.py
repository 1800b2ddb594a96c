"""What the gateway checks before a request reaches a route: the API key and the body size.

Plain ASGI (no per-request task or body copy beyond the one the route would make anyway), so
streaming responses pass through untouched."""

from __future__ import annotations

import hmac
import json

# Paths that need the API key when one is set (as vLLM: /health and /metrics stay open).
PROTECTED_PREFIXES = ("/v1/",)
PROTECTED_PATHS = frozenset({"/reset_prefix_cache", "/tokenize", "/detokenize"})
DEFAULT_MAX_BODY_BYTES = 8 << 20
# A body over the limit is still read (and dropped) up to this many times the limit, so the
# client gets to read the 413 rather than a connection reset mid-upload; beyond, it is cut.
DRAIN_FACTOR = 4


def _error(status: int, message: str, type_: str, code: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return status, json.dumps(body).encode()


class Guard:
    """401 without the right `Authorization: Bearer <key>` on protected paths; 413 for a
    body over `max_body_bytes` (by its Content-Length, or counted as it arrives)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def protected(self, path: str) -> bool:
        return path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and self.protected(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = _error(401, "a valid API key is required", "AuthenticationError",
                               "invalid_api_key")  # fmt: skip
                return await _respond(send, *error, extra=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return await _respond(send, *_error(400, "bad Content-Length", "BadRequestError"))
            if too_big:
                if int(length) <= DRAIN_FACTOR * self.max_body_bytes:
                    await _drain(receive)  # so the client reads the 413, not a reset
                return await _respond(send, *self._too_large())
            return await self.app(scope, receive, send)
        return await self._counted(scope, receive, send)

    def _too_large(self) -> tuple[int, bytes]:
        return _error(413, f"the request body is over {self.max_body_bytes} bytes",
                      "RequestTooLargeError")  # fmt: skip

    async def _counted(self, scope, receive, send) -> None:
        """A body without Content-Length (chunked): read it all here, within the limit, then
        hand it to the app as one message."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                if message.get("more_body"):
                    await _drain(receive, DRAIN_FACTOR * self.max_body_bytes - size)
                return await _respond(send, *self._too_large())
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive, budget: int | None = None) -> None:
    """Read the rest of a request body and drop it (at most `budget` bytes)."""
    while budget is None or budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        if budget is not None:
            budget -= len(message.get("body", b""))


async def _respond(send, status: int, body: bytes, extra=()) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
