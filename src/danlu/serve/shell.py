"""The server shell: what every danlu server is, whatever it serves.

A handler owns one kind of server: its routes, its model and its page (`serve/app.py`: a run's
predictions; `serve/chat/app.py`: a language model's chat completions). The shell puts the same things
around each of them:

- in front of every request (Guard, plain ASGI): the body limit (413), the Host check that stops DNS
  rebinding (400, while bound to loopback), JSON content types on JSON endpoints (415: a web page
  elsewhere can POST text/plain to localhost without asking), and the request metrics;
- the API key (`X-API-Key: KEY` or `Authorization: Bearer KEY`) on every route but the probes and the page;
- errors in the handler's shape (`{"detail": ...}`, or OpenAI's `{"error": {...}}`), 503 with Retry-After;
- /healthz, /readyz and /metrics, and the page at /;
- a thread pool for heavy request parsing (image decoding, templating), so the event loop stays free;
- the lifespan: /readyz turns 200 once the handler has started, and 503 before it stops;
- running: uvicorn until SIGINT or SIGTERM, which drain the requests in flight for up to the timeout.
  A handler whose work must run on the main thread (the chat engine: torch's CPU kernels are slower on
  any other) gets it, with HTTP on a thread of its own.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from danlu import __version__
from danlu.serve.guard import Guard, RequestMetrics, add_probes, key_matches
from danlu.serve.settings import ServerSettings

log = logging.getLogger("danlu")
UNAUTHORIZED = "missing or wrong API key: send 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
BUSY = "the server is at capacity; retry shortly"
# How `--workers N` hands the settings to each worker process: the path of a file only this user can read,
# so the API key is never in an environment that child processes inherit.
SETTINGS_FILE_ENV = "DANLU_SERVE_SETTINGS_FILE"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ServeError(Exception):
    """A request's answer other than a 200, rendered in the handler's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


class Handler(Protocol):
    """One kind of server inside the shell."""

    settings: ServerSettings
    metrics: RequestMetrics
    title: str
    description: str
    ready_means: str  # what /readyz's 200 promises
    endpoints: frozenset[str]  # the paths the metrics label by name (others count as "other")
    json_paths: dict[str, tuple[str, ...]]  # POST path -> the content types it takes
    drive: Callable[[Callable[[], bool]], None] | None  # work for the main thread, until the predicate

    def error_body(self, error: ServeError) -> dict[str, Any]: ...

    def page(self) -> str: ...

    def add_routes(self, app: FastAPI, shell: Shell) -> None: ...

    def wrap(self, app: Any) -> Any:
        """ASGI middleware the handler puts in front of its routes, inside the Guard (or app itself)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def allowed_hosts(host: str) -> frozenset[str] | None:
    """The Host header names a server bound to `host` answers: loopback names while bound to a loopback
    address (a web page elsewhere cannot rebind its own name to 127.0.0.1 and read the answers), any
    name once bound to a network address, which clients may reach under any of its names."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return frozenset({*LOOPBACK_NAMES, host.strip("[]").lower()}) if loopback else None


class Shell:
    """What a handler's routes use of the shell: the key check, errors, and the parsing thread pool."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.ready = {"ready": False}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="danlu-parse")

    def authorize(self, request: Request) -> None:
        """Raises ServeError(401) unless the request carries the key (or no key is set)."""
        if not key_matches(self.handler.settings.api_key, request.headers):
            raise ServeError(
                401, UNAUTHORIZED, kind="authentication_error", headers={"WWW-Authenticate": "Bearer"}
            )

    def busy(self) -> ServeError:
        return ServeError(503, BUSY, kind="server_error", headers={"Retry-After": "1"})

    def respond(self, error: ServeError) -> JSONResponse:
        return JSONResponse(self.handler.error_body(error), status_code=error.status, headers=error.headers)

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the parsing threads: decoding and tokenizing never hold up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def create_app(handler: Handler) -> FastAPI:
    """The FastAPI app of a handler inside the shell."""
    shell = Shell(handler)
    settings = handler.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await handler.start()
        # What start-up made (modules, the model, the app) lives as long as the server: out of the
        # collector's sight, a full collection no longer pauses every request for tens of milliseconds.
        gc.freeze()
        shell.ready["ready"] = True
        try:
            yield
        finally:
            shell.ready["ready"] = False
            await handler.stop()
            shell.close()

    app = FastAPI(
        title=handler.title, version=__version__, description=handler.description, lifespan=lifespan
    )
    app.state.shell = shell

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return shell.respond(exc)

    handler.add_routes(app, shell)
    add_probes(app, shell.ready, handler.metrics, handler.ready_means)
    page = handler.page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(handler.wrap)
    app.add_middleware(
        Guard,
        max_body_bytes=settings.max_body_bytes,
        metrics=handler.metrics,
        endpoints=handler.endpoints,
        hosts=allowed_hosts(settings.host),
        json_paths=handler.json_paths,
        error_body=lambda status, message: handler.error_body(ServeError(status, message)),
    )
    return app


def page_with(file: str, placeholder: str, config: dict[str, Any]) -> str:
    """A static page of danlu.serve with its configuration inlined as JSON ("</" cannot close the script
    element from inside a JSON string)."""
    from importlib import resources

    page = resources.files("danlu.serve").joinpath(f"static/{file}").read_text(encoding="utf-8")
    return page.replace(placeholder, json.dumps(config).replace("</", "<\\/"))


def _options(settings: ServerSettings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": settings.timeout_s,
        "log_level": "info",
    }


def _server(app: Any, settings: ServerSettings):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, **_options(settings)))


def run(app: FastAPI) -> int:
    """Serve until SIGINT or SIGTERM; in-flight requests finish (up to the timeout) before it returns."""
    handler: Handler = app.state.shell.handler
    server = _server(app, handler.settings)
    if handler.drive is None:
        server.run()
        return 0 if server.started else 1
    return _run_beside(server, handler.drive)


def _run_beside(server, drive: Callable[[Callable[[], bool]], None]) -> int:
    """HTTP on a thread, the handler's work on the main thread. SIGTERM and SIGINT go to uvicorn, which
    drains the requests in flight and then, in the lifespan's end, stops the handler's work; a second
    SIGINT forces the exit."""
    import signal
    import threading

    outcome = {"code": 0}

    def http() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
            outcome["code"] = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("the HTTP server failed")
            outcome["code"] = 1

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    thread = threading.Thread(target=http, name="danlu-http")
    thread.start()
    drive(lambda: not thread.is_alive())
    thread.join()
    return outcome["code"]


def run_workers(factory: str, settings: ServerSettings, workers: int) -> int:
    """`workers` server processes, each building its app with `factory` (a "module:function" that reads
    the settings back with `settings_from_env`); the settings travel in a file only this user can read."""
    private = Path(tempfile.mkdtemp(prefix="danlu-serve-"))  # mode 0700: this user only
    try:
        settings_file = private / "settings.json"
        fd = os.open(settings_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(settings), f)
        os.environ[SETTINGS_FILE_ENV] = str(settings_file)
        import uvicorn

        uvicorn.run(factory, factory=True, workers=workers, **_options(settings))
        return 0
    finally:
        os.environ.pop(SETTINGS_FILE_ENV, None)
        shutil.rmtree(private, ignore_errors=True)


def settings_from_env() -> dict[str, Any]:
    """The settings a `run_workers` worker was started with."""
    return json.loads(Path(os.environ[SETTINGS_FILE_ENV]).read_text())
