"""What the shell (danlu.serve.shell) puts in front of every request and beside every handler's routes:
the Guard (plain ASGI: it adds no task per request on the hot path), the request metrics, the probes
(/healthz, /readyz, /metrics), the API key comparison and the one way a body is read."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestMetrics:
    """A server's Prometheus registry (its own, so several apps can live in one process) with the request
    series Guard records; each server adds its own series to `registry`."""

    def __init__(self, latency_buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        disable_created_metrics()  # the *_created series only add noise to a scrape
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "danlu_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "danlu_request_seconds",
            "request latency by endpoint",
            ["endpoint"],
            buckets=latency_buckets,
            registry=self.registry,
        )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


def add_probes(app: FastAPI, status: dict[str, bool], metrics: RequestMetrics, ready_means: str) -> None:
    """GET /healthz (the process is alive), /readyz (200 once status["ready"], else 503 with
    Retry-After) and /metrics (the Prometheus text of the app's registry)."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", description=ready_means)
    async def readyz() -> Response:
        if status["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def key_matches(expected: str | None, headers) -> bool:
    """True when no key is set, or the request carries it in X-API-Key or Authorization: Bearer."""
    if expected is None:
        return True
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    return hmac.compare_digest(given.encode(), expected.encode())


class TooLarge(Exception):
    """The body is over the limit."""


async def read_body(receive: Callable[[], Awaitable[dict]], limit: float = float("inf")) -> bytes | None:
    """A request's whole body, at most `limit` bytes (TooLarge past it); None when the client left before
    sending it all. The chunks are joined once: appending to one bytes object would copy it per chunk."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise TooLarge
        if not message.get("more_body", False):
            return b"".join(chunks)


def _host_name(value: bytes) -> str:
    """The name in a Host header: without its port, brackets kept off IPv6 literals."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Guard:
    """In front of every request: the body limit (413, with or without Content-Length), the Host check
    (400 unless the Host header names an allowed name; `hosts` None allows every name), the content
    type of POSTs to JSON endpoints (415), and the request metrics. Errors are in the server's shape
    (`error_body(status, message)`)."""

    def __init__(
        self,
        app,
        max_body_bytes: int,
        metrics: Any,
        endpoints: frozenset[str],
        error_body: Callable[[int, str], dict],
        hosts: frozenset[str] | None = None,
        json_paths: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.app, self.max_body_bytes, self.metrics, self.endpoints = app, max_body_bytes, metrics, endpoints
        self.error_body, self.hosts, self.json_paths = error_body, hosts, json_paths or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = {"code": 500}

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            refused = self._refusal(scope, headers)
            if refused is not None:
                await self._error(send_and_record, *refused)
                return
            length = headers.get(b"content-length")
            if length is not None:
                if not length.isdigit() or int(length) > self.max_body_bytes:
                    await self._too_large(send_and_record)
                    return
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body = await read_body(receive, self.max_body_bytes)
                except TooLarge:
                    await self._too_large(send_and_record)
                    return
                if body is None:
                    return  # the client left
                receive = _replaying(body, receive)
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe(endpoint, status["code"], time.perf_counter() - start)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        if self.hosts is not None:
            host = _host_name(headers.get(b"host", b""))
            if host not in self.hosts:
                return 400, (
                    f"Host '{host[:100]}' is not this server's name; a server bound to loopback answers "
                    "only localhost, 127.0.0.1 and [::1] (serve with --host to take other names)"
                )
        accepted = self.json_paths.get(scope["path"])
        if accepted is not None and scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
            if kind not in accepted:
                return 415, f"send the body as {' or '.join(accepted)} (Content-Type), not '{kind[:100]}'"
        return None

    async def _too_large(self, send) -> None:
        await self._error(send, 413, f"request body over the limit of {self.max_body_bytes} bytes")

    async def _error(self, send, status: int, message: str) -> None:
        body = json.dumps(self.error_body(status, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replaying(body: bytes, receive):
    """A receive that gives the body already read, then whatever the client sends next (a disconnect)."""
    replay = [{"type": "http.request", "body": body, "more_body": False}]

    async def replaying():
        return replay.pop() if replay else await receive()

    return replaying
