"""Where a `danlu serve` request spends its time, stage by stage, on the quickstart model.

Each stage runs on its own, many times in a row, in this process (no HTTP), and prints microseconds per
single-row request; the last lines drive the whole ASGI app (Guard, the JSON fast path, the micro-batcher,
the model) without a socket, and the tutorial's snippet's own work, for scale. What the table cannot show,
HTTP parsing in uvicorn and the client, is the echo column of benchmarks/serve.py.

    python benchmarks/serve_profile.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from timing import per_call
from torch import nn

import danlu
from danlu.api import QUICKSTART
from danlu.serve.app import Metrics, ServeSettings, _encode, create_app
from danlu.serve.batching import MicroBatcher

RECORD = {f"x{j}": 0.1 * j for j in range(10)}
BODY = json.dumps({"records": [RECORD]}).encode()


async def per_request(make, n: int) -> float:
    """Microseconds per awaited make(), after 100 warm-up calls."""
    for _ in range(100):
        await make()
    start = time.perf_counter()
    for _ in range(n):
        await make()
    return (time.perf_counter() - start) / n * 1e6


async def asgi_request(app) -> int:
    """One POST /v1/predict through the app's full middleware stack, as uvicorn would call it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(BODY)).encode())],
    }  # fmt: skip
    sent = []

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


def snippet_work():
    """The tutorial snippet's own work per request: pydantic, torch.tensor, the model, the answer."""

    class Item(BaseModel):
        features: list[float]

    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    body = json.dumps({"features": list(RECORD.values())}).encode()

    def work():
        item = Item.model_validate_json(body)
        with torch.no_grad():
            out = model(torch.tensor([item.features]))
        return json.dumps({"prediction": int(out.argmax(1))})

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="calls per stage (default 20000)")
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        config = {**QUICKSTART, "train": {**QUICKSTART["train"], "epochs": 3}}
        run = danlu.train(config, out=Path(tmp) / "quick", progress=False)
        settings = ServeSettings(str(run.path))
        app = create_app(settings)
        predictor = danlu.Predictor.load(run.path)
    family, state = predictor.family, predictor.state
    request_model = family.request_model(state, settings.max_rows)
    items, _ = family.request_items(state, request_model.model_validate_json(BODY))
    output = predictor.decoded_items(items)
    metrics = Metrics()

    async def hop(inline: int) -> float:
        batcher = MicroBatcher(lambda rows: rows, max_wait_ms=0, inline_rows=inline)
        await batcher.start()
        try:
            return await per_request(lambda: batcher.submit([1]), n // 4)
        finally:
            await batcher.stop()

    async def whole() -> float:
        async with app.router.lifespan_context(app):
            assert await asgi_request(app) == 200
            return await per_request(lambda: asgi_request(app), n // 4)

    def validate():
        return request_model.model_validate_json(BODY)

    def parse():
        return family.request_items(state, validate())

    stages = [
        ("parse and validate the body (pydantic-core)", per_call(validate, n)),
        ("records to items (family.request_items)", per_call(parse, n) - per_call(validate, n)),
        ("preprocess + model + decode (1 row)", per_call(lambda: predictor.decoded_items(items), n // 4)),
        ("micro-batcher round trip, batch on the event loop", asyncio.run(hop(1))),
        ("answer as JSON (_encode + json.dumps)", per_call(lambda: json.dumps(_encode(state, output)), n)),
        ("Prometheus series (2 labelled updates)", per_call(lambda: metrics.observe("/", 200, 1e-3), n)),
    ]
    print(f"{'stage':52}{'us per request':>16}")
    for name, us in stages:
        print(f"{name:52}{us:>16.1f}")
    print(f"{'sum of the stages':52}{sum(us for _, us in stages):>16.1f}")
    print(f"{'(micro-batcher round trip via the inference thread)':52}{asyncio.run(hop(0)):>16.1f}")
    print(f"{'whole ASGI app in process (no socket)':52}{asyncio.run(whole()):>16.1f}")
    print(f"{'the tutorial snippet work, inline (for scale)':52}{per_call(snippet_work(), n // 4):>16.1f}")


if __name__ == "__main__":
    main()
