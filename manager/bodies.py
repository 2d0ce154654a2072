"""What a REST request body may be, checked before a byte of it is read (an ASGI middleware).

    request --> BoundedBodies: a body needs a valid bearer token (else 401) and a size within its
                limit (else 413); a streamed body is counted as it arrives --> the FastAPI app

Separate from ``api`` so the limits and the middleware read on their own; ``api`` installs it.
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any

API = "/api/v1"
MAX_UPLOAD_PART = 1024 * 1024 * 1024
# request bodies: JSON (run, share...) up to MAX_BODY_BYTES; a publish (multipart, the files of a
# servable) up to MAX_PUBLISH_BYTES in all. Larger: 413 before the body is read.
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PUBLISH_BYTES = MAX_UPLOAD_PART
PUBLISH_PATH = f"{API}/servables"
OUTPUTS_PATH = f"{API}/outputs"  # outputs by reference: authorized by an upload grant, streamed


# An unauthenticated body up to this size is read (and dropped) before the 401, so the client
# reads the answer instead of a connection reset; anything larger is refused unread.
DRAIN_BEFORE_REFUSAL_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """A body streamed without Content-Length went past its limit."""


class BoundedBodies:
    """ASGI middleware: a request with a body (POST/PUT/PATCH/DELETE: every such route needs a
    token) is refused before a byte of it is read when its token is not valid (401) or its
    Content-Length is above the limit (413); a body streamed without Content-Length is counted
    as it arrives and refused at the limit. Errors are the API's JSON ``{code, message}``."""

    def __init__(self, app: Any, check_token: Callable[[str], Any]):
        self.app, self.check_token = app, check_token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith(OUTPUTS_PATH) and b"grant=" in scope.get("query_string", b""):
            # a call's output stored by its endpoint: the route checks the upload grant before it
            # reads a byte, then streams the body to disk (declared size at most MAX_FILE_BYTES)
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        ok = scheme.lower() == "bearer" and token.strip()
        if not ok or await asyncio.to_thread(self.check_token, token.strip()) is None:
            await self._drain_small(receive, headers.get(b"content-length"))
            return await self._refuse(
                send, 401, "access-denied", "a valid 'Authorization: Bearer <token>' header is required"
            )
        publish = scope["method"] == "POST" and scope["path"].rstrip("/") == PUBLISH_PATH
        limit = MAX_PUBLISH_BYTES if publish else MAX_BODY_BYTES
        what = "a publish" if publish else "a request body"
        too_large = f"{what} may be at most {limit:,} bytes"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(send, 400, "bad-request", "Content-Length is not a number")
            if int(length) > limit:
                return await self._refuse(send, 413, "payload-too-large", f"{too_large}; got {int(length):,}")
        if publish:  # large: streamed to the form parser, counted on the way
            seen = 0

            async def counted() -> dict:
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(too_large)
                return message

            return await self.app(scope, counted, send)
        chunks, seen = [], 0  # small: read here (at most the limit), then replayed
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await self._refuse(send, 413, "payload-too-large", too_large)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _drain_small(receive: Callable, length: bytes | None) -> None:
        """Read and drop a small body before refusing it: closing a connection with unread bytes
        makes the kernel reset it, and a client still sending then sees "connection reset"
        instead of the 401. Large bodies (the attack) are not read: they get the reset."""
        if length is not None and (not length.isdigit() or int(length) > DRAIN_BEFORE_REFUSAL_BYTES):
            return
        seen = 0
        while seen <= DRAIN_BEFORE_REFUSAL_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    @staticmethod
    async def _refuse(send: Callable, status: int, code: str, message: str) -> None:
        body = json.dumps({"code": code, "message": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))  # the unread body must not be parsed as a request
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
