"""`danlu serve` vs the tutorial's FastAPI snippet and the ceiling, all real uvicorn processes on 127.0.0.1.

  echo            a FastAPI endpoint that returns its request body: the most FastAPI does per request
  snippet         the tutorial's code as written: a pydantic `features: list[float]`, `torch.tensor`, an
                  nn.Sequential of the same size, `async def` (inline on the event loop, its fastest form
                  for a small model)
  Predictor       the snippet calling danlu's Predictor with a DataFrame per request (danlu's own
                  preprocessing, for comparison)
  danlu serve     validation, micro-batching, limits and metrics on

Each server is driven from a separate load process (a keep-alive asyncio HTTP/1.1 client) with
single-row requests at 1, 16 and 64 concurrent connections, for (a) the quickstart model (a 10-20-3 MLP)
and (b) a compute-heavy MLP (hidden [2048, 2048, 2048]).

    python benchmarks/serve.py [--seconds 5] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from fastapi import Body, FastAPI, Request, Response
from pydantic import BaseModel

RECORD = {f"x{j}": 0.1 * j for j in range(10)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Item(BaseModel):  # the snippet's request (module level: FastAPI resolves the annotations here)
    features: list[float]


def echo_app():
    app = FastAPI()

    @app.post("/v1/predict")
    async def echo(request: Request):
        return Response(await request.body(), media_type="application/json")

    return app


def snippet_app(hidden: list[int]):
    """The tutorial's serving snippet: raw features into torch.tensor, a model of the same size."""
    import torch
    from torch import nn

    sizes = [10, *hidden]
    layers = [m for a, b in itertools.pairwise(sizes) for m in (nn.Linear(a, b), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], 3)).eval()
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(item: Item):
        x = torch.tensor([item.features])
        with torch.no_grad():
            probabilities = torch.softmax(model(x), dim=1)
        return {"prediction": int(probabilities.argmax(1)), "probabilities": probabilities[0].tolist()}

    return app


def naive_app(run_dir: str):
    """The tutorial snippet calling danlu's Predictor, fixed only so that it starts (a Body annotation)."""
    import pandas as pd

    import danlu

    predictor = danlu.load(run_dir)
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(data: dict = Body(...)):  # noqa: B008 (the tutorial's own spelling)
        frame = pd.DataFrame(data["records"])
        return {"predictions": predictor.predict(frame).tolist()}

    return app


def body_for(name: str) -> bytes:
    if name == "snippet":
        return json.dumps({"features": list(RECORD.values())}).encode()
    return json.dumps({"records": [RECORD]}).encode()


def start(command: list[str], port: int, log, body: bytes) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{command} exited: {log.read().decode(errors='replace')}")
        try:
            url = f"http://127.0.0.1:{port}/v1/predict"
            answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=2)
            if answer.status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"{command} did not answer in 120 s")


async def load(port: int, connections: int, seconds: float, body: bytes) -> dict:
    """Keep-alive connections sending POST /v1/predict back to back; latencies of 2xx answers."""
    request = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies, errors = [], 0
    stop = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            start = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if 200 <= status < 300:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
        writer.close()

    began = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.monotonic() - began
    ms = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "errors": errors,
    }


def measure(port: int, connections: int, seconds: float, body: bytes) -> dict:
    """Run the load in its own process, so the client does not share an interpreter with the server."""
    code = f"import asyncio, json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import serve; "
    code += f"print(json.dumps(asyncio.run(serve.load({port}, {connections}, {seconds}, {body!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


HIDDEN = {"quickstart MLP": [20], "MLP [2048, 2048, 2048]": [2048, 2048, 2048]}


def train_models(root: Path) -> dict[str, Path]:
    import danlu
    from danlu.api import QUICKSTART

    quick = {**QUICKSTART, "train": {**QUICKSTART["train"], "epochs": 3}}
    heavy = {
        "data": {"train": "synthetic:classification", "synthetic": {"n_samples": 5000}},
        "model": {"hidden": [2048, 2048, 2048]},
        "train": {"epochs": 1},
    }
    paths = {}
    for name, config in (("quickstart MLP", quick), ("MLP [2048, 2048, 2048]", heavy)):
        paths[name] = danlu.train(config, out=root / name.split()[0].lower(), progress=False).path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load per measurement (default 5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--app", help=argparse.SUPPRESS)  # the child process that serves one app
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.app:
        import uvicorn

        kind, _, value = args.app.partition(":")
        app = {"echo": echo_app, "snippet": lambda: snippet_app(json.loads(value)),
               "predictor": lambda: naive_app(value)}[kind]()  # fmt: skip
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, run_dir in train_models(Path(tmp)).items():
            child = [sys.executable, __file__, "--app"]
            servers = {
                "echo": [*child, "echo", "--port"],
                "snippet": [*child, f"snippet:{json.dumps(HIDDEN[model])}", "--port"],
                "Predictor": [*child, f"predictor:{run_dir}", "--port"],
                "danlu serve": [sys.executable, "-m", "danlu", "-q", "serve", str(run_dir), "--port"],
            }
            results = {}
            for name, command in servers.items():
                port, body = free_port(), body_for(name)
                with tempfile.TemporaryFile() as log:
                    process = start([*command, str(port)], port, log, body)
                    try:
                        for connections in args.concurrency:
                            results[name, connections] = measure(port, connections, args.seconds, body)
                    finally:
                        process.send_signal(signal.SIGTERM)
                        process.wait(timeout=60)
            rows.append((model, results))
    print(f"single-row POST /v1/predict, {args.seconds:g} s per cell, {os.cpu_count()} CPU cores, 127.0.0.1")
    names = ["echo", "snippet", "Predictor", "danlu serve"]
    print(f"{'':30}" + "".join(f"{n + ' req/s':>18}" for n in names) + f"{'vs echo':>9}{'vs snippet':>11}")
    for model, results in rows:
        for connections in args.concurrency:
            cells = [results[n, connections] for n in names]
            ours = cells[-1]["rps"]
            line = f"{model + f', {connections} conns':30}"
            line += "".join(f"{c['rps']:>10.0f} ({c['p99']:>4.1f}ms)" for c in cells)
            line += f"{ours / cells[0]['rps']:>8.2f}x{ours / cells[1]['rps']:>10.2f}x"
            errors = [c["errors"] for c in cells]
            print(line + (f"  errors {errors}" if any(errors) else ""))
    print("(p99 latency in brackets)")


if __name__ == "__main__":
    main()
