"""The embeddings server's throughput against the same model in-process, side by side in one run: a real
`danlu serve MINILM_DIR --truncate end` (uvicorn) answering 16 concurrent clients that each send one text per
request (OpenAI's /v1/embeddings), against danlu.load(DIR).embed_texts(texts, batch_size=32) in this
process: texts per second, and the server's forward passes (from its danlu_batch_rows histogram).

The texts: --texts sentences of the standard library's docstrings (benchmarks/embeddings.py's). The
clients run in this process on asyncio (httpx), on the same 2 cores as the server.

Run: python benchmarks/embeddings_server.py [--texts 1000] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from embeddings import minilm_path, stdlib_sentences


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, port: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "danlu", "serve", model, "--port", str(port), "--truncate", "end"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    sys.exit("the server did not start")


async def clients(url: str, texts: list[str], count: int) -> tuple[float, list]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, text in enumerate(texts):
        queue.put_nowait((i, text))
    vectors: list = [None] * len(texts)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, text = queue.get_nowait()
            answer = await http.post(f"{url}/v1/embeddings", json={"input": text}, timeout=60)
            answer.raise_for_status()
            vectors[i] = answer.json()["data"][0]["embedding"]

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits) as http:
        start_at = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(count)))
        seconds = time.perf_counter() - start_at
    return len(texts) / seconds, vectors


def batches(url: str) -> tuple[float, float]:
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()

    def value(name: str) -> float:
        return float(next(x for x in lines if x.startswith(name + " ")).split()[-1])

    return value("danlu_batch_rows_count"), value("danlu_batch_rows_sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = minilm_path()
    import danlu

    texts = stdlib_sentences(args.texts)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(model, port)
    try:
        asyncio.run(clients(url, texts[:64], args.clients))  # warm: connections, first batches
        served, vectors, passes = 0.0, None, (0.0, 0.0)
        for _ in range(args.rounds):
            before = batches(url)
            rate, found = asyncio.run(clients(url, texts, args.clients))
            after = batches(url)
            if rate > served:
                served, vectors = rate, found
                passes = (after[0] - before[0], after[1] - before[1])
    finally:
        server.terminate()
        server.wait(30)
    encoder = danlu.load(model)
    in_process, reference = 0.0, None
    for _ in range(args.rounds):
        start_at = time.perf_counter()
        reference = encoder.embed_texts(texts, batch_size=32)
        in_process = max(in_process, len(texts) / (time.perf_counter() - start_at))
    cosine = float((np.asarray(vectors, dtype=np.float32) * reference).sum(axis=1).min())
    print(f"{len(texts)} texts, MiniLM-L6, 2 cores; texts/s, best of {args.rounds}")
    print(f"{'in-process batch 32':>24} {in_process:>8.1f}")
    print(
        f"{f'server, {args.clients} clients':>24} {served:>8.1f} {served / in_process:>5.2f}x  "
        f"({passes[0]:.0f} forward passes, {passes[1] / max(passes[0], 1):.1f} texts each; "
        f"least cosine with in-process {cosine:.6f})"
    )


if __name__ == "__main__":
    main()
