"""What every danlu server puts around its own endpoints: ASGI middleware in front of every request (the
body size limit, 413, and the Prometheus request series), the API key check, and the probes (/healthz,
/readyz, /metrics). Plain ASGI rather than BaseHTTPMiddleware: it adds no task per request on the hot
path."""

from __future__ import annotations

import hmac
import json
import time
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

from danlu.errors import DanluError


def check_limits(settings: Any, counts: tuple[str, ...]) -> None:
    """Each setting in `counts` at least 1 and settings.timeout_s above 0, or one DanluError naming it."""
    for name in counts:
        if getattr(settings, name) < 1:
            raise DanluError(f"{name.replace('_', '-')} must be at least 1", "pass a positive number")
    if settings.timeout_s <= 0:
        raise DanluError("--timeout must be above 0 seconds", "e.g. --timeout 30")


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


class Guard:
    def __init__(self, app, max_body_bytes: int, metrics: Any, endpoints: set[str]) -> None:
        self.app, self.max_body_bytes, self.metrics, self.endpoints = app, max_body_bytes, metrics, endpoints

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
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None:
                if not length.isdigit() or int(length) > self.max_body_bytes:
                    await self._too_large(send_and_record)
                    return
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffered(receive)
                if receive is None:
                    await self._too_large(send_and_record)
                    return
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe(endpoint, status["code"], time.perf_counter() - start)

    async def _buffered(self, receive):
        """Read a body sent without Content-Length up to the limit: a replaying receive, or None if over."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying():
            return replay.pop() if replay else await receive()

        return replaying

    async def _too_large(self, send) -> None:
        body = json.dumps({"detail": f"request body over the limit of {self.max_body_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
