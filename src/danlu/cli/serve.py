"""danlu serve."""

from __future__ import annotations


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run over HTTP: JSON API, web page, health and metrics",
        description="Serve a finished run with FastAPI + uvicorn: POST /v1/predict, GET /v1/metadata, "
        "/healthz, /readyz, /metrics (Prometheus), a web form at /, and OpenAPI docs at /docs. "
        "Concurrent requests are micro-batched into one forward pass. SIGTERM finishes in-flight "
        "requests before exiting.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument(
        "--engine", choices=["torch", "onnx"], default="torch", help="onnx needs `danlu export` first"
    )
    p.add_argument("--max-batch", type=int, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="batching window (default 2 ms)")
    p.add_argument("--max-rows", type=int, default=1024, help="rows per request (default 1024)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="request body limit (default 10 MB)")
    p.add_argument("--max-queue", type=int, default=8192, help="rows waiting before 503 (default 8192)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a request gets 504 (default 30)"
    )
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    p.add_argument("--api-key", help="require this key in X-API-Key or Authorization: Bearer (default: none)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from danlu.run import RunDir

    RunDir(args.run_dir).require_complete()  # before torch is imported
    from danlu.errors import DanluError
    from danlu.serve.app import ServeSettings, serve

    if args.workers < 1:
        raise DanluError("--workers must be at least 1", "e.g. --workers 2")
    settings = ServeSettings(
        run_dir=args.run_dir,
        engine=args.engine,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_rows=args.max_rows,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_queue_rows=args.max_queue,
        timeout_s=args.timeout,
        api_key=args.api_key,
    )
    serve(settings, args.host, args.port, args.workers, args.access_log)
    return 0
