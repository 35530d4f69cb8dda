"""POST /v1/predict with a JSON body, answered in plain ASGI. On a small model FastAPI's routing,
dependency and response layers cost more per request than the model itself; this path gives the same
answers (the handler's own `handle`, as the FastAPI route, which still documents the API and takes
multipart uploads) without them. Guard, outside it, still limits the body and records metrics."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from danlu.serve.guard import key_matches, read_body
from danlu.serve.shell import UNAUTHORIZED


class JsonPredict:
    def __init__(
        self,
        app,
        path: str,
        api_key: str | None,
        handle: Callable[[bytes], Awaitable[tuple[int, dict[str, Any], dict[str, str]]]],
    ) -> None:
        self.app, self.path, self.api_key, self.handle = app, path, api_key, handle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        for name, value in headers:
            if name == b"content-type" and value.startswith(b"multipart/"):
                await self.app(scope, receive, send)  # uploads: the FastAPI route
                return
        if self.api_key is not None:
            text = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
            if not key_matches(self.api_key, text):
                await respond(send, 401, {"detail": UNAUTHORIZED}, {"WWW-Authenticate": "Bearer"})
                return
        body = await read_body(receive)  # its size is the Guard's to limit, in front of this
        if body is None:
            return  # the client left before sending its body
        await respond(send, *await self.handle(body))


async def respond(send, status: int, content: Any, extra: dict[str, str]) -> None:
    """Strict JSON (no NaN), as Starlette's JSONResponse writes it."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
