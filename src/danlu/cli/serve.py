"""danlu serve."""

from __future__ import annotations

import logging
import os

from danlu.cli.options import number

API_KEY_ENV = "DANLU_API_KEY"
log = logging.getLogger("danlu")


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run, or a local chat model, over HTTP: JSON API, web page, health and metrics",
        description="Serve a finished run with FastAPI + uvicorn: POST /v1/predict, GET /v1/metadata, "
        "/healthz, /readyz, /metrics (Prometheus), a web form at /, and OpenAPI docs at /docs. "
        "Concurrent requests are micro-batched into one forward pass. SIGTERM finishes in-flight "
        "requests before exiting. When the argument is a causal language model (a directory whose "
        "config.json has a *ForCausalLM architecture, or a .gguf file), an OpenAI-compatible chat server: "
        "POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, a chat page "
        "at /; concurrent requests decode together (continuous batching, --max-batch sequences). When it is "
        "a CLIP or SigLIP directory or an encoder-only text model (BERT, MiniLM, sentence-transformers): "
        "OpenAI's POST /v1/embeddings (texts, and images for CLIP/SigLIP), POST /v1/zero-shot (images "
        "against labels), GET /v1/models and a page at /; texts and images of concurrent requests are "
        "embedded together.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument(
        "--engine",
        choices=["auto", "torch", "onnx", "llama.cpp", "vllm"],
        help="runs: torch (default) or onnx (needs `danlu export` first); chat models: auto (default: "
        "llama.cpp for a .gguf file when llama-cpp-python is installed; vllm for a directory when vLLM is "
        "installed; else torch), torch, llama.cpp or vllm",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="rows per forward pass (default 64); chat models: sequences decoding together (default 8)",
    )
    p.add_argument("--max-wait-ms", type=number, default=2.0, help="batching window (default 2 ms)")
    p.add_argument("--max-rows", type=int, default=1024, help="rows per request (default 1024)")
    p.add_argument("--max-body-mb", type=number, help="request body limit (default 10 MB; chat models: 4 MB)")
    p.add_argument(
        "--max-queue",
        type=int,
        help="rows waiting before 503 (default 8192); chat models: requests waiting (default 64)",
    )
    p.add_argument(
        "--timeout",
        type=number,
        help="seconds before a request gets 504, and the longest drain on SIGTERM (default 30; chat models: "
        "300)",
    )
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require the key in FILE (its first line) in X-API-Key or Authorization: Bearer; "
        f"or set {API_KEY_ENV} (default: no key)",
    )
    key.add_argument(
        "--api-key", metavar="KEY", help="the key itself; visible to other users in `ps`: prefer the above"
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="chat models: prompt tokens per engine step (512)"
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        help="chat models: the KV cache's size in tokens, counted for torch as sequences (rounded up to "
        "1, 2, 4, 8, ...) x the longest prompt + max_tokens among them, for llama.cpp as the sum of each "
        "one's prompt + max_tokens; a request that does not fit waits (default 16384, or the model's "
        "context if larger)",
    )
    p.add_argument(
        "--truncate",
        choices=["error", "end", "start"],
        help="embedding models: a text over the model's limit gets a 400 naming its tokens (error, the "
        "default), or is cut at its end or start",
    )
    p.add_argument(
        "--matryoshka",
        action="store_true",
        help="embedding models: take `dimensions` below the model's (its leading dimensions, renormalized); "
        "only for a model trained for shorter vectors",
    )
    from danlu.cli.chat import add_model_options
    from danlu.cli.options import add_trust_model_code

    add_trust_model_code(p)
    add_model_options(p, serving=True)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from danlu.cli.chat import vllm_options
    from danlu.embeddings.detect import is_encoder_model
    from danlu.run import RunDir
    from danlu.serve.chat.model import check_path, is_causal_lm, looks_like_model, served_model

    args.run_dir = served_model(args.run_dir)  # a fine-tuned causal LM's run: the model it holds
    encoder = is_encoder_model(args.run_dir)
    chat = not encoder and (is_causal_lm(args.run_dir) or looks_like_model(args.run_dir))
    if chat:
        check_path(args.run_dir)  # a missing .gguf file or a hub id: one line before torch is imported
    elif not encoder:
        RunDir(args.run_dir).require_complete()  # before torch is imported
    import danlu

    options = {"host": args.host, "port": args.port, "api_key": api_key(args), "access_log": args.access_log}
    options["workers"], options["engine"] = args.workers, args.engine
    # left unset, each server's own default applies (runs: 64 rows, 8192 queued, 30 s, 10 MB; chat: 8
    # sequences, 64 queued, 300 s, 4 MB)
    if args.max_batch is not None:
        options["max_batch"] = args.max_batch
    if args.max_queue is not None:
        options["max_queue" if chat else "max_queue_rows"] = args.max_queue
    if args.timeout is not None:
        options["timeout_s"] = args.timeout
    if args.max_body_mb is not None:
        options["max_body_bytes"] = int(args.max_body_mb * 1024 * 1024)
    if chat:
        options.update(
            max_tokens=args.max_tokens,
            prefill_chunk=args.prefill_chunk,
            max_batch_tokens=args.max_batch_tokens,
            template=args.template,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            trust_remote_code=args.trust_remote_code,
            vllm=vllm_options(args),
        )
    elif encoder:
        options.update(max_wait_ms=args.max_wait_ms, max_rows=args.max_rows, matryoshka=args.matryoshka)
        options.update(truncate=args.truncate or "error", dtype=args.dtype)
    else:
        options.update(max_wait_ms=args.max_wait_ms, max_rows=args.max_rows)
        options.update(trust_model_code=args.trust_model_code)
    return danlu.serve(args.run_dir, **options)


def api_key(args) -> str | None:
    """The key from --api-key-file, DANLU_API_KEY or --api-key (with a warning). DANLU_API_KEY is removed
    from this process's environment, so no process it starts inherits the key."""
    from danlu.errors import DanluError, read_user_text

    from_env = os.environ.pop(API_KEY_ENV, None)
    if args.api_key is not None:
        log.warning(
            "--api-key is visible to every local user in `ps`; use --api-key-file FILE or %s", API_KEY_ENV
        )
        key, source = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        try:
            lines = read_user_text(args.api_key_file).splitlines()
        except OSError as error:
            raise DanluError(
                f"cannot read --api-key-file '{args.api_key_file}': {error.strerror or error}",
                "pass a text file holding the key on its first line",
            ) from None
        key, source = (lines[0].strip() if lines else ""), f"--api-key-file '{args.api_key_file}'"
    elif from_env is not None:
        key, source = from_env.strip(), API_KEY_ENV
    else:
        return None
    if not key:
        raise DanluError(f"the API key from {source} is empty", "give a non-empty key, or no key at all")
    return key
